//! Serde helpers for `bos_token_id` / `eos_token_id`, which configs write as
//! `null`, one id, or a list of ids (Llama 3 lists several end tokens).

use serde::{Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(u32),
    Many(Vec<u32>),
}

/// Reads `null`, an id, or a list of ids as a list.
pub fn list<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<u32>, D::Error> {
    let value = Option::<OneOrMany>::deserialize(deserializer)?;
    Ok(match value {
        None => Vec::new(),
        Some(OneOrMany::One(id)) => vec![id],
        Some(OneOrMany::Many(ids)) => ids,
    })
}

/// Reads `null`, an id, or a list of ids as its first id.
pub fn optional<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    Ok(list(deserializer)?.first().copied())
}
