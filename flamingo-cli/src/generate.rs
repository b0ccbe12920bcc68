//! `flamingo generate`: continue a prompt, reading images for its `<image>` markers.

use std::path::PathBuf;

use anyhow::Context;
use flamingo_kernels::Device;
use flamingo_model::flamingo::{Flamingo, FlamingoConfig, GenerationConfig, ResamplerConfig};
use flamingo_model::lm::LanguageModel;
use flamingo_model::loader::IMAGE_TOKEN;
use flamingo_model::FlamingoPipeline;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The frozen language model: a Hugging Face folder or a .gguf file.
    /// Optional with --checkpoint, which records the one it was trained with.
    #[arg(long)]
    lm: Option<PathBuf>,
    /// The frozen vision encoder: a Hugging Face CLIP/SigLIP folder or a
    /// MobileNetV2 safetensors file. Optional with --checkpoint.
    #[arg(long)]
    vision: Option<PathBuf>,
    /// A connector checkpoint folder (holding connector.json). Without it the
    /// plain language model runs.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// An image file for each <image> marker of the prompt, in order.
    #[arg(long = "image")]
    images: Vec<PathBuf>,
    /// The text to continue; <image> marks where each image goes.
    #[arg(long)]
    prompt: String,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 picks the most likely token every time.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    temperature: f32,
    /// Sample only among the K most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to P.
    #[arg(long)]
    top_p: Option<f32>,
    /// Beam search with this many beams, at most 32 (1 turns it off).
    #[arg(long, default_value_t = 1)]
    beams: usize,
    /// Beam scores are log-probabilities divided by length to this power.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    length_penalty: f32,
    /// Stop when the output contains this text (repeatable); it is cut off.
    #[arg(long = "stop")]
    stop_strings: Vec<String>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// The largest `--beams` value accepted; each beam keeps its own KV cache.
const MAX_BEAMS: usize = 32;

/// Rejects sampling settings that are out of range or that contradict each other.
fn check_sampling(args: &Args) -> anyhow::Result<()> {
    if !args.temperature.is_finite() || args.temperature < 0.0 {
        anyhow::bail!("--temperature {} is invalid; use 0 for greedy decoding or a positive number such as 0.8", args.temperature);
    }
    if args.top_k == Some(0) {
        anyhow::bail!("--top-k 0 keeps no token; use 1 or more, or leave it out");
    }
    if let Some(top_p) = args.top_p {
        if !(top_p > 0.0 && top_p <= 1.0) {
            anyhow::bail!("--top-p {top_p} is invalid; it is a probability mass above 0 and at most 1, such as 0.9");
        }
    }
    if args.beams == 0 || args.beams > MAX_BEAMS {
        anyhow::bail!("--beams {} is invalid; use 1 (no beam search) to {MAX_BEAMS}", args.beams);
    }
    if !args.length_penalty.is_finite() {
        anyhow::bail!("--length-penalty {} is invalid; use a finite number such as 1.0", args.length_penalty);
    }
    let sampling = args.temperature > 0.0 || args.top_k.is_some() || args.top_p.is_some();
    if args.beams > 1 && sampling {
        anyhow::bail!("--beams {} searches deterministically, so --temperature, --top-k and --top-p do not apply; drop them or use --beams 1", args.beams);
    }
    Ok(())
}

pub fn run(device: Device, args: Args) -> anyhow::Result<()> {
    let markers = args.prompt.matches(IMAGE_TOKEN).count();
    if markers != args.images.len() {
        anyhow::bail!(
            "the prompt has {markers} {IMAGE_TOKEN} marker(s) but {} --image file(s) were given; give one image per marker",
            args.images.len()
        );
    }
    check_sampling(&args)?;
    let mut config = GenerationConfig {
        max_new_tokens: args.max_new_tokens,
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        num_beams: args.beams,
        length_penalty: args.length_penalty,
        stop_strings: args.stop_strings.clone(),
        suppress_tokens: Vec::new(),
        stop_token_ids: None,
        seed: args.seed,
    };

    let output = match &args.checkpoint {
        Some(checkpoint) => {
            // The images are decoded first, so a wrong path fails before the models load.
            let images = args
                .images
                .iter()
                .map(|path| FlamingoPipeline::open_image(path).map_err(|error| anyhow::anyhow!("--image {error}")))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let model = FlamingoPipeline::load(&device, checkpoint, args.lm.as_deref(), args.vision.as_deref())?;
            model.generate(&args.prompt, &images, &config)?
        }
        None => {
            if markers > 0 {
                anyhow::bail!("images need a trained connector; pass --checkpoint (and --vision if it is not recorded there)");
            }
            if args.vision.is_some() {
                anyhow::bail!("--vision needs --checkpoint: without a trained connector the language model cannot see");
            }
            let lm_path = args.lm.as_ref().context("pass --lm with a Hugging Face folder or a .gguf file")?;
            let (lm, tokenizer, special) = LanguageModel::load(&device, lm_path)?;
            let width = 8;
            let connector = FlamingoConfig {
                resampler: ResamplerConfig { dim: width, depth: 1, heads: 1, dim_head: width, num_latents: 1, ff_mult: 1, max_num_media: 1, max_num_frames: 1, ..ResamplerConfig::default() },
                cross_attn_every_n_layers: lm.summary().num_layers,
                cross_attn_heads: 1,
                cross_attn_dim_head: width,
                cross_attn_ff_mult: 1,
                cross_attn_layout: Default::default(),
            };
            // An untrained connector has every gate at 0, so this is the plain
            // LM; its two added tokens are never generated.
            let model = Flamingo::new(lm, tokenizer, special, connector, 0)?;
            config.suppress_tokens = vec![model.image_id, model.end_of_chunk_id];
            let ids = model.encode_prompt(&args.prompt)?;
            model.generate(&[ids], None, &config)?.remove(0)
        }
    };
    println!("{}", output.text);
    Ok(())
}
