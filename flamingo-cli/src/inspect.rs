//! `flamingo inspect`: what a safetensors file, a GGUF file or a checkpoint folder holds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::Context;
use flamingo_model::flamingo::{ConnectorManifest, CONNECTOR_MANIFEST, CONNECTOR_WEIGHTS};
use flamingo_model::loader::{starts_with_gguf_magic, tokenizer_from_gguf, GgufFile, SafetensorsWeights, SpecialTokens, WeightSource};

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
    if path.is_file() && starts_with_gguf_magic(path)? {
        return inspect_gguf(path, args.tensors);
    }
    let weights = SafetensorsWeights::open(path).with_context(|| format!("{} is neither GGUF nor safetensors", path.display()))?;
    println!("{}", weights.origin());
    for (key, value) in weights.metadata() {
        println!("  metadata {key}: {value}");
    }
    list_tensors(&weights, args.tensors, |name| format!("{:?}", weights.dtype(name).ok()))
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
            println!("  {key}: {}", short_value(value));
        }
    }
    let mut by_type: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for info in gguf.tensor_infos() {
        let entry = by_type.entry(info.ggml_type().name().to_string()).or_default();
        entry.0 += 1;
        entry.1 += info.n_elements() as u64;
    }
    for (ty, (count, elements)) in &by_type {
        println!("  {count} tensors of type {ty}, {elements} parameters");
    }
    match tokenizer_from_gguf(&gguf) {
        Ok(tokenizer) => {
            let special = SpecialTokens::from_gguf(&gguf, &tokenizer)?;
            println!("  tokenizer: {} tokens; bos {:?}, eos {:?}, pad {:?}", tokenizer.get_vocab_size(true), special.bos, special.eos, special.pad);
            let named: Vec<String> = special.named.iter().map(|(k, v)| format!("{k}={v}")).collect();
            println!("  special tokens: {}", named.join(", "));
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
    println!("  connector: {}", serde_json::to_string(&manifest.flamingo)?);
    if let Some(prompt) = &manifest.caption_prompt {
        println!("  caption prompt: {prompt:?}");
    }
    let weights = SafetensorsWeights::open(folder.join(CONNECTOR_WEIGHTS))?;
    let mut gates = Vec::new();
    for name in weights.names() {
        if name.ends_with("attn_gate") || name.ends_with("ff_gate") {
            let value = weights.tensor_f32(&name)?.to_f32()[0];
            gates.push(format!("{}={:.4}", name.rsplit('.').nth(1).unwrap_or("").to_string() + "." + name.rsplit('.').next().unwrap_or(""), value.tanh()));
        }
    }
    if !gates.is_empty() {
        println!("  tanh of the gates, in layer order: {}", gates.join(" "));
    }
    for extra in ["trainer.json"] {
        if folder.join(extra).exists() {
            println!("  also holds {extra}");
        }
    }
    list_tensors(&weights, limit, |_| "F32".to_string())
}

/// Prints parameter counts and up to `limit` tensors with their shapes.
fn list_tensors(weights: &dyn WeightSource, limit: usize, dtype: impl Fn(&str) -> String) -> anyhow::Result<()> {
    let names = weights.names();
    let mut total = 0u64;
    for name in &names {
        total += weights.shape(name)?.iter().product::<usize>() as u64;
    }
    println!("  {} tensors, {} parameters ({:.1} M)", names.len(), total, total as f64 / 1e6);
    for name in names.iter().take(limit) {
        println!("    {name} {:?} {}", weights.shape(name)?, dtype(name));
    }
    if names.len() > limit && limit > 0 {
        println!("    ... {} more (raise --tensors to list them)", names.len() - limit);
    }
    Ok(())
}

fn is_long_array(value: &flamingo_model::loader::GgufValue) -> bool {
    value.as_array().is_some_and(|items| items.len() > 16)
}

fn short_value(value: &flamingo_model::loader::GgufValue) -> String {
    match value.as_array() {
        Some(items) if items.len() > 8 => format!("[{} items]", items.len()),
        _ => format!("{value:?}"),
    }
}
