//! Greedy decoding of one prompt with the self-attention KV cache.
//!
//! The prompt is run once over all its tokens (prefill); each further step
//! runs only the newest token, attending over the cache. Logits are computed
//! for the last position only.

use flamingo_kernels::Tensor;

use crate::error::{Error, Result};
use crate::lm::{KvCache, LanguageModel, SelfAttentionInput};
use crate::loader::Tokenizer;

impl LanguageModel {
    /// Continues `prompt` greedily and returns the new tokens, at most
    /// `max_new_tokens`.
    ///
    /// Decoding stops after the first token in `stop_ids` (which is
    /// returned too), or when the context is full.
    pub fn greedy_ids(&self, prompt: &[u32], max_new_tokens: usize, stop_ids: &[u32]) -> Result<Vec<u32>> {
        let max_positions = self.summary().max_positions;
        if prompt.is_empty() {
            return Err(Error::InvalidInput("the prompt is empty; greedy decoding needs at least one token".into()));
        }
        if prompt.len() > max_positions {
            return Err(Error::InvalidInput(format!(
                "the prompt has {} tokens, more than the model's context of {max_positions}; shorten the prompt",
                prompt.len()
            )));
        }

        let mut cache = self.new_cache();
        let mut step_ids = prompt.to_vec();
        let mut generated = Vec::new();
        while generated.len() < max_new_tokens {
            let start = cache.len();
            if start + step_ids.len() > max_positions {
                tracing::warn!(max_positions, "greedy decoding stopped: the context is full");
                break;
            }
            let next = self.next_token_greedy(&mut cache, &step_ids, start)?;
            generated.push(next);
            if stop_ids.contains(&next) {
                break;
            }
            step_ids = vec![next];
        }
        Ok(generated)
    }

    /// Continues `prompt` greedily for at most `max_new_tokens` tokens,
    /// stopping at an end-of-sequence token, and returns the new text.
    ///
    /// The prompt is encoded with the tokenizer's own special-token rules
    /// (a BOS only where its post-processor adds one), and special tokens are
    /// left out of the returned text.
    pub fn greedy_continue(&self, tokenizer: &Tokenizer, prompt: &str, max_new_tokens: usize) -> Result<String> {
        let encoding = tokenizer
            .encode(prompt, true)
            .map_err(|e| Error::Tokenizer(format!("cannot encode the prompt: {e}")))?;
        let eos = self.summary().eos_token_ids.clone();
        let ids = self.greedy_ids(encoding.get_ids(), max_new_tokens, &eos)?;
        tokenizer.decode(&ids, true).map_err(|e| Error::Tokenizer(format!("cannot decode the generated ids: {e}")))
    }

    /// Runs `ids` (one sequence) at positions `start..`, appending them to
    /// `cache`, and returns the most likely next token.
    fn next_token_greedy(&self, cache: &mut KvCache, ids: &[u32], start: usize) -> Result<u32> {
        let device = self.device();
        let time = ids.len();
        let id_tensor = device.from_u32([1, time], ids.to_vec())?;
        let positions = device.from_u32([1, time], (start as u32..(start + time) as u32).collect())?;

        let mut x = self.embed(&id_tensor, &positions)?;
        let input = SelfAttentionInput { positions: &positions, key_padding: None };
        for index in 0..self.num_layers() {
            x = self.layer_forward(index, &x, &input, Some(cache), false)?.0;
        }
        let last = device.narrow(&x, 1, time - 1, 1)?;
        let (h, _) = self.final_norm(&last, false)?;
        argmax(&self.logits(&h)?)
    }
}

/// The index of the largest logit; the first one on ties, as `torch.argmax`.
fn argmax(logits: &Tensor) -> Result<u32> {
    let values = logits.to_vec_f32()?;
    let mut best = 0;
    for (index, &value) in values.iter().enumerate() {
        if value > values[best] {
            best = index;
        }
    }
    Ok(best as u32)
}
