//! Caption accuracy on class-caption data (IDX files written here), during
//! training and from a saved checkpoint, and the text-only evaluation of a
//! connector whose gates are all 0.

mod train_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use flamingo_kernels::{Device, DeviceRequest, HostTensor};
use flamingo_model::flamingo::{Flamingo, FlamingoConfig, ResamplerConfig};
use flamingo_model::lm::LanguageModel;
use flamingo_model::vision::{VisionEncoder, VisionOptions};
use flamingo_train::accuracy::ClassMatcher;
use flamingo_train::data::{ClassTemplate, DataError, IndexedDataset, Loader, LoaderConfig, PromptTemplate, Sample};
use flamingo_train::eval::{run_evaluation, run_full_evaluation, run_text_only_evaluation, EvalContext, EvalOptions};
use flamingo_train::extract::FeatureExtractor;
use flamingo_train::features::FeatureCache;
use flamingo_train::sources::{open_evaluation_source, Source};
use flamingo_train::text::{CaptionLayout, TextEncoder};
use flamingo_train::{evaluate, train, DataFormat, DataSource, EvalReport, EvaluateConfig, StopFlag};
use train_support::*;

const CLASSES: [&str; 3] = ["circle", "cross", "stripe"];

/// Draws a 28×28 greyscale picture of class `label`, shifted by `seed`.
fn pattern(label: u8, seed: usize) -> Vec<u8> {
    let shift = (seed % 5) as i32 - 2;
    let mut pixels = vec![0u8; 28 * 28];
    for y in 0..28i32 {
        for x in 0..28i32 {
            let (cx, cy) = (x - 14 - shift, y - 14 + shift);
            let on = match label {
                0 => (cx * cx + cy * cy - 64).abs() < 20,
                1 => cx.abs() < 2 || cy.abs() < 2,
                _ => (x + shift).rem_euclid(6) < 3,
            };
            pixels[(y * 28 + x) as usize] = if on { 240 } else { 10 };
        }
    }
    pixels
}

/// Writes an IDX image file and label file with `count` samples.
fn write_idx(dir: &Path, name: &str, count: usize, offset: usize) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let mut images = vec![0, 0, 8, 3];
    for size in [count as u32, 28, 28] {
        images.extend(size.to_be_bytes());
    }
    let mut labels = vec![0, 0, 8, 1];
    labels.extend((count as u32).to_be_bytes());
    for i in 0..count {
        let label = (i % CLASSES.len()) as u8;
        images.extend(pattern(label, i + offset));
        labels.push(label);
    }
    let (image_path, label_path) = (dir.join(format!("{name}-images-idx3-ubyte")), dir.join(format!("{name}-labels-idx1-ubyte")));
    std::fs::write(&image_path, images).unwrap();
    std::fs::write(&label_path, labels).unwrap();
    (image_path, label_path)
}

fn idx_source(images: PathBuf, labels: PathBuf) -> DataSource {
    let mut source = DataSource::with_path(DataFormat::Idx, images);
    source.labels = Some(labels);
    source.class_names = Some(CLASSES.iter().map(|c| c.to_string()).collect());
    source
}

#[test]
fn class_captions_get_accuracy_report() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let (train_images, train_labels) = write_idx(&dir.path().join("data"), "train", 30, 0);
    let (test_images, test_labels) = write_idx(&dir.path().join("data"), "test", 12, 100);
    let output = dir.path().join("run");

    let mut config = tiny_config(&output, &train_images);
    config.data.train = idx_source(train_images, train_labels);
    config.data.validation = Some(idx_source(test_images.clone(), test_labels.clone()));
    config.steps = 12;
    config.eval.every = 6;
    config.eval.accuracy_every_eval = true;
    config.eval.batch_size = Some(5);
    let summary = train(config, &StopFlag::new()).unwrap();

    let report = summary.evaluation.expect("validation data was given");
    assert_eq!(report.samples, 12);
    assert!(report.complete);
    let accuracy = report.accuracy.as_ref().expect("IDX data has labels");
    assert_eq!(accuracy.total, 12);
    assert_eq!(accuracy.prompt, "<image>Output:");
    assert_eq!(accuracy.correct + accuracy.wrong_class + accuracy.no_class + accuracy.several_classes, 12);
    assert_eq!(accuracy.per_class.iter().map(|c| c.total).sum::<u64>(), 12);
    assert_eq!(accuracy.per_class.iter().map(|c| c.total).collect::<Vec<_>>(), [4, 4, 4]);
    assert_eq!(accuracy.confusion.len(), 3);
    assert_eq!(accuracy.confusion_columns.len(), 5);
    for (row, class) in accuracy.confusion.iter().zip(&accuracy.per_class) {
        assert_eq!(row.iter().sum::<u64>(), class.total);
        assert_eq!(row[class.label], class.correct);
    }
    assert_eq!(accuracy.examples.len(), 12, "up to max_examples (20) predictions are listed");
    assert!((accuracy.accuracy - accuracy.correct as f64 / 12.0).abs() < 1e-12);

    // The evaluation at step 6 and the final one are in the metrics.
    let evals: Vec<u64> = flamingo_train::metrics::read_metrics(&output.join("metrics.jsonl"))
        .unwrap()
        .into_iter()
        .filter_map(|r| match r {
            flamingo_train::MetricsRecord::Eval(e) => Some(e.step),
            _ => None,
        })
        .collect();
    assert_eq!(evals, [6, 12]);

    // The saved checkpoint, evaluated on its own, gives the same report.
    let checkpoint = output.join("checkpoints/step-000012");
    let report_path = dir.path().join("report.json");
    let mut eval_config = EvaluateConfig::new(&checkpoint, idx_source(test_images, test_labels));
    eval_config.device = "cpu".into();
    eval_config.eval.batch_size = Some(7);
    eval_config.eval.max_new_tokens = 4;
    eval_config.report = Some(report_path.clone());
    eval_config.progress_bar = false;
    let standalone = evaluate(&eval_config, &StopFlag::new()).unwrap();
    assert_eq!(standalone.step, 12);
    assert_eq!(standalone.accuracy.as_ref().unwrap().correct, accuracy.correct);
    assert_eq!(standalone.accuracy.as_ref().unwrap().examples, accuracy.examples, "greedy captions do not depend on the batch size");
    let (a, b) = (standalone.validation_loss.unwrap(), report.validation_loss.unwrap());
    assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "validation loss {a} from the checkpoint, {b} in training");
    let written: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report_path).unwrap()).unwrap();
    assert_eq!(written["accuracy"]["total"], 12);
}

#[test]
fn limit_per_class_balances_classes() {
    let dir = tempfile::tempdir().unwrap();
    let (images, labels) = write_idx(&dir.path().join("data"), "train", 30, 0);
    let mut source = idx_source(images, labels);
    source.limit_per_class = Some(2);
    let (opened, names) = flamingo_train::sources::open_evaluation_source(&source, "<image>Output:{caption}<|endofchunk|>", "A photo of {article} {class}.", 5).unwrap();
    assert_eq!(opened.records(), Some(6));
    assert_eq!(names.unwrap(), CLASSES);
    let flamingo_train::sources::Source::Indexed(dataset) = opened else { panic!("IDX data is indexed") };
    let mut per_class = [0; 3];
    for index in 0..dataset.len() {
        per_class[dataset.get(index).unwrap().label.unwrap() as usize] += 1;
    }
    assert_eq!(per_class, [2, 2, 2]);
    let sample = dataset.get(0).unwrap();
    let class = CLASSES[sample.label.unwrap() as usize];
    assert_eq!(sample.text, format!("<image>Output:A photo of a {class}.<|endofchunk|>"));
}

/// One of the evaluation entry points of `flamingo_train::eval`.
type Evaluation = fn(
    &mut EvalContext,
    &mut dyn Iterator<Item = Result<Sample, DataError>>,
    Option<usize>,
    &EvalOptions,
    u64,
    &StopFlag,
) -> flamingo_train::Result<EvalReport>;

/// A new connector around the tiny fixture LM and CLIP: every gate is 0.
fn tiny_flamingo(device: &Device, encoder: &VisionEncoder) -> Flamingo {
    let (lm, tokenizer, special) = LanguageModel::load(device, &tiny_llama()).unwrap();
    let config = FlamingoConfig {
        resampler: ResamplerConfig { dim: encoder.output_dim(), depth: 1, heads: 2, dim_head: 8, num_latents: 4, ff_mult: 1, ..ResamplerConfig::default() },
        cross_attn_every_n_layers: 1,
        cross_attn_heads: 2,
        cross_attn_dim_head: 8,
        cross_attn_ff_mult: 1,
        cross_attn_layout: Default::default(),
    };
    Flamingo::new(lm, tokenizer, special, config, 3).unwrap()
}

/// Evaluates `dataset` with `evaluation`, from fresh caches, with the times zeroed.
fn evaluate_with(evaluation: Evaluation, model: &Flamingo, encoder: &Arc<VisionEncoder>, dataset: &Arc<dyn IndexedDataset>, matcher: &ClassMatcher) -> flamingo_train::Result<EvalReport> {
    let mut cache = FeatureCache::transient(encoder.num_tokens(), encoder.output_dim());
    let mut extractor = FeatureExtractor::new(encoder.clone(), model.device().clone(), 4);
    let mut text = TextEncoder::new(CaptionLayout::new(&PromptTemplate::default()));
    let mut context = EvalContext { model, cache: &mut cache, extractor: &mut extractor, text: &mut text, matcher: Some(matcher), precomputed: false };
    let mut samples = Loader::new(dataset.clone(), LoaderConfig { shuffle: false, seed: 5 }).unwrap();
    let options = EvalOptions { batch_size: 5, max_samples: None, accuracy: true, max_new_tokens: 4, max_examples: 20, progress_bar: false };
    let mut report = evaluation(&mut context, &mut samples, Some(dataset.len()), &options, 0, &StopFlag::new())?;
    report.seconds = 0.0;
    if let Some(accuracy) = report.accuracy.as_mut() {
        accuracy.generation_seconds = 0.0;
    }
    Ok(report)
}

/// Asserts that two reports are equal, the validation loss up to float rounding.
fn assert_same_report(mut a: EvalReport, b: EvalReport) {
    let (loss_a, loss_b) = (a.validation_loss.unwrap(), b.validation_loss.unwrap());
    assert!((loss_a - loss_b).abs() <= 1e-5 * loss_b.abs().max(1.0), "validation loss {loss_a} against {loss_b}");
    a.validation_loss = b.validation_loss;
    assert_eq!(a, b);
}

#[test]
fn closed_gates_match_full_evaluation() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let (images, labels) = write_idx(&dir.path().join("data"), "test", 12, 100);
    let (source, names) = open_evaluation_source(&idx_source(images, labels), PromptTemplate::DEFAULT, ClassTemplate::DEFAULT, 5).unwrap();
    let Source::Indexed(dataset) = source else { panic!("IDX data is indexed") };
    let matcher = ClassMatcher::new(&names.expect("IDX data has class names"));
    let device = Device::open(DeviceRequest::Cpu).unwrap();
    let encoder = Arc::new(VisionEncoder::load(&device, tiny_clip(), VisionOptions::default()).unwrap());
    let mut model = tiny_flamingo(&device, &encoder);

    // Every gate is 0: 12 samples with 3 distinct texts, in chunks of 5.
    let full = evaluate_with(run_full_evaluation, &model, &encoder, &dataset, &matcher).unwrap();
    let text_only = evaluate_with(run_text_only_evaluation, &model, &encoder, &dataset, &matcher).unwrap();
    let chosen = evaluate_with(run_evaluation, &model, &encoder, &dataset, &matcher).unwrap();
    assert_eq!(full.samples, 12);
    assert_eq!(full.accuracy.as_ref().unwrap().total, 12);
    assert_eq!(full.accuracy.as_ref().unwrap().examples.len(), 12);
    assert_same_report(text_only, full.clone());
    assert_same_report(chosen, full);

    // One open gate lets the images matter: the shortcut returns an error, and
    // run_evaluation takes the full path.
    let gate = model.params().params().iter().find(|p| p.name.ends_with("attn_gate")).unwrap().name.clone();
    model.params_mut().set(&gate, &HostTensor::from_f32(vec![1], vec![0.5]).unwrap()).unwrap();
    let error = evaluate_with(run_text_only_evaluation, &model, &encoder, &dataset, &matcher).unwrap_err();
    assert!(error.to_string().contains("every gate"), "{error}");
    let full = evaluate_with(run_full_evaluation, &model, &encoder, &dataset, &matcher).unwrap();
    let chosen = evaluate_with(run_evaluation, &model, &encoder, &dataset, &matcher).unwrap();
    assert_eq!(chosen, full);
}
