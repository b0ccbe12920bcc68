//! `flamingo demo`: the main job on real data, with no arguments.
//!
//! ```text
//! 1. find SmolLM2-135M-Instruct, nsfwjs's MobileNetV2 and Fashion-MNIST in
//!    the cache, running scripts/fetch-assets.sh once when one is missing
//! 2. convert the MobileNetV2 to timm's safetensors layout (once)
//! 3. measure caption accuracy with every gate at 0 (the frozen LM alone),
//!    then train the connector on Fashion-MNIST training images captioned
//!    "A photo of a sneaker." and the like
//! 4. measure caption accuracy on 500 held-out test images (50 per class)
//! 5. show a few held-out captions and one few-shot prompt
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;
use flamingo_model::convert::nsfwjs::convert_nsfwjs_mobilenet_v2;
use flamingo_model::flamingo::GenerationConfig;
use flamingo_model::FlamingoPipeline;
use flamingo_train::accuracy::Verdict;
use flamingo_train::config::default_cache_root;
use flamingo_train::data::{FashionMnistSplit, IdxConfig, IdxDataset, IndexedDataset, Media};
use flamingo_train::{
    DataConfig, DataFormat, DataSource, DecayKind, EvalReport, ModelConfig, StopFlag, TrainConfig, TrainSummary, Trainer, NoObserver,
};
use image::DynamicImage;

use crate::train::stop_on_ctrl_c;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Output folder; default: the first free runs/demo-N.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the interrupted demo in --out from its last checkpoint.
    #[arg(long, requires = "out")]
    resume: bool,
    /// The longer recipe: more steps and training images, for higher accuracy.
    #[arg(long)]
    long: bool,
    /// Optimizer steps; default 500, or 3000 with --long.
    #[arg(long)]
    steps: Option<u64>,
    /// Training images per class; default 500, or 3000 with --long.
    #[arg(long)]
    train_per_class: Option<usize>,
    /// Held-out test images per class for caption accuracy.
    #[arg(long, default_value_t = 50)]
    test_per_class: usize,
    /// Do not run scripts/fetch-assets.sh; fail if an asset is missing.
    #[arg(long)]
    no_fetch: bool,
    /// Do not draw progress bars.
    #[arg(long)]
    no_progress: bool,
}

/// The backbones and data the demo uses, all in the asset cache.
struct Assets {
    language_model: PathBuf,
    vision_encoder: PathBuf,
    fashion_mnist: PathBuf,
}

/// The training recipe, sized for a 2-core CPU.
struct Recipe {
    steps: u64,
    train_per_class: usize,
}

impl Recipe {
    fn new(args: &Args) -> Self {
        let (steps, train_per_class) = if args.long { (3000, 3000) } else { (500, 500) };
        Self { steps: args.steps.unwrap_or(steps), train_per_class: args.train_per_class.unwrap_or(train_per_class) }
    }

    /// Builds the training configuration. The resampler has one layer, a
    /// light cross-attention block goes before every third LM layer, and
    /// the gates learn faster than the rest.
    fn config(&self, assets: &Assets, out: &Path, device: &str, args: &Args) -> TrainConfig {
        let mut model = ModelConfig::new(&assets.language_model, &assets.vision_encoder);
        model.resampler_depth = 1;
        model.resampler_ff_mult = 1;
        model.num_latents = 32;
        model.cross_attn_every_n_layers = 3;
        model.cross_attn_ff_mult = 1;
        // Three media embeddings, so the few-shot prompt may hold three images.
        model.max_images = 3;

        let mut train = DataSource::with_path(DataFormat::FashionMnist, &assets.fashion_mnist);
        train.limit_per_class = Some(self.train_per_class);
        let mut test = DataSource::with_path(DataFormat::FashionMnist, &assets.fashion_mnist);
        test.split = Some("test".into());
        test.limit_per_class = Some(args.test_per_class);
        let mut data = DataConfig::new(train);
        data.validation = Some(test);

        let mut config = TrainConfig::new(out, model, data);
        config.resume = args.resume;
        config.device = device.to_string();
        config.steps = self.steps;
        config.batch_size = 16;
        config.optimizer.lr = 5e-4;
        // The first steps learn the caption's fixed words with gradients
        // ten times larger than later ones. With the usual β₂ of 0.999 the
        // second moment remembers them for hundreds of steps and shrinks
        // every later update, so a shorter memory learns much faster here.
        config.optimizer.beta2 = 0.95;
        config.optimizer.weight_decay = 0.01;
        config.optimizer.gate_lr_multiplier = 20.0;
        config.schedule.warmup_steps = 20;
        config.schedule.decay = DecayKind::Cosine;
        // The longer recipe's 30,500 images take about 3.6 GiB of f16
        // features, which stay in memory instead of a cache file on disk.
        config.features.memory_limit_mib = 4096;
        config.checkpoints.every = 100;
        config.checkpoints.keep_last = 2;
        config.logging.log_every = 25;
        config.logging.progress_bar = !args.no_progress;
        config.eval.at_start = true;
        config.eval.batch_size = Some(50);
        config.eval.max_new_tokens = 8;
        config
    }
}

pub fn run(device: &str, args: Args) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    if args.steps == Some(0) {
        anyhow::bail!("--steps must be at least 1");
    }
    let assets = find_assets(!args.no_fetch)?;
    let out = match &args.out {
        Some(out) => out.clone(),
        None => first_free_run_folder(Path::new("runs"))?,
    };
    let recipe = Recipe::new(&args);
    eprintln!(
        "demo: training for {} steps on {} Fashion-MNIST images per class, testing on {} per class; output in {}",
        recipe.steps,
        recipe.train_per_class,
        args.test_per_class,
        out.display()
    );

    let config = recipe.config(&assets, &out, device, &args);
    let stop = StopFlag::new();
    stop_on_ctrl_c(&stop)?;
    let summary = Trainer::new(config)?.run(&stop, &mut NoObserver)?;
    if summary.stopped {
        eprintln!("stopped at step {}; continue with: flamingo demo --out {} --resume{}", summary.last_step, out.display(), recipe_flags(&args));
        return Ok(());
    }

    // A resumed run measured the frozen LM before it was interrupted.
    let baseline = summary.baseline.clone().or_else(|| read_report(&out.join("eval-start.json")));
    report(&summary, baseline.as_ref(), args.test_per_class * 10);
    let checkpoint = summary.last_checkpoint.clone().context("the run wrote no checkpoint")?;
    few_shot(device, &checkpoint, &assets, &out)?;
    println!();
    println!("finished in {:.1} min; checkpoints, metrics, plots and eval.json are in {}", started.elapsed().as_secs_f64() / 60.0, out.display());
    Ok(())
}

/// Prints the accuracy before and after training and some predictions.
fn report(summary: &TrainSummary, baseline: Option<&EvalReport>, test_images: usize) {
    let accuracy = |report: Option<&EvalReport>| {
        report.and_then(|r| r.accuracy.as_ref()).map_or("not measured".to_string(), |a| {
            format!("{:5.1} % ({} of {})", 100.0 * a.accuracy, a.correct, a.total)
        })
    };
    println!();
    println!("Caption accuracy on {test_images} held-out Fashion-MNIST test images (the right class and no other):");
    println!("  frozen LM alone, every gate 0 : {}", accuracy(baseline));
    println!("  Flamingo after {:>4} steps     : {}", summary.last_step, accuracy(summary.evaluation.as_ref()));
    if let Some(ms) = summary.mean_step_ms {
        println!("  training: {:.0} ms per step, {:.0} s in all", ms, summary.train_seconds);
    }

    let Some(accuracy) = summary.evaluation.as_ref().and_then(|r| r.accuracy.as_ref()) else {
        return;
    };
    println!();
    println!("Held-out images, true class and generated caption:");
    for example in accuracy.examples.iter().take(10) {
        let mark = if example.verdict == Verdict::Correct { "right" } else { "wrong" };
        println!("  {:<12} {:<40} {mark}", example.class, format!("{:?}", example.text.trim()));
    }
}

/// Reads an evaluation report written by an earlier run, if it is there.
fn read_report(path: &Path) -> Option<EvalReport> {
    serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
}

/// Returns the flags that shape the recipe, as the user gave them, for the
/// command that continues a stopped run.
fn recipe_flags(args: &Args) -> String {
    let mut flags = String::new();
    if args.long {
        flags.push_str(" --long");
    }
    if let Some(steps) = args.steps {
        flags.push_str(&format!(" --steps {steps}"));
    }
    if let Some(count) = args.train_per_class {
        flags.push_str(&format!(" --train-per-class {count}"));
    }
    if args.test_per_class != 50 {
        flags.push_str(&format!(" --test-per-class {}", args.test_per_class));
    }
    flags
}

/// Prompts the trained model with two solved test images and a third to caption.
fn few_shot(device: &str, checkpoint: &Path, assets: &Assets, out: &Path) -> anyhow::Result<()> {
    let test = IdxDataset::fashion_mnist(&assets.fashion_mnist, FashionMnistSplit::Test, IdxConfig::fashion_mnist())?;
    let pick = |label: u8, nth: usize| test.labels().iter().enumerate().filter(|(_, &l)| l == label).nth(nth).map(|(i, _)| i);
    // The 901st test image of each class in file order. The scored images
    // are a seeded sample, so one of these may also be among them.
    let mut chosen = Vec::new();
    for label in [7u8, 8, 1] {
        let index = pick(label, 900).context("Fashion-MNIST's test set has 1000 images per class")?;
        chosen.push(index);
    }

    let folder = out.join("few-shot");
    std::fs::create_dir_all(&folder).with_context(|| format!("cannot create {}", folder.display()))?;
    let mut images = Vec::new();
    for (n, &index) in chosen.iter().enumerate() {
        let sample = test.get(index).map_err(|bad| anyhow::anyhow!("test image {index}: {bad}"))?;
        let Some(Media::Image(image)) = sample.media.into_iter().next() else {
            anyhow::bail!("test image {index} has no image");
        };
        let path = folder.join(format!("{}-{}.png", n + 1, test.class_names()[test.labels()[index] as usize].replace(' ', "-")));
        image.save(&path).with_context(|| format!("cannot write {}", path.display()))?;
        images.push(DynamicImage::ImageRgb8(image));
    }

    let device = crate::open_device(device)?;
    let pipeline = FlamingoPipeline::load(&device, checkpoint, None, None)?;
    let prompt = format!(
        "<image>Output:{}<|endofchunk|><image>Output:{}<|endofchunk|><image>Output:",
        test.caption(chosen[0]),
        test.caption(chosen[1])
    );
    let generation = pipeline.generate(&prompt, &images, &GenerationConfig { max_new_tokens: 12, ..GenerationConfig::default() })?;
    println!();
    println!("Few-shot prompt (images in {}):", folder.display());
    println!("  {prompt}");
    println!("  -> {:?} (the third image is a {})", generation.text.trim(), test.class_names()[test.labels()[chosen[2]] as usize]);
    Ok(())
}

/// Finds the cached assets, fetching them once if `fetch` allows, and
/// converts the MobileNetV2 when its safetensors file is missing.
fn find_assets(fetch: bool) -> anyhow::Result<Assets> {
    let cache = default_cache_root().context("cannot find a cache folder: set FLAMINGO_CACHE or HOME")?;
    let language_model = cache.join("smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let nsfwjs = cache.join("nsfwjs/mobilenet_v2");
    let fashion_mnist = cache.join("fashion-mnist");
    let present = |path: &Path| path.exists();
    let complete = present(&language_model) && present(&nsfwjs.join("model.min.js")) && present(&fashion_mnist.join("t10k-labels-idx1-ubyte.gz"));
    if !complete {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/fetch-assets.sh");
        if !fetch || !script.is_file() {
            anyhow::bail!(
                "the demo's assets are not all in {}; run scripts/fetch-assets.sh from the repository first",
                cache.display()
            );
        }
        eprintln!("demo: fetching SmolLM2, MobileNetV2 and Fashion-MNIST into {} (once)", cache.display());
        let status = Command::new("bash").arg(&script).env("FLAMINGO_CACHE", &cache).status().with_context(|| format!("cannot run {}", script.display()))?;
        if !status.success() {
            anyhow::bail!("{} failed ({status}); see its messages above", script.display());
        }
    }

    let vision_encoder = cache.join("nsfwjs/mobilenet_v2.safetensors");
    if !vision_encoder.exists() {
        eprintln!("demo: converting nsfwjs's MobileNetV2 to {}", vision_encoder.display());
        convert_nsfwjs_mobilenet_v2(&nsfwjs, &vision_encoder, false)
            .with_context(|| format!("converting {} (delete {} and retry if it is damaged)", nsfwjs.display(), vision_encoder.display()))?;
    }
    Ok(Assets { language_model, vision_encoder, fashion_mnist })
}

/// Returns `root/demo-N` for the smallest N that does not exist yet.
fn first_free_run_folder(root: &Path) -> anyhow::Result<PathBuf> {
    (1..10_000).map(|n| root.join(format!("demo-{n}"))).find(|path| !path.exists()).context("runs/demo-1 to runs/demo-9999 all exist; pass --out")
}
