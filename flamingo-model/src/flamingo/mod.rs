//! Flamingo's trainable connector: the Perceiver Resampler, gated
//! cross-attention blocks, and their tensors.

pub mod batch;
pub mod checkpoint;
pub mod cross_attention;
pub mod generate;
pub mod layers;
pub mod model;
pub mod params;
pub mod resampler;

pub use cross_attention::{CrossAttentionLayout, CrossAttentionShape, GatedCrossAttention, MediaKeys};
pub use layers::{FeedForwardKind, NormKind};
pub use params::{Init, Param, ParamId, ParamStore};
pub use resampler::{PerceiverResampler, ResamplerConfig};
pub use batch::{media_index, tokenize_segments, BatchLimits, Segment, TextBatch, TokenizedText};
pub use model::{Flamingo, FlamingoConfig, GateValues, LossOutput};
pub use generate::{Generation, GenerationConfig};
pub use checkpoint::{BackboneIdentity, ConnectorManifest, CONNECTOR_MANIFEST, CONNECTOR_WEIGHTS};
