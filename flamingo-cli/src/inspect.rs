//! `flamingo inspect`: what a safetensors file, a GGUF file or a checkpoint folder holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flamingo_model::flamingo::{ConnectorManifest, CrossAttentionLayout, FlamingoConfig, CONNECTOR_MANIFEST, CONNECTOR_WEIGHTS};
use flamingo_model::loader::{
    starts_like_safetensors, starts_with_gguf_magic, tokenizer_from_gguf, GgufFile, GgufValue, SafetensorsWeights, SpecialTokens, WeightSource,
};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// A .safetensors file, a Hugging Face folder, a .gguf file or a checkpoint folder.
    path: PathBuf,
    /// List at most this many tensors (0 lists none).
    #[arg(long, default_value_t = 40)]
    tensors: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let path = &args.path;
    if !path.exists() {
        anyhow::bail!("{} does not exist", path.display());
    }
    if path.is_dir() && path.join(CONNECTOR_MANIFEST).exists() {
        return inspect_checkpoint(path, args.tensors);
    }
    if path.is_file() {
        if starts_with_gguf_magic(path)? {
            return inspect_gguf(path, args.tensors);
        }
        if has_extension(path, "gguf") {
            anyhow::bail!(
                "{} is named .gguf but does not start with the GGUF magic bytes, so it is damaged or not a GGUF file; download or convert it again",
                path.display()
            );
        }
        // A file named .safetensors, or one that starts like one, goes to the
        // safetensors reader, whose errors name a truncated or damaged header.
        let safetensors = has_extension(path, "safetensors") || path.to_string_lossy().ends_with(".index.json") || starts_like_safetensors(path)?;
        if !safetensors {
            anyhow::bail!(
                "{} is neither GGUF nor safetensors: it starts with neither the GGUF magic bytes nor a safetensors header; \
                 inspect reads .gguf and .safetensors files, Hugging Face folders and checkpoint folders",
                path.display()
            );
        }
    }
    let weights = SafetensorsWeights::open(path)?;
    println!("{}", weights.origin());
    for (key, value) in weights.metadata() {
        println!("  metadata {key}: {value}");
    }
    list_tensors(&weights, args.tensors, |name| weights.dtype(name).map(|dtype| dtype.to_string()).unwrap_or_default())
}

fn inspect_gguf(path: &Path, limit: usize) -> anyhow::Result<()> {
    let gguf = GgufFile::open(path)?;
    println!("{}: GGUF version {}, alignment {}", path.display(), gguf.version(), gguf.alignment());
    println!("  architecture: {}", gguf.architecture().unwrap_or("(none)"));
    if let Ok(Some(name)) = gguf.get_str("general.name") {
        println!("  name: {name}");
    }
    let architecture = gguf.architecture().unwrap_or("").to_string();
    for (key, value) in gguf.metadata() {
        let shown = key.starts_with(&format!("{architecture}.")) || key.starts_with("tokenizer.ggml.") && !is_long_array(value);
        if shown {
            println!("  {key}: {}", plain_value(value));
        }
    }
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for info in gguf.tensor_infos() {
        let entry = by_type.entry(info.ggml_type().name().to_string()).or_default();
        entry.0 += 1;
        entry.1 += info.n_elements() as u64;
    }
    for (ty, (count, elements)) in &by_type {
        println!("  {} of type {ty}, {}", counted(*count as u64, "tensor"), counted(*elements, "parameter"));
    }
    match tokenizer_from_gguf(&gguf) {
        Ok(tokenizer) => {
            let special = SpecialTokens::from_gguf(&gguf, &tokenizer)?;
            let id = |token: Option<u32>| token.map_or("none".to_string(), |id| id.to_string());
            println!(
                "  tokenizer: {}; beginning of sequence {}, end of sequence {}, padding {}",
                counted(tokenizer.get_vocab_size(true) as u64, "token"),
                id(special.bos),
                id(special.eos),
                id(special.pad)
            );
            let named: Vec<String> = special.named.iter().map(|(k, v)| format!("{k}={v}")).collect();
            match named.is_empty() {
                true => println!("  special tokens: none"),
                false => println!("  special tokens: {}", named.join(", ")),
            }
        }
        Err(error) => println!("  tokenizer: cannot be built ({error})"),
    }
    list_tensors(&gguf, limit, |name| gguf.tensor_info(name).map(|i| i.ggml_type().name().to_string()).unwrap_or_default())
}

fn inspect_checkpoint(folder: &Path, limit: usize) -> anyhow::Result<()> {
    let manifest = ConnectorManifest::read(folder)?;
    println!("{}: Flamingo connector checkpoint, step {}", folder.display(), manifest.step);
    println!("  language model: {} (sha256 {})", manifest.language_model.path.display(), manifest.language_model.sha256);
    if let Some(vision) = &manifest.vision_encoder {
        println!("  vision encoder: {} (sha256 {})", vision.path.display(), vision.sha256);
    }
    for line in connector_lines(&manifest.flamingo) {
        println!("  {line}");
    }
    if let Some(prompt) = &manifest.caption_prompt {
        println!("  caption prompt: {prompt:?}");
    }

    let weights = SafetensorsWeights::open(folder.join(CONNECTOR_WEIGHTS))?;
    let mut gates: BTreeMap<usize, [Option<f32>; 2]> = BTreeMap::new();
    for name in weights.names() {
        let Some((layer, slot)) = gate_position(&name) else { continue };
        let value = weights.tensor_f32(&name)?.to_f32()[0];
        gates.entry(layer).or_default()[slot] = Some(value.tanh());
    }
    if !gates.is_empty() {
        println!("  tanh of the gates, by the LM layer (counting from 0) that each block sits before:");
        let format_gate = |value: Option<f32>| value.map_or("absent".to_string(), |value| format!("{value:.4}"));
        for (layer, [attention, feed_forward]) in &gates {
            println!("    layer {layer}: attention {}, feed-forward {}", format_gate(*attention), format_gate(*feed_forward));
        }
    }
    for extra in ["trainer.json"] {
        if folder.join(extra).exists() {
            println!("  also holds {extra}");
        }
    }
    list_tensors(&weights, limit, |_| "F32".to_string())
}

/// Finds the LM layer and the slot (0 attention, 1 feed-forward) of a gate
/// tensor named like `lang_encoder.model.layers.3.gated_cross_attn_layer.attn_gate`.
fn gate_position(name: &str) -> Option<(usize, usize)> {
    let slot = match name.rsplit('.').next()? {
        "attn_gate" => 0,
        "ff_gate" => 1,
        _ => return None,
    };
    let mut parts = name.rsplit('.').skip(1);
    if parts.next()? != "gated_cross_attn_layer" {
        return None;
    }
    let layer = parts.next()?.parse().ok()?;
    Some((layer, slot))
}

/// Describes the connector's shape in a few plain lines.
fn connector_lines(config: &FlamingoConfig) -> Vec<String> {
    let r = &config.resampler;
    let mut resampler = format!(
        "resampler: {}, {} of width {}, {} of width {}, {} feed-forward of inner width {}; up to {} per sample, of up to {} each",
        counted(r.depth as u64, "layer"),
        counted(r.heads as u64, "head"),
        r.dim_head,
        counted(r.num_latents as u64, "latent"),
        r.dim,
        serde_name(&r.feed_forward),
        r.ff_mult * r.dim,
        counted(r.max_num_media as u64, "image"),
        counted(r.max_num_frames as u64, "frame"),
    );
    if let Some(norm) = &r.qk_norm {
        resampler.push_str(&format!("; {} on queries and keys", serde_name(norm)));
    }
    if !r.time_embeddings {
        resampler.push_str("; no frame or media time embeddings");
    }

    let every = match config.cross_attn_every_n_layers {
        1 => "every LM layer".to_string(),
        n => format!("every {} LM layer", ordinal(n)),
    };
    let layout = &config.cross_attn_layout;
    let mut blocks = format!(
        "cross-attention: a block before {every}, {} of width {}, {} feed-forward of inner width {} × the LM width",
        counted(config.cross_attn_heads as u64, "head"),
        config.cross_attn_dim_head,
        serde_name(&layout.feed_forward),
        config.cross_attn_ff_mult,
    );
    if *layout != CrossAttentionLayout::default() {
        blocks.push_str(&format!("; {} with epsilon {}", serde_name(&layout.norm), layout.norm_eps));
        if let Some(norm) = &layout.qk_norm {
            blocks.push_str(&format!(", {} on queries and keys", serde_name(norm)));
        }
    }
    vec![resampler, blocks]
}

/// Returns the name a value has in the checkpoint's JSON, such as `gelu_mlp`.
fn serde_name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(name)) => name,
        Ok(other) => other.to_string(),
        Err(_) => "unknown".to_string(),
    }
}

/// Formats `n` with its English ordinal suffix: 2nd, 3rd, 4th, 11th, 21st.
fn ordinal(n: usize) -> String {
    let suffix = match (n % 10, n % 100) {
        (_, 11..=13) => "th",
        (1, _) => "st",
        (2, _) => "nd",
        (3, _) => "rd",
        _ => "th",
    };
    format!("{n}{suffix}")
}

/// Formats `n` followed by `noun`, in the plural unless `n` is 1: `1 tensor`, `3 tensors`.
fn counted(n: u64, noun: &str) -> String {
    match n {
        1 => format!("1 {noun}"),
        _ => format!("{n} {noun}s"),
    }
}

/// Returns whether `path` ends in `.extension`, ignoring case.
fn has_extension(path: &Path, extension: &str) -> bool {
    path.extension().is_some_and(|found| found.eq_ignore_ascii_case(extension))
}

/// Prints parameter counts and up to `limit` tensors with their shapes.
fn list_tensors(weights: &dyn WeightSource, limit: usize, dtype: impl Fn(&str) -> String) -> anyhow::Result<()> {
    let names = weights.names();
    let mut total = 0u64;
    for name in &names {
        total += weights.shape(name)?.iter().product::<usize>() as u64;
    }
    println!("  {}, {} ({:.1} M)", counted(names.len() as u64, "tensor"), counted(total, "parameter"), total as f64 / 1e6);
    for name in names.iter().take(limit) {
        let shape: Vec<String> = weights.shape(name)?.iter().map(usize::to_string).collect();
        println!("    {name} [{}] {}", shape.join(", "), dtype(name));
    }
    if names.len() > limit && limit > 0 {
        println!("    ... {} more (raise --tensors to list them)", names.len() - limit);
    }
    Ok(())
}

fn is_long_array(value: &GgufValue) -> bool {
    value.as_array().is_some_and(|items| items.len() > 16)
}

/// Formats a metadata value as plain text: numbers and words as they are,
/// arrays in brackets, or their length when they are long.
fn plain_value(value: &GgufValue) -> String {
    match value {
        GgufValue::U8(v) => v.to_string(),
        GgufValue::I8(v) => v.to_string(),
        GgufValue::U16(v) => v.to_string(),
        GgufValue::I16(v) => v.to_string(),
        GgufValue::U32(v) => v.to_string(),
        GgufValue::I32(v) => v.to_string(),
        GgufValue::U64(v) => v.to_string(),
        GgufValue::I64(v) => v.to_string(),
        GgufValue::F32(v) => v.to_string(),
        GgufValue::F64(v) => v.to_string(),
        GgufValue::Bool(v) => v.to_string(),
        GgufValue::String(v) => v.escape_debug().to_string(),
        GgufValue::Array(items) if items.len() > 8 => format!("[{}]", counted(items.len() as u64, "item")),
        GgufValue::Array(items) => format!("[{}]", items.iter().map(plain_value).collect::<Vec<_>>().join(", ")),
    }
}
