#!/usr/bin/env node
// Computes reference MobileNetV2 features of one photo with TensorFlow.js and
// writes them as a safetensors fixture.
//
// The model is the Keras MobileNetV2 that the npm package nsfwjs 4.3.0 ships
// in dist/models/mobilenet_v2/, loaded from a local folder with the pure-JS
// `@tensorflow/tfjs` (CPU backend, no native binding). TensorFlow.js parses
// the layers model, dequantizes the weights and runs every layer, so none of
// the numbers come from code written in this repository. The preprocessing
// repeats what `NSFWJS.infer` in nsfwjs 4.3.0 does: cast to float32, divide by
// 255, then `tf.image.resizeBilinear` to 224x224 with alignCorners = true.
//
// Usage:
//   npm ci                      (once, in this folder)
//   node reference.js [--model-dir DIR] [--image FILE.png] [--out FILE] [--weights-out FILE]
//
// It writes two files. --out receives the preprocessed photo and the
// activations of the photo; --weights-out receives a few whole weight tensors
// as TensorFlow.js dequantized them, in the Keras layout, so the converter's
// dequantization and transposes can be checked against them.
//
// Defaults: the cache folder of scripts/fetch-assets.sh
// (${FLAMINGO_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/flamingo}) for the model
// folder (nsfwjs/mobilenet_v2) and the photo (photos/chelsea.png), and
// fixtures/mobilenet/chelsea_reference.safetensors and
// fixtures/mobilenet/nsfwjs_weights_sample.safetensors in the repository for
// the outputs. fixtures/mobilenet/README.md describes every tensor written.

'use strict';

const crypto = require('crypto');
const fs = require('fs');
const os = require('os');
const path = require('path');
const vm = require('vm');

const tf = require('@tensorflow/tfjs');
const { PNG } = require('pngjs');

const IMAGE_SIZE = 224;
const FEATURE_LAYER = 'out_relu';

// Weights copied whole into the weight sample: the stem convolution, 3x3
// depthwise kernels, 1x1 kernels and batch-norm vectors from the first block
// to the head, each small enough that all of them take about 43 KB.
const SAMPLED_WEIGHTS = [
  'Conv1/kernel',
  'bn_Conv1/gamma',
  'bn_Conv1/beta',
  'bn_Conv1/moving_mean',
  'bn_Conv1/moving_variance',
  'expanded_conv_depthwise/depthwise_kernel',
  'expanded_conv_project/kernel',
  'expanded_conv_project_BN/moving_variance',
  'block_1_expand/kernel',
  'block_6_depthwise/depthwise_kernel',
  'block_13_depthwise_BN/beta',
  'Conv_1_bn/gamma',
  'Conv_1_bn/beta',
  'Conv_1_bn/moving_mean',
  'Conv_1_bn/moving_variance',
];

// SHA-256 of the files in nsfwjs 4.3.0's dist/models/mobilenet_v2/, the pin
// that scripts/fetch-assets.sh checks too.
const NSFWJS_4_3_0_SHA256 = {
  'model.min.js': 'c32f104fd562b08cdff5ed69dfe1209643afa47e792fb12751d2949aa61a397a',
  'group1-shard1of1.min.js': 'ef2e0a63f7d2c4960b37b024b669313f65d3c45cd59e9042636c55b39de53517',
};

function cacheDir() {
  if (process.env.FLAMINGO_CACHE) {
    return process.env.FLAMINGO_CACHE;
  }
  const base = process.env.XDG_CACHE_HOME || path.join(os.homedir(), '.cache');
  return path.join(base, 'flamingo');
}

function parseArgs(argv) {
  const repoRoot = path.resolve(__dirname, '..', '..');
  const args = {
    modelDir: path.join(cacheDir(), 'nsfwjs', 'mobilenet_v2'),
    image: path.join(cacheDir(), 'photos', 'chelsea.png'),
    out: path.join(repoRoot, 'fixtures', 'mobilenet', 'chelsea_reference.safetensors'),
    weightsOut: path.join(repoRoot, 'fixtures', 'mobilenet', 'nsfwjs_weights_sample.safetensors'),
  };
  const flags = { '--model-dir': 'modelDir', '--image': 'image', '--out': 'out', '--weights-out': 'weightsOut' };
  for (let i = 0; i < argv.length; i += 1) {
    const flag = argv[i];
    if (flag === '-h' || flag === '--help') {
      console.log('usage: node reference.js [--model-dir DIR] [--image FILE.png] [--out FILE] [--weights-out FILE]');
      process.exit(0);
    }
    if (!(flag in flags) || i + 1 >= argv.length) {
      throw new Error(`invalid argument '${flag}'; expected --model-dir DIR, --image FILE.png, --out FILE or --weights-out FILE`);
    }
    args[flags[flag]] = path.resolve(argv[i + 1]);
    i += 1;
  }
  return args;
}

function sha256Hex(bytes) {
  return crypto.createHash('sha256').update(bytes).digest('hex');
}

function readFileOrExplain(file, what) {
  if (!fs.existsSync(file)) {
    throw new Error(`${file}: ${what} not found. Run scripts/fetch-assets.sh, or pass its location (see --help).`);
  }
  return fs.readFileSync(file);
}

// Evaluates one of nsfwjs's browserify-wrapped .min.js files and returns what
// it exports. The UMD prelude assigns the value to `module.exports` when
// `module` and `exports` exist, so a fresh VM context with just those two is
// enough. The JSON round trip turns objects of the other context into plain
// objects of this one, because tfjs checks some of them with `instanceof`.
function evaluateBundle(file, source) {
  const module = { exports: {} };
  vm.runInNewContext(source, { module, exports: module.exports }, { filename: file });
  return JSON.parse(JSON.stringify(module.exports));
}

const BYTES_PER_ELEMENT = { float32: 4, int32: 4, bool: 1, uint8: 1, uint16: 2, float16: 2 };

function storedBytes(spec) {
  const count = spec.shape.reduce((product, dim) => product * dim, 1);
  const dtype = spec.quantization ? spec.quantization.dtype : spec.dtype;
  if (!(dtype in BYTES_PER_ELEMENT)) {
    throw new Error(`weight '${spec.name}' has unsupported stored dtype '${dtype}'`);
  }
  return count * BYTES_PER_ELEMENT[dtype];
}

function loadArtifacts(modelDir) {
  const hashes = {};
  const modelFile = path.join(modelDir, 'model.min.js');
  const modelSource = readFileOrExplain(modelFile, 'the nsfwjs model topology');
  hashes['model.min.js'] = sha256Hex(modelSource);
  const modelJson = evaluateBundle(modelFile, modelSource.toString('utf8'));

  const weightSpecs = [];
  const shards = [];
  for (const group of modelJson.weightsManifest) {
    for (const shardPath of group.paths) {
      const shardName = `${shardPath}.min.js`;
      const shardFile = path.join(modelDir, shardName);
      const shardSource = readFileOrExplain(shardFile, `weight shard '${shardPath}'`);
      hashes[shardName] = sha256Hex(shardSource);
      const base64 = evaluateBundle(shardFile, shardSource.toString('utf8'));
      if (typeof base64 !== 'string') {
        throw new Error(`${shardFile}: expected the bundle to export a base64 string, found ${typeof base64}`);
      }
      shards.push(Buffer.from(base64, 'base64'));
    }
    weightSpecs.push(...group.weights);
  }

  const weightData = Buffer.concat(shards);
  const expectedBytes = weightSpecs.reduce((sum, spec) => sum + storedBytes(spec), 0);
  if (weightData.length !== expectedBytes) {
    throw new Error(`${modelDir}: the shards contain ${weightData.length} bytes but the manifest describes ${expectedBytes}`);
  }

  // A copy into a fresh ArrayBuffer, because a Buffer may be a view into a
  // larger shared pool.
  const weightBuffer = weightData.buffer.slice(weightData.byteOffset, weightData.byteOffset + weightData.byteLength);
  return { modelTopology: modelJson.modelTopology, weightSpecs, weightData: weightBuffer, hashes };
}

function checkPinnedHashes(hashes) {
  const mismatches = Object.entries(NSFWJS_4_3_0_SHA256)
    .filter(([name, expected]) => hashes[name] !== expected)
    .map(([name]) => name);
  if (mismatches.length > 0) {
    console.warn(`warning: ${mismatches.join(', ')} differ from nsfwjs 4.3.0; the fixture would not match the documented model`);
  }
  return mismatches.length === 0;
}

// Decodes a PNG into RGB bytes. pngjs returns RGBA with 8 bits per channel
// for every PNG colour type (16-bit samples are scaled down), and the alpha
// channel is dropped as tf.browser.fromPixels does with numChannels = 3.
function decodePngRgb(file) {
  if (path.extname(file).toLowerCase() !== '.png') {
    throw new Error(`${file}: only PNG photos are supported, because pngjs decodes PNG only`);
  }
  const bytes = readFileOrExplain(file, 'the photo');
  const png = PNG.sync.read(bytes);
  const rgb = new Int32Array(png.width * png.height * 3);
  for (let pixel = 0; pixel < png.width * png.height; pixel += 1) {
    rgb[pixel * 3] = png.data[pixel * 4];
    rgb[pixel * 3 + 1] = png.data[pixel * 4 + 1];
    rgb[pixel * 3 + 2] = png.data[pixel * 4 + 2];
  }
  return { rgb, width: png.width, height: png.height, sha256: sha256Hex(bytes) };
}

// The same steps as NSFWJS.infer in nsfwjs 4.3.0, which resizes only when
// the image is not already IMAGE_SIZE x IMAGE_SIZE.
function preprocess(image) {
  return tf.tidy(() => {
    const pixels = tf.tensor3d(image.rgb, [image.height, image.width, 3], 'int32');
    const normalized = tf.cast(pixels, 'float32').div(tf.scalar(255));
    let resized = normalized;
    if (image.height !== IMAGE_SIZE || image.width !== IMAGE_SIZE) {
      const alignCorners = true;
      resized = tf.image.resizeBilinear(normalized, [IMAGE_SIZE, IMAGE_SIZE], alignCorners);
    }
    return resized.reshape([1, IMAGE_SIZE, IMAGE_SIZE, 3]);
  });
}

// Output layer of the stem, of each inverted-residual block (the Add layer
// where the block has a shortcut) and the feature layer, in network order.
function probeLayerNames(model) {
  const names = ['Conv1_relu', 'expanded_conv_project_BN'];
  for (let block = 1; block <= 16; block += 1) {
    const add = `block_${block}_add`;
    names.push(model.layers.some((layer) => layer.name === add) ? add : `block_${block}_project_BN`);
  }
  names.push(FEATURE_LAYER);
  return names;
}

// Writes tensors in the safetensors format: an 8-byte little-endian header
// length, a JSON header padded with spaces to a multiple of 8 bytes, then the
// raw little-endian data. The file is written under a temporary name and
// renamed, so an interrupted run leaves no partial fixture behind.
function writeSafetensors(file, tensors, metadata) {
  if (os.endianness() !== 'LE') {
    throw new Error('safetensors stores little-endian data, but this machine is big-endian');
  }
  const header = { __metadata__: metadata };
  let offset = 0;
  for (const tensor of tensors) {
    const byteLength = tensor.data.byteLength;
    header[tensor.name] = { dtype: 'F32', shape: tensor.shape, data_offsets: [offset, offset + byteLength] };
    offset += byteLength;
  }
  let headerText = JSON.stringify(header);
  headerText += ' '.repeat((8 - (Buffer.byteLength(headerText) % 8)) % 8);
  const headerBytes = Buffer.from(headerText, 'utf8');
  const length = Buffer.alloc(8);
  length.writeBigUInt64LE(BigInt(headerBytes.length));

  const parts = [length, headerBytes];
  for (const tensor of tensors) {
    parts.push(Buffer.from(tensor.data.buffer, tensor.data.byteOffset, tensor.data.byteLength));
  }

  fs.mkdirSync(path.dirname(file), { recursive: true });
  const partial = `${file}.partial.${process.pid}`;
  fs.writeFileSync(partial, Buffer.concat(parts));
  fs.renameSync(partial, file);
}

// Returns the sampled weights as TensorFlow.js stores them after loading, in
// the Keras layout (kernel HWIO, depthwise_kernel HWC1).
async function sampleWeights(model) {
  const variables = new Map(model.weights.map((variable) => [variable.originalName, variable]));
  const tensors = [];
  for (const name of SAMPLED_WEIGHTS) {
    const variable = variables.get(name);
    if (!variable) {
      throw new Error(`the loaded model has no weight '${name}'`);
    }
    tensors.push({ name, shape: variable.shape, data: await variable.read().data() });
  }
  return tensors;
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  await tf.setBackend('cpu');

  const artifacts = loadArtifacts(args.modelDir);
  const pinned = checkPinnedHashes(artifacts.hashes);
  const model = await tf.loadLayersModel(tf.io.fromMemory({
    modelTopology: artifacts.modelTopology,
    weightSpecs: artifacts.weightSpecs,
    weightData: artifacts.weightData,
  }));

  const image = decodePngRgb(args.image);
  const input = preprocess(image);

  const probeNames = probeLayerNames(model);
  const probe = tf.model({
    inputs: model.inputs,
    outputs: probeNames.map((name) => model.getLayer(name).output),
  });
  const probeOutputs = probe.predict(input);
  const features = probeOutputs[probeOutputs.length - 1];
  if (features.shape.join(',') !== '1,7,7,1280') {
    throw new Error(`${FEATURE_LAYER} has shape [${features.shape}], expected [1,7,7,1280]`);
  }

  const tensors = [
    { name: 'input', shape: input.shape, data: await input.data() },
    { name: FEATURE_LAYER, shape: features.shape, data: await features.data() },
  ];
  for (let i = 0; i < probeNames.length; i += 1) {
    const means = tf.tidy(() => probeOutputs[i].mean([1, 2]).reshape([-1]));
    tensors.push({ name: `mean_hw.${probeNames[i]}`, shape: means.shape, data: await means.data() });
  }

  const probabilities = await model.predict(input).data();
  const top = probabilities.indexOf(Math.max(...probabilities));

  const metadata = {
    generator: 'scripts/mobilenet-reference/reference.js',
    tfjs_version: tf.version.tfjs,
    tfjs_backend: tf.getBackend(),
    node_version: process.versions.node,
    pngjs_version: require('pngjs/package.json').version,
    model: pinned ? 'nsfwjs 4.3.0 dist/models/mobilenet_v2' : 'unrecognized nsfwjs mobilenet_v2 folder',
    model_sha256: Object.entries(artifacts.hashes).map(([name, hash]) => `${name}=${hash}`).join(','),
    image: path.basename(args.image),
    image_sha256: image.sha256,
    image_size: `${image.width}x${image.height}`,
    preprocessing: 'RGB uint8 -> float32 / 255 -> resizeBilinear 224x224 alignCorners=true halfPixelCenters=false',
    layout: 'NHWC',
    feature_layer: FEATURE_LAYER,
  };
  writeSafetensors(args.out, tensors, metadata);

  const weightMetadata = {
    generator: metadata.generator,
    tfjs_version: metadata.tfjs_version,
    model: metadata.model,
    model_sha256: metadata.model_sha256,
    layout: 'Keras: Conv2D kernel [height, width, in, out], DepthwiseConv2D depthwise_kernel [height, width, channels, 1]',
  };
  writeSafetensors(args.weightsOut, await sampleWeights(model), weightMetadata);

  console.log(`model: ${metadata.model} (${Object.keys(artifacts.hashes).length} files)`);
  console.log(`image: ${args.image} ${metadata.image_size} sha256 ${image.sha256}`);
  console.log(`tfjs ${metadata.tfjs_version}, backend ${metadata.tfjs_backend}`);
  console.log(`${FEATURE_LAYER}: shape [${features.shape}], mean ${tensors[1].data.reduce((a, b) => a + b, 0) / tensors[1].data.length}`);
  console.log(`classifier: top class index ${top}, probability ${probabilities[top].toFixed(4)}`);
  console.log(`wrote ${args.out} (${fs.statSync(args.out).size} bytes)`);
  console.log(`wrote ${args.weightsOut} (${fs.statSync(args.weightsOut).size} bytes)`);
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
