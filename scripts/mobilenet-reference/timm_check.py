"""Cross-checks the nsfwjs -> timm conversion with timm itself.

1. Writes fixtures/mobilenet/timm_mobilenetv2_100_keys.txt: every state_dict
   key of timm's mobilenetv2_100 (num_classes=0) except num_batches_tracked,
   with its shape, in module order.
2. Checks a converted file (written by `flamingo convert` or
   flamingo_model::convert::convert_nsfwjs_mobilenet_v2). It loads the file
   strictly into timm's mobilenetv2_100, built with the padding and
   batch-norm epsilon from the file's metadata. Then it runs the fixture's
   preprocessed input through `forward_features` and compares the result
   with the TensorFlow.js `out_relu` and `mean_hw.*` tensors of the fixture.

Needs torch, timm and safetensors (PyPI); torch from PyPI is the CUDA build,
about 5 GB, so install them in a throwaway virtual environment:

    python3 -m venv /tmp/timm-venv
    /tmp/timm-venv/bin/pip install torch timm safetensors
    /tmp/timm-venv/bin/python timm_check.py --write-keys --converted FILE.safetensors
"""

import argparse
import pathlib
import re
import sys

import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

FIXTURES = pathlib.Path(__file__).resolve().parents[2] / "fixtures" / "mobilenet"

# Maps the converter's `padding` metadata to timm's pad_type.
TIMM_PAD_TYPE = {"tf_same": "same"}


def write_keys(path):
    model = timm.create_model("mobilenetv2_100", num_classes=0)
    lines = [
        f"{key} {','.join(str(dim) for dim in tensor.shape)}"
        for key, tensor in model.state_dict().items()
        if not key.endswith("num_batches_tracked")
    ]
    header = (
        f"# Every state_dict key of timm {timm.__version__} mobilenetv2_100 (num_classes=0) except num_batches_tracked,\n"
        "# with its shape, in module order. Written by timm itself; see README.md.\n"
    )
    path.write_text(header + "\n".join(lines) + "\n")
    print(f"wrote {path} ({len(lines)} keys, timm {timm.__version__})")


def block_outputs(model, x):
    """Returns the output of bn1 (stem), of every block and of bn2 (head), in order."""
    outputs = []
    h = model.bn1(model.conv_stem(x))
    outputs.append(("bn1", h))
    for stage_index, stage in enumerate(model.blocks):
        for block_index, block in enumerate(stage):
            h = block(h)
            outputs.append((f"blocks.{stage_index}.{block_index}", h))
    h = model.bn2(model.conv_head(h))
    outputs.append(("bn2", h))
    return outputs


def keras_order(name):
    layer = name.removeprefix("mean_hw.")
    if layer == "Conv1_relu":
        return 0
    if layer.startswith("expanded_conv"):
        return 1
    if layer == "out_relu":
        return 100
    return 1 + int(re.match(r"block_(\d+)_", layer).group(1))


def check_converted(path, reference_path):
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
    model = timm.create_model(
        "mobilenetv2_100",
        num_classes=0,
        pad_type=TIMM_PAD_TYPE[metadata["padding"]],
        bn_eps=float(metadata["bn_eps"]),
    ).eval()
    model.load_state_dict(load_file(str(path)), strict=True)

    reference = load_file(str(reference_path))
    x = reference["input"].permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        features = model.forward_features(x)
        outputs = block_outputs(model, x)

    expected = reference["out_relu"].permute(0, 3, 1, 2)
    difference = (features - expected).abs()
    print(f"out_relu: max abs difference {difference.max().item():.3e}, mean {difference.mean().item():.3e}")

    mean_names = sorted((name for name in reference if name.startswith("mean_hw.")), key=keras_order)
    worst = 0.0
    for name, (module, output) in zip(mean_names, outputs, strict=True):
        error = (output.mean((2, 3))[0] - reference[name]).abs().max().item()
        worst = max(worst, error)
        print(f"  {name:34s} {module:12s} max abs difference {error:.2e}")
    return difference.max().item(), worst


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-keys", action="store_true", help="rewrite the timm key list fixture")
    parser.add_argument("--converted", type=pathlib.Path, help="a converted mobilenetv2_100 safetensors file to check")
    parser.add_argument("--reference", type=pathlib.Path, default=FIXTURES / "chelsea_reference.safetensors")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs difference allowed on out_relu")
    args = parser.parse_args()

    if args.write_keys:
        write_keys(FIXTURES / "timm_mobilenetv2_100_keys.txt")
    if args.converted:
        features_error, _ = check_converted(args.converted, args.reference)
        if features_error > args.tolerance:
            sys.exit(f"out_relu differs from TensorFlow.js by {features_error:.3e}, more than {args.tolerance:.1e}")


if __name__ == "__main__":
    main()
