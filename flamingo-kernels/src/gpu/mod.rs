//! The wgpu backend: adapters, buffers, pipelines and the host side of
//! every WGSL kernel.
//!
//! - `adapter`: listing adapters and opening one with its own limits;
//! - `context`: the device state shared with buffers, error capture, the
//!   pipeline cache and the `Job` that records and submits an op's dispatches;
//! - `pool`: tensor buffers, their pool, uploads and downloads;
//! - `chunk`: splitting tensors larger than one storage binding;
//! - `shaders`: the WGSL files and their templating step;
//! - one file per op family, each the host side of one file in `shaders/`.

mod activation;
mod adamw;
mod adapter;
mod attention;
mod chunk;
mod context;
mod conv;
mod cross_entropy;
mod dequantize;
mod elementwise;
mod embedding;
mod matmul;
mod norm;
mod pool;
mod reduce;
mod rope;
mod shape;
pub mod shaders;
mod softmax;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

pub use adapter::{list_adapters, AdapterKind, AdapterSummary, GpuOptions};
pub use pool::GpuBuffer;

use crate::error::Result;
use crate::host::HostData;
use context::Context;

/// The wgpu device of adapter `index` opened with `options`, created once
/// per process and shared by every [`crate::Device`] that opens it.
///
/// Sharing compiles each pipeline once per process. It also keeps the GL
/// backend working: all of its devices share one EGL context, which two
/// threads must not make current at once. Creating several GL devices from
/// different threads fails inside wgpu (observed with wgpu 30 and Mesa 22.3).
fn shared_context(index: usize, options: &GpuOptions) -> Result<Arc<Context>> {
    type Opened = HashMap<(usize, GpuOptions), Arc<Context>>;
    static OPENED: OnceLock<Mutex<Opened>> = OnceLock::new();
    let mut opened = OPENED.get_or_init(Default::default).lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(context) = opened.get(&(index, options.clone())) {
        return Ok(context.clone());
    }
    let context = Context::new(adapter::open(index, options)?);
    opened.insert((index, options.clone()), context.clone());
    Ok(context)
}

/// An opened wgpu adapter with its queue, buffer pool and pipeline cache.
pub struct GpuBackend {
    context: Arc<Context>,
    /// Identifies the owning [`crate::Device`], for the tensors ops create.
    device_id: u64,
    tuning: matmul::Tuning,
    inv_freq: rope::InvFreqCache,
}

impl GpuBackend {
    pub(crate) fn open(index: usize, device_id: u64) -> Result<Self> {
        Self::open_with(index, device_id, &GpuOptions::from_env())
    }

    pub(crate) fn open_with(index: usize, device_id: u64, options: &GpuOptions) -> Result<Self> {
        let context = shared_context(index, options)?;
        let tuning = matmul::Tuning::for_adapter(&context);
        Ok(Self { context, device_id, tuning, inv_freq: rope::InvFreqCache::default() })
    }

    /// Describes the adapter: its name, API and kind, and the optional features in use.
    pub(crate) fn description(&self) -> String {
        let summary = &self.context.summary;
        let api = summary.api.map_or("unknown API", |api| api.name());
        let mut features = Vec::new();
        if self.context.f16 {
            features.push("f16");
        }
        if self.context.subgroups {
            features.push("subgroups");
        }
        let features = if features.is_empty() { String::new() } else { format!(", {}", features.join(", ")) };
        format!("{} ({api}, {}{features})", summary.name, summary.kind.name())
    }

    /// Returns the summary of the adapter this backend opened.
    pub fn summary(&self) -> &AdapterSummary {
        &self.context.summary
    }

    pub(crate) fn supports_f16(&self) -> bool {
        self.context.f16
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.context.synchronize()
    }

    pub(crate) fn upload(&self, data: &HostData) -> Result<GpuBuffer> {
        let bytes: &[u8] = match data {
            HostData::F32(values) => bytemuck::cast_slice(values),
            HostData::F16(values) => bytemuck::cast_slice(values),
            HostData::U32(values) => bytemuck::cast_slice(values),
        };
        self.context.upload_bytes("upload", bytes)
    }

    pub(crate) fn zeros(&self, bytes: usize) -> Result<GpuBuffer> {
        let buffer = self.context.allocate("zeros", bytes as u64)?;
        let mut job = self.context.job("zeros");
        job.clear(&buffer);
        job.submit()?;
        Ok(buffer)
    }

    pub(crate) fn copy_buffer(&self, source: &GpuBuffer, bytes: usize) -> Result<GpuBuffer> {
        let copy = self.context.allocate("copy", bytes as u64)?;
        let mut job = self.context.job("copy");
        job.copy(source, 0, &copy, 0, (bytes as u64).next_multiple_of(4).min(source.raw().size()));
        job.submit()?;
        Ok(copy)
    }
}

