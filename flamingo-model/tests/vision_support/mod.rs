//! Helpers shared by the vision tests: fixture files, devices, comparisons.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use flamingo_kernels::{gpu, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

/// Returns the repository's `fixtures/` folder.
pub fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures")
}

/// The tensors of one safetensors fixture file.
pub struct Fixture {
    bytes: Vec<u8>,
    path: PathBuf,
}

impl Fixture {
    pub fn open(relative: &str) -> Self {
        let path = fixtures_dir().join(relative);
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        Self { bytes, path }
    }

    fn file(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap_or_else(|e| panic!("{}: {e}", self.path.display()))
    }

    /// Reads an F32 tensor: its shape and values.
    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let file = self.file();
        let view = file.tensor(name).unwrap_or_else(|e| panic!("{}: `{name}`: {e}", self.path.display()));
        assert_eq!(view.dtype(), Dtype::F32, "dtype of `{name}`");
        let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        (view.shape().to_vec(), values)
    }

    /// Reads a U8 tensor: its shape and values.
    pub fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let file = self.file();
        let view = file.tensor(name).unwrap_or_else(|e| panic!("{}: `{name}`: {e}", self.path.display()));
        assert_eq!(view.dtype(), Dtype::U8, "dtype of `{name}`");
        (view.shape().to_vec(), view.data().to_vec())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.file().tensor(name).is_ok()
    }
}

/// Transposes [N, C, H, W] values into [N, H, W, C].
pub fn nchw_to_nhwc(values: &[f32], shape: &[usize]) -> Vec<f32> {
    let (n, c, h, w) = (shape[0], shape[1], shape[2], shape[3]);
    let mut out = vec![0.0; values.len()];
    for b in 0..n {
        for channel in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((b * h + y) * w + x) * c + channel] = values[((b * c + channel) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// Opens the CPU backend and every wgpu adapter, each with a name for messages.
///
/// An adapter that is listed but fails to open fails the test: only ops
/// the wgpu backend reports as unsupported are skipped (see [`skip_unsupported`]).
pub fn devices() -> Vec<(String, Device)> {
    let mut devices = vec![("cpu".to_string(), Device::cpu())];
    for adapter in gpu::list_adapters() {
        let device = Device::gpu(adapter.index)
            .unwrap_or_else(|e| panic!("adapter {} ({}) was listed but could not be opened: {e}", adapter.index, adapter.name));
        devices.push((format!("adapter {} ({})", adapter.index, adapter.name), device));
    }
    devices
}

/// Returns the value of `result`, or `None` after printing why `device`
/// is skipped when the wgpu backend does not implement an op yet. Any
/// other error fails the test.
pub fn skip_unsupported<T>(result: flamingo_model::Result<T>, device: &str, test: &str) -> Option<T> {
    match result {
        Ok(value) => Some(value),
        Err(flamingo_model::Error::Kernel(error @ flamingo_kernels::Error::Unsupported { .. })) => {
            eprintln!("SKIPPED {test} on {device}: {error}");
            None
        }
        Err(error) => panic!("{test} on {device}: {error}"),
    }
}

/// Returns the largest absolute difference between two equally long slices.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Copies a device tensor's values to the host.
pub fn values(tensor: &Tensor) -> Vec<f32> {
    tensor.to_vec_f32().expect("download")
}

/// Returns the asset cache folder of scripts/fetch-assets.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLAMINGO_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("flamingo");
    }
    PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flamingo")
}

/// Returns `relative` under the asset cache if every file in `required`
/// exists there, or `None` after printing why `test` is skipped. With
/// `FLAMINGO_REQUIRE_ASSETS=1` a missing asset fails the test instead.
pub fn optional_asset(relative: &str, required: &[&str], test: &str) -> Option<PathBuf> {
    let path = cache_dir().join(relative);
    let missing: Vec<&str> = required.iter().copied().filter(|file| !path.join(file).is_file()).collect();
    if missing.is_empty() {
        return Some(path);
    }
    let reason = format!(
        "{} lacks {}; run scripts/fetch-assets.sh --only {}",
        path.display(),
        missing.join(", "),
        relative.split('/').next().unwrap_or(relative)
    );
    if std::env::var("FLAMINGO_REQUIRE_ASSETS").as_deref() == Ok("1") {
        panic!("{test}: {reason} (FLAMINGO_REQUIRE_ASSETS=1 makes this a failure)");
    }
    eprintln!("SKIPPED {test}: {reason}");
    None
}
