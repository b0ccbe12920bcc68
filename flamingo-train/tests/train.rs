//! End-to-end training on the tiny fixture LM and CLIP with generated
//! images: the loss falls, the backbones stay frozen, a resumed run repeats
//! an uninterrupted one exactly, and an interrupted checkpoint write leaves
//! the previous checkpoint usable.

mod train_support;

use std::path::Path;

use flamingo_kernels::Device;
use flamingo_model::flamingo::checkpoint::sha256_path;
use flamingo_train::checkpoint::{self, read_header};
use flamingo_train::{train, StopFlag, TrainError, TrainObserver, Trainer};
use train_support::*;

/// Logits of a fixed token sequence from the frozen LM alone.
fn lm_probe(trainer: &Trainer) -> Vec<f32> {
    let device = trainer.model().device();
    let ids = device.from_u32(vec![1, 5], vec![5, 6, 7, 8, 9]).unwrap();
    let positions = device.from_u32(vec![1, 5], vec![0, 1, 2, 3, 4]).unwrap();
    trainer.model().lm.forward(&ids, &positions, None).unwrap().to_vec_f32().unwrap()
}

/// Visual tokens of a fixed image from the frozen encoder.
fn encoder_probe(trainer: &Trainer) -> Vec<f32> {
    let image = image::DynamicImage::ImageRgb8(colour_image([90, 120, 200], 99));
    let pixels = trainer.encoder().preprocess_batch(&[image]).unwrap();
    let pixels = trainer.model().device().upload(&pixels).unwrap();
    trainer.encoder().encode(&pixels).unwrap().to_vec_f32().unwrap()
}

#[test]
fn loss_falls_and_backbones_stay_frozen() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 24);
    let output = dir.path().join("run");
    let config = tiny_config(&output, &manifest);
    let files_before = (sha256_path(&tiny_llama()).unwrap(), sha256_path(&tiny_clip()).unwrap());

    let mut trainer = Trainer::new(config).unwrap();
    let (lm_before, encoder_before) = (lm_probe(&trainer), encoder_probe(&trainer));
    let embedding_before = trainer.model().lm.token_embedding().to_vec_f32().unwrap();
    let held = trainer.optimizer_summary();
    assert_eq!(held.elements, trainer.model().params().num_elements(), "the optimizer must hold every trainable element");
    assert_eq!(held.tensors, trainer.model().params().params().len());
    for group in &held.groups {
        assert!(group.tensors > 0, "group {:?} is empty", group.group);
    }

    let summary = trainer.run(&StopFlag::new(), &mut flamingo_train::NoObserver).unwrap();
    assert_eq!(summary.last_step, 30);
    assert!(!summary.stopped);

    let losses = losses(&output.join("metrics.jsonl"));
    assert_eq!(losses.len(), 30);
    let first: f32 = losses[..5].iter().map(|(_, l)| l).sum::<f32>() / 5.0;
    let last: f32 = losses[25..].iter().map(|(_, l)| l).sum::<f32>() / 5.0;
    assert!(last < 0.6 * first, "the loss should fall: first five steps {first:.3}, last five {last:.3}");

    assert_eq!(lm_probe(&trainer), lm_before, "the frozen LM's output changed");
    assert_eq!(encoder_probe(&trainer), encoder_before, "the frozen encoder's output changed");
    assert_eq!(trainer.model().lm.token_embedding().to_vec_f32().unwrap(), embedding_before, "the frozen embedding changed");
    let files_after = (sha256_path(&tiny_llama()).unwrap(), sha256_path(&tiny_clip()).unwrap());
    assert_eq!(files_before, files_after, "the backbone files changed");

    // Checkpoints every 10 steps, the last two kept, with a header and the optimizer state.
    let kept: Vec<u64> = checkpoint::list(&output.join("checkpoints")).unwrap().into_iter().map(|(step, _)| step).collect();
    assert_eq!(kept, [20, 30]);
    let last = output.join("checkpoints/step-000030");
    let header = read_header(&last).unwrap();
    assert_eq!(header.step, 30);
    assert_eq!(header.language_model.sha256, files_before.0);
    assert_eq!(header.vision_encoder.sha256, files_before.1);
    assert_eq!(header.optimizer, held);
    assert_eq!(summary.last_checkpoint.as_deref(), Some(last.as_path()));

    // The saved connector loads into a fresh model and reproduces the gates.
    let device = Device::cpu();
    let (lm, tokenizer, special) = flamingo_model::lm::LanguageModel::load(&device, &tiny_llama()).unwrap();
    let mut fresh = flamingo_model::flamingo::Flamingo::new(lm, tokenizer, special, trainer.model().config.clone(), 1).unwrap();
    let manifest = fresh.load_connector(&last).unwrap();
    assert_eq!(manifest.step, 30);
    assert_eq!(manifest.caption_prompt.as_deref(), Some("<image>Output:"));
    assert_eq!(fresh.gate_values().unwrap(), trainer.model().gate_values().unwrap());

    for file in ["metrics.jsonl", "loss.png", "lr.png", "gates.png", "eval.json", "summary.json", "config.toml"] {
        assert!(output.join(file).is_file(), "{file} is missing");
    }
    let evaluation = summary.evaluation.expect("20 % of the data is held out for validation");
    assert!(evaluation.validation_loss.is_some());
    assert!(evaluation.accuracy.is_none(), "pairs without class labels have no caption accuracy");
}

#[test]
fn resume_matches_uninterrupted_run() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 14);
    let configure = |name: &str| {
        let mut config = tiny_config(&dir.path().join(name), &manifest);
        config.steps = 16;
        config.batch_size = 3;
        config.gradient_accumulation = 2;
        config.optimizer.max_grad_norm = 0.5;
        config.optimizer.gate_lr_multiplier = 10.0;
        config.schedule.warmup_steps = 3;
        config.schedule.decay = flamingo_train::DecayKind::Cosine;
        config.checkpoints.every = 8;
        config.checkpoints.keep_last = 0;
        config
    };

    let whole = train(configure("whole"), &StopFlag::new()).unwrap();
    assert_eq!(whole.last_step, 16);

    // Stopped after step 6: a checkpoint of step 6 is written and the run ends cleanly.
    let split = configure("split");
    let stop = StopFlag::new();
    let first = Trainer::new(split.clone()).unwrap().run(&stop, &mut StopAt(6)).unwrap();
    assert!(first.stopped);
    assert_eq!(first.last_step, 6);
    assert!(first.evaluation.is_none(), "a stopped run skips the final evaluation");
    let steps: Vec<u64> = checkpoint::list(&split.checkpoint_dir()).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [6]);

    let mut resumed_config = split.clone();
    resumed_config.resume = true;
    let mut resumed = Trainer::new(resumed_config).unwrap();
    assert_eq!(resumed.start_step(), 6);
    let second = resumed.run(&StopFlag::new(), &mut flamingo_train::NoObserver).unwrap();
    assert_eq!((second.first_step, second.last_step), (6, 16));

    let expected = flamingo_train::metrics::read_metrics(&dir.path().join("whole/metrics.jsonl")).unwrap();
    let found = flamingo_train::metrics::read_metrics(&dir.path().join("split/metrics.jsonl")).unwrap();
    let steps = |records: &[flamingo_train::MetricsRecord]| -> Vec<(u64, f32, f32, f32)> {
        records
            .iter()
            .filter_map(|r| match r {
                flamingo_train::MetricsRecord::Step(s) => Some((s.step, s.loss, s.lr, s.grad_norm)),
                _ => None,
            })
            .collect()
    };
    assert_eq!(steps(&found), steps(&expected), "(step, loss, lr, grad norm) after a resume must equal the uninterrupted run's");

    let tensors = |run: &str| std::fs::read(dir.path().join(run).join("checkpoints/step-000016/connector.safetensors")).unwrap();
    assert!(tensors("split") == tensors("whole"), "the final connector tensors differ");
    let moments = |run: &str| std::fs::read(dir.path().join(run).join("checkpoints/step-000016/optimizer.safetensors")).unwrap();
    assert!(moments("split") == moments("whole"), "the final optimizer state differs");
    assert_eq!(second.evaluation.unwrap().validation_loss, whole.evaluation.unwrap().validation_loss);

    // Resuming a finished run trains nothing and reports its final checkpoint.
    let mut finished_config = split.clone();
    finished_config.resume = true;
    let third = train(finished_config, &StopFlag::new()).unwrap();
    assert_eq!((third.first_step, third.last_step), (16, 16));
    assert_eq!(third.last_checkpoint, Some(split.checkpoint_dir().join("step-000016")));
}

/// Fails the commit of the checkpoint of step `at`, as a crash between
/// writing the files and renaming the folder would.
struct FailCommitAt {
    at: u64,
    abort: bool,
}

impl TrainObserver for FailCommitAt {
    fn before_checkpoint_commit(&mut self, staged: &Path, step: u64) -> Result<(), String> {
        if step != self.at {
            return Ok(());
        }
        assert!(staged.join("trainer.json").is_file(), "every file is written before the commit");
        if self.abort {
            std::process::abort();
        }
        Err(format!("injected failure before publishing step {step}"))
    }
}

/// Checks that the run in `output` has step 10 published, step 20 not, and
/// that a resume continues from step 10 to the end.
fn check_previous_checkpoint_survives(output: &Path, manifest: &Path) {
    let checkpoints = output.join("checkpoints");
    let steps: Vec<u64> = checkpoint::list(&checkpoints).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [10], "only the checkpoint before the failed write is published");
    assert!(checkpoints.join(".step-000020.partial").is_dir(), "the unpublished write stays under its temporary name");

    let folder = checkpoints.join("step-000010");
    let header = read_header(&folder).unwrap();
    assert_eq!(header.step, 10);
    let device = Device::cpu();
    let (lm, tokenizer, special) = flamingo_model::lm::LanguageModel::load(&device, &tiny_llama()).unwrap();
    let config = flamingo_model::flamingo::ConnectorManifest::read(&folder).unwrap().flamingo;
    let mut model = flamingo_model::flamingo::Flamingo::new(lm, tokenizer, special, config, 0).unwrap();
    model.load_connector(&folder).unwrap();

    let mut resume = tiny_config(output, manifest);
    resume.resume = true;
    let summary = train(resume, &StopFlag::new()).unwrap();
    assert_eq!((summary.first_step, summary.last_step), (10, 30));
    assert!(!checkpoints.join(".step-000020.partial").exists(), "the next run removes the temporary folder");
    let steps: Vec<u64> = checkpoint::list(&checkpoints).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps, [20, 30]);
}

#[test]
fn failed_commit_keeps_previous_checkpoint() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 12);
    let output = dir.path().join("run");

    let mut trainer = Trainer::new(tiny_config(&output, &manifest)).unwrap();
    let error = trainer.run(&StopFlag::new(), &mut FailCommitAt { at: 20, abort: false }).unwrap_err();
    assert!(matches!(error, TrainError::Observer(_)), "{error}");
    check_previous_checkpoint_survives(&output, &manifest);
}

/// The environment variable that makes this test binary the child that crashes.
const CRASH_CHILD: &str = "FLAMINGO_TRAIN_TEST_CRASH_DIR";

#[test]
fn crash_during_checkpoint_write_keeps_previous() {
    if let Some(dir) = std::env::var_os(CRASH_CHILD) {
        // The child: train until the checkpoint of step 20 is written but
        // not yet renamed, then abort the process.
        let dir = Path::new(&dir);
        let config = tiny_config(&dir.join("run"), &dir.join("data/pairs.jsonl"));
        let _ = Trainer::new(config).unwrap().run(&StopFlag::new(), &mut FailCommitAt { at: 20, abort: true });
        unreachable!("the child aborts before the checkpoint of step 20 is published");
    }

    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 12);
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["crash_during_checkpoint_write_keeps_previous", "--exact", "--test-threads=1", "--nocapture"])
        .env(CRASH_CHILD, dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the child must die in the checkpoint write");
    check_previous_checkpoint_survives(&dir.path().join("run"), &manifest);
}

#[test]
fn non_finite_loss_names_the_step() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 8);
    let output = dir.path().join("run");
    let mut config = tiny_config(&output, &manifest);
    // A rate of 1e30 throws the weights far enough for f32 to overflow.
    config.optimizer.lr = 1e30;
    config.optimizer.max_grad_norm = 0.0;
    config.checkpoints.every = 1;
    config.checkpoints.keep_last = 0;
    config.data.validation_fraction = 0.0;

    let error = train(config, &StopFlag::new()).unwrap_err();
    let (step, last) = match &error {
        TrainError::NonFiniteLoss { step, last_checkpoint, .. } | TrainError::NonFiniteGradient { step, last_checkpoint, .. } => (*step, last_checkpoint.clone()),
        other => panic!("expected a non-finite loss, got: {other}"),
    };
    let message = error.to_string();
    assert!(message.contains(&format!("step {step}")), "{message}");
    assert!(step >= 2, "step 1 starts from finite weights");
    let previous = output.join(format!("checkpoints/step-{:06}", step - 1));
    assert_eq!(last.as_deref(), Some(previous.as_path()), "{message}");
    assert!(message.contains(&previous.display().to_string()), "{message}");

    let steps: Vec<u64> = checkpoint::list(&output.join("checkpoints")).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(steps.last(), Some(&(step - 1)), "nothing of the failed step is saved");
    assert_eq!(read_header(&previous).unwrap().step, step - 1);
}

#[test]
fn fresh_run_refuses_used_folder() {
    let dir = tempfile::tempdir().unwrap();
    let manifest = write_colour_dataset(&dir.path().join("data"), 8);
    let output = dir.path().join("run");
    let mut config = tiny_config(&output, &manifest);
    config.steps = 2;
    train(config.clone(), &StopFlag::new()).unwrap();

    let error = Trainer::new(config.clone()).err().expect("a second fresh run in the same folder must fail");
    assert!(error.to_string().contains("already holds checkpoints up to step 2"), "{error}");

    let mut elsewhere = config;
    elsewhere.output_dir = dir.path().join("other");
    elsewhere.resume = true;
    let error = Trainer::new(elsewhere).err().expect("resuming without a checkpoint must fail");
    assert!(error.to_string().contains("no checkpoint to resume from"), "{error}");
}
