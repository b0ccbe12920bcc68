//! Caption accuracy on class-caption data (IDX files written here), during
//! training and from a saved checkpoint.

mod train_support;

use std::path::{Path, PathBuf};

use flamingo_train::{evaluate, train, DataFormat, DataSource, EvaluateConfig, StopFlag};
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
