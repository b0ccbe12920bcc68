//! Text generation with Flamingo: greedy, sampling and beam search.
//!
//! A prompt is run once over all its tokens (prefill), filling the
//! self-attention KV cache; every further step runs one new token per
//! sequence. Each block's cross-attention keys and values are computed once
//! from the prompt's latents and reused at every step, and every generated
//! token attends to the last image of its prompt.
//!
//! Prompts of different lengths are batched by padding on the left: each
//! row's real tokens start at position 0, padding keys are masked, so a
//! prompt's output does not depend on its neighbours in the batch.

use flamingo_kernels::{DType, Tensor};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{Error, Result};
use crate::flamingo::batch::media_index;
use crate::flamingo::cross_attention::MediaKeys;
use crate::flamingo::model::Flamingo;
use crate::lm::{KvCache, SelfAttentionInput};

/// How to pick new tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Sample only among the k most likely tokens.
    pub top_k: Option<usize>,
    /// Sample only among the most likely tokens whose probabilities add up to p.
    pub top_p: Option<f32>,
    /// Beam search with this many beams when above 1 (sampling options are then ignored).
    pub num_beams: usize,
    /// Beam scores are the summed log-probabilities divided by length^length_penalty.
    pub length_penalty: f32,
    /// Generation stops when the text produced contains one of these; the
    /// stop string and what follows it are cut off.
    pub stop_strings: Vec<String>,
    /// Token ids that are never generated (their logits are set to −∞).
    pub suppress_tokens: Vec<u32>,
    /// Token ids that end a continuation; `None` means the LM's
    /// end-of-sequence tokens and `<|endofchunk|>`.
    pub stop_token_ids: Option<Vec<u32>>,
    /// Seed of the sampler.
    pub seed: u64,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 20,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            num_beams: 1,
            length_penalty: 1.0,
            stop_strings: Vec::new(),
            suppress_tokens: Vec::new(),
            stop_token_ids: None,
            seed: 0,
        }
    }
}

/// One generated continuation.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The new token ids, including the stop token that ended them, if any.
    pub ids: Vec<u32>,
    /// The new text, special tokens left out, cut at a stop string.
    pub text: String,
    /// Beam search's length-normalised score; `None` for other modes.
    pub score: Option<f32>,
}

/// The state of a batch of sequences being decoded together.
struct Decoder<'a> {
    model: &'a Flamingo,
    cache: KvCache,
    keys: Vec<Option<MediaKeys>>,
    key_media: Tensor,
    /// Per row: padding tokens on the left, real tokens so far, last media index.
    padding: Vec<usize>,
    lengths: Vec<usize>,
    last_media: Vec<u32>,
    /// [B, cached tokens] over all rows: 1 for real tokens.
    key_valid: Vec<u32>,
}

impl Flamingo {
    /// Tokenizes a prompt as training does: no special tokens are added,
    /// but `<image>` and `<|endofchunk|>` in the text are matched whole.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.tokenizer.encode(text, false).map_err(|e| Error::Tokenizer(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Continues every prompt. `visual` holds the visual tokens of the
    /// prompts' images, [B·S, F, N, Dv] with S slots per prompt in marker
    /// order (padding slots are ignored); `None` when no prompt has an image.
    pub fn generate(&self, prompts: &[Vec<u32>], visual: Option<&Tensor>, config: &GenerationConfig) -> Result<Vec<Generation>> {
        if prompts.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(empty) = prompts.iter().position(|p| p.is_empty()) {
            return Err(Error::InvalidInput(format!("prompt {empty} is empty; generation needs at least one token")));
        }
        let latents = self.prompt_latents(prompts, visual)?;
        if config.num_beams > 1 {
            let mut outputs = Vec::with_capacity(prompts.len());
            for (index, prompt) in prompts.iter().enumerate() {
                let rows = latents.dim(1);
                let width = latents.dim(2);
                let one = self.device().narrow(&latents, 0, index, 1)?;
                let beams = self.device().broadcast_to(&one.reshape([rows, width])?, &[config.num_beams, rows, width])?;
                outputs.push(self.beam_search(prompt, &beams, config)?);
            }
            return Ok(outputs);
        }
        self.sample(prompts, &latents, config)
    }

    /// The latents of every prompt's images, [B, S·L, Dv]; zeros when there are none.
    fn prompt_latents(&self, prompts: &[Vec<u32>], visual: Option<&Tensor>) -> Result<Tensor> {
        let counts: Vec<usize> = prompts.iter().map(|p| p.iter().filter(|&&id| id == self.image_id).count()).collect();
        let batch = prompts.len();
        match visual {
            Some(visual) => {
                let slots = visual.dim(0) / batch.max(1);
                if visual.rank() != 4 || visual.dim(0) != slots * batch || counts.iter().any(|&c| c > slots) {
                    return Err(Error::InvalidInput(format!(
                        "the prompts have {:?} <image> markers, but the visual tokens {:?} give {} slot(s) per prompt",
                        counts,
                        visual.shape(),
                        slots
                    )));
                }
                self.resample(batch, visual)
            }
            None if counts.iter().any(|&c| c > 0) => Err(Error::InvalidInput(format!(
                "the prompts have {counts:?} <image> markers but no images were given"
            ))),
            None => {
                let rows = self.config.resampler.num_latents;
                Ok(self.device().zeros(vec![batch, rows, self.config.resampler.dim], DType::F32)?)
            }
        }
    }

    /// The media index each latent belongs to, [B, S·L], for prompts' real images.
    fn latent_media(&self, prompts: &[Vec<u32>], latent_rows: usize) -> Result<Tensor> {
        let per_slot = self.config.resampler.num_latents;
        let mut media = Vec::with_capacity(prompts.len() * latent_rows);
        for prompt in prompts {
            let images = prompt.iter().filter(|&&id| id == self.image_id).count();
            media.extend((0..latent_rows).map(|row| {
                let slot = row / per_slot;
                if slot < images { slot as u32 + 1 } else { 0 }
            }));
        }
        Ok(self.device().from_u32(vec![prompts.len(), latent_rows], media)?)
    }

    fn start_decoder<'a>(&'a self, prompts: &[Vec<u32>], latents: &Tensor) -> Result<(Decoder<'a>, Tensor)> {
        let max_positions = self.lm.summary().max_positions;
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        if longest > max_positions {
            return Err(Error::InvalidInput(format!(
                "a prompt has {longest} tokens, more than the language model's context of {max_positions}; shorten it"
            )));
        }
        let mut decoder = Decoder {
            model: self,
            cache: self.lm.new_cache(),
            keys: self.media_keys(latents)?,
            key_media: self.latent_media(prompts, latents.dim(1))?,
            padding: prompts.iter().map(|p| longest - p.len()).collect(),
            lengths: prompts.iter().map(Vec::len).collect(),
            last_media: prompts.iter().map(|p| media_index(p, self.image_id).last().copied().unwrap_or(0)).collect(),
            key_valid: Vec::new(),
        };
        let batch = prompts.len();
        let pad = self.batch_limits().pad_id;
        let mut ids = vec![pad; batch * longest];
        let mut positions = vec![0u32; batch * longest];
        let mut query_media = vec![0u32; batch * longest];
        decoder.key_valid = vec![0u32; batch * longest];
        for (b, prompt) in prompts.iter().enumerate() {
            let offset = b * longest + decoder.padding[b];
            ids[offset..offset + prompt.len()].copy_from_slice(prompt);
            query_media[offset..offset + prompt.len()].copy_from_slice(&media_index(prompt, self.image_id));
            for t in 0..prompt.len() {
                positions[offset + t] = t as u32;
                decoder.key_valid[offset + t] = 1;
            }
        }
        let logits = decoder.step(&ids, &positions, &query_media, longest)?;
        Ok((decoder, logits))
    }

    fn sample(&self, prompts: &[Vec<u32>], latents: &Tensor, config: &GenerationConfig) -> Result<Vec<Generation>> {
        let batch = prompts.len();
        let stops = self.stop_ids(config);
        let mut rng = StdRng::seed_from_u64(config.seed);
        let (mut decoder, mut logits) = self.start_decoder(prompts, latents)?;
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); batch];
        let mut finished = vec![false; batch];
        let vocab = self.vocab_size();
        for step in 0..config.max_new_tokens {
            let host = suppress(logits.to_vec_f32()?, vocab, &config.suppress_tokens);
            let mut next = Vec::with_capacity(batch);
            for b in 0..batch {
                if finished[b] {
                    next.push(stops.first().copied().unwrap_or(0));
                    continue;
                }
                let token = pick_token(&host[b * vocab..(b + 1) * vocab], config, &mut rng);
                generated[b].push(token);
                if stops.contains(&token) || self.hits_stop_string(&generated[b], config)? {
                    finished[b] = true;
                }
                next.push(token);
            }
            let full = decoder.lengths.iter().any(|&len| len + 1 > self.lm.summary().max_positions);
            if finished.iter().all(|&f| f) || step + 1 == config.max_new_tokens || full {
                break;
            }
            logits = decoder.advance(&next)?;
        }
        generated.into_iter().map(|ids| self.finish(ids, None, config)).collect()
    }

    fn beam_search(&self, prompt: &[u32], latents: &Tensor, config: &GenerationConfig) -> Result<Generation> {
        let beams = config.num_beams;
        let stops = self.stop_ids(config);
        let vocab = self.vocab_size();
        let prompts = vec![prompt.to_vec(); beams];
        let (mut decoder, mut logits) = self.start_decoder(&prompts, latents)?;

        // Running hypotheses: new tokens and summed log-probabilities. At the
        // start all beams are one, so only beam 0 may expand.
        let mut running: Vec<(Vec<u32>, f32)> = (0..beams).map(|b| (Vec::new(), if b == 0 { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mut done: Vec<(Vec<u32>, f32)> = Vec::new();
        let normalise = |score: f32, len: usize| score / (len as f32).powf(config.length_penalty);
        for step in 0..config.max_new_tokens {
            let host = suppress(logits.to_vec_f32()?, vocab, &config.suppress_tokens);
            let mut candidates: Vec<(f32, usize, u32)> = Vec::with_capacity(beams * 2 * beams);
            for (b, (_, score)) in running.iter().enumerate() {
                let log_probs = log_softmax(&host[b * vocab..(b + 1) * vocab]);
                for (token, lp) in top_indices(&log_probs, 2 * beams) {
                    candidates.push((score + lp, b, token));
                }
            }
            candidates.sort_by(|a, b| b.0.total_cmp(&a.0));

            let mut next_running = Vec::with_capacity(beams);
            let mut order = Vec::with_capacity(beams);
            for (rank, &(score, beam, token)) in candidates.iter().enumerate() {
                if score == f32::NEG_INFINITY {
                    break;
                }
                let mut ids = running[beam].0.clone();
                ids.push(token);
                if stops.contains(&token) || self.hits_stop_string(&ids, config)? {
                    // A finished beam counts only if it ranks among the best `beams` candidates.
                    if rank < beams {
                        done.push((ids.clone(), normalise(score, ids.len())));
                    }
                    continue;
                }
                next_running.push((ids, score));
                order.push(beam as u32);
                if next_running.len() == beams {
                    break;
                }
            }
            done.sort_by(|a, b| b.1.total_cmp(&a.1));
            done.truncate(beams);

            // Stop when no running beam can still beat the worst kept result.
            let best_running = next_running.first().map(|(ids, s)| normalise(*s, ids.len())).unwrap_or(f32::NEG_INFINITY);
            let enough = done.len() == beams && done.last().is_some_and(|(_, worst)| *worst >= best_running);
            if next_running.is_empty() || enough || step + 1 == config.max_new_tokens {
                running = next_running;
                break;
            }
            while next_running.len() < beams {
                next_running.push((Vec::new(), f32::NEG_INFINITY));
                order.push(0);
            }
            decoder.cache.reorder(self.device(), &order)?;
            let tokens: Vec<u32> = next_running.iter().map(|(ids, _)| *ids.last().unwrap_or(&0)).collect();
            running = next_running;
            logits = decoder.advance(&tokens)?;
        }
        for (ids, score) in running {
            if score > f32::NEG_INFINITY && !ids.is_empty() {
                let normalised = normalise(score, ids.len());
                done.push((ids, normalised));
            }
        }
        done.sort_by(|a, b| b.1.total_cmp(&a.1));
        let (ids, score) = done.into_iter().next().unwrap_or_default();
        self.finish(ids, Some(score), config)
    }

    /// Token ids that end a continuation: those configured, or the LM's
    /// end-of-sequence tokens and `<|endofchunk|>`.
    fn stop_ids(&self, config: &GenerationConfig) -> Vec<u32> {
        if let Some(stops) = &config.stop_token_ids {
            return stops.clone();
        }
        let mut stops = vec![self.end_of_chunk_id];
        stops.extend(self.lm.summary().eos_token_ids.iter().copied());
        stops
    }

    fn decode(&self, ids: &[u32]) -> Result<String> {
        self.tokenizer.decode(ids, true).map_err(|e| Error::Tokenizer(format!("cannot decode {ids:?}: {e}")))
    }

    fn hits_stop_string(&self, ids: &[u32], config: &GenerationConfig) -> Result<bool> {
        if config.stop_strings.is_empty() {
            return Ok(false);
        }
        let text = self.decode(ids)?;
        Ok(config.stop_strings.iter().any(|stop| text.contains(stop.as_str())))
    }

    fn finish(&self, ids: Vec<u32>, score: Option<f32>, config: &GenerationConfig) -> Result<Generation> {
        let mut text = self.decode(&ids)?;
        if let Some(cut) = config.stop_strings.iter().filter_map(|stop| text.find(stop.as_str())).min() {
            text.truncate(cut);
        }
        Ok(Generation { ids, text, score })
    }
}

impl Decoder<'_> {
    /// Runs `len` new tokens per row through every layer and returns the
    /// logits of each row's last new token, [B, V + 2].
    fn step(&mut self, ids: &[u32], positions: &[u32], query_media: &[u32], len: usize) -> Result<Tensor> {
        let model = self.model;
        let device = model.device();
        let batch = self.padding.len();
        let ids = device.from_u32(vec![batch, len], ids.to_vec())?;
        let positions = device.from_u32(vec![batch, len], positions.to_vec())?;
        let query_media = device.from_u32(vec![batch, len], query_media.to_vec())?;
        let cached = self.key_valid.len() / batch;
        let key_padding = device.from_u32(vec![batch, cached], self.key_valid.clone())?;
        let input = SelfAttentionInput { positions: &positions, key_padding: Some(&key_padding) };

        let mut x = model.embed(&ids, &positions)?;
        for layer in 0..model.lm.num_layers() {
            x = model.layer_step(layer, &x, self.keys[layer].as_ref(), &query_media, &self.key_media, &input, Some(&mut self.cache))?;
        }
        let width = x.dim(2);
        let last = device.narrow(&x, 1, len - 1, 1)?.reshape([batch, width])?;
        let (normed, _) = model.lm.final_norm(&last, false)?;
        model.logits(&normed)
    }

    /// Appends one token per row and returns the next logits.
    fn advance(&mut self, tokens: &[u32]) -> Result<Tensor> {
        let batch = self.padding.len();
        let cached = self.key_valid.len() / batch;
        let mut valid = Vec::with_capacity(batch * (cached + 1));
        for b in 0..batch {
            valid.extend_from_slice(&self.key_valid[b * cached..(b + 1) * cached]);
            valid.push(1);
        }
        self.key_valid = valid;
        let positions: Vec<u32> = self.lengths.iter().map(|&len| len as u32).collect();
        self.lengths.iter_mut().for_each(|len| *len += 1);
        let media = self.last_media.clone();
        self.step(tokens, &positions, &media, 1)
    }
}

/// Sets the logits of `tokens` to −∞ in every row of `vocab` logits.
fn suppress(mut logits: Vec<f32>, vocab: usize, tokens: &[u32]) -> Vec<f32> {
    for row in logits.chunks_mut(vocab) {
        for &token in tokens {
            if let Some(value) = row.get_mut(token as usize) {
                *value = f32::NEG_INFINITY;
            }
        }
    }
    logits
}

/// Picks the next token from one row of logits.
fn pick_token(logits: &[f32], config: &GenerationConfig, rng: &mut StdRng) -> u32 {
    if config.temperature <= 0.0 {
        return argmax(logits);
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = config.top_k {
        order.truncate(k.max(1));
    }
    let max = logits[order[0]];
    let mut probs: Vec<f64> = order.iter().map(|&i| (((logits[i] - max) / config.temperature) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = config.top_p {
        let mut cumulative = 0.0;
        let keep = probs.iter().position(|p| {
            cumulative += p;
            cumulative >= top_p as f64
        });
        let keep = keep.map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut draw: f64 = rng.random();
    for (&index, p) in order.iter().zip(&probs) {
        draw -= p;
        if draw <= 0.0 {
            return index as u32;
        }
    }
    order[order.len() - 1] as u32
}

fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, v) in values.iter().enumerate() {
        if *v > values[best] {
            best = i;
        }
    }
    best as u32
}

fn log_softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let lse = max + logits.iter().map(|&v| ((v - max) as f64).exp()).sum::<f64>().ln() as f32;
    logits.iter().map(|&v| v - lse).collect()
}

/// The `k` largest values with their indices, largest first.
fn top_indices(values: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut indexed: Vec<(u32, f32)> = values.iter().enumerate().map(|(i, &v)| (i as u32, v)).collect();
    let k = k.min(indexed.len());
    indexed.select_nth_unstable_by(k.saturating_sub(1), |a, b| b.1.total_cmp(&a.1));
    indexed.truncate(k);
    indexed.sort_by(|a, b| b.1.total_cmp(&a.1));
    indexed
}
