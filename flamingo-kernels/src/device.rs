//! The device every op runs on: a wgpu adapter or the CPU reference backend.
//!
//! Automatic choice takes a hardware GPU when one exists and the CPU backend
//! otherwise, because a software adapter such as Mesa's lavapipe is slower
//! than the CPU backend on the same cores. An explicit request overrides it.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use half::f16;

use crate::error::{shape_err, Error, Result};
use crate::gpu::{self, AdapterKind, AdapterSummary, GpuBackend};
use crate::host::{HostData, HostTensor};
use crate::tensor::{CpuStorage, DType, Storage, Tensor};

/// Which device to open, as given on a command line (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceRequest {
    /// A hardware GPU if any, else the CPU backend.
    Auto,
    /// The CPU reference backend.
    Cpu,
    /// The first adapter of one graphics API.
    Api(GraphicsApi),
    /// The adapter at this position in [`gpu::list_adapters`].
    Adapter(usize),
}

/// A graphics API wgpu can drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphicsApi {
    Vulkan,
    Metal,
    Dx12,
    Gl,
}

impl GraphicsApi {
    /// The lower-case name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            GraphicsApi::Vulkan => "vulkan",
            GraphicsApi::Metal => "metal",
            GraphicsApi::Dx12 => "dx12",
            GraphicsApi::Gl => "gl",
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = Error;

    fn from_str(text: &str) -> Result<Self> {
        let request = match text.trim().to_ascii_lowercase().as_str() {
            "auto" => DeviceRequest::Auto,
            "cpu" => DeviceRequest::Cpu,
            "vulkan" => DeviceRequest::Api(GraphicsApi::Vulkan),
            "metal" => DeviceRequest::Api(GraphicsApi::Metal),
            "dx12" => DeviceRequest::Api(GraphicsApi::Dx12),
            "gl" | "gles" | "opengl" => DeviceRequest::Api(GraphicsApi::Gl),
            other => match other.parse::<usize>() {
                Ok(index) => DeviceRequest::Adapter(index),
                Err(_) => {
                    return Err(Error::Device(format!(
                        "unknown device `{text}`; expected auto, cpu, vulkan, metal, dx12, gl or an adapter index from `flamingo devices`"
                    )))
                }
            },
        };
        Ok(request)
    }
}

impl fmt::Display for DeviceRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceRequest::Auto => write!(f, "auto"),
            DeviceRequest::Cpu => write!(f, "cpu"),
            DeviceRequest::Api(api) => write!(f, "{}", api.name()),
            DeviceRequest::Adapter(index) => write!(f, "{index}"),
        }
    }
}

/// The outcome of automatic device choice: which device and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    Cpu { reason: String },
    Adapter { index: usize, reason: String },
}

/// Picks a device for `request` among `adapters`, without opening it.
pub fn choose(request: DeviceRequest, adapters: &[AdapterSummary]) -> Result<Choice> {
    match request {
        DeviceRequest::Cpu => Ok(Choice::Cpu { reason: "requested".into() }),
        DeviceRequest::Adapter(index) => {
            if index < adapters.len() {
                Ok(Choice::Adapter { index, reason: "requested by index".into() })
            } else {
                Err(Error::Device(format!(
                    "adapter index {index} does not exist; {} adapter(s) were found (run `flamingo devices`)",
                    adapters.len()
                )))
            }
        }
        DeviceRequest::Api(api) => {
            let found = adapters.iter().find(|adapter| adapter.api == Some(api));
            match found {
                Some(adapter) => Ok(Choice::Adapter {
                    index: adapter.index,
                    reason: format!("requested {}", api.name()),
                }),
                None => Err(Error::Device(format!(
                    "no {} adapter was found; run `flamingo devices` to list the adapters, or use --device cpu",
                    api.name()
                ))),
            }
        }
        DeviceRequest::Auto => {
            let hardware = adapters
                .iter()
                .filter(|adapter| adapter.kind.is_hardware())
                .min_by_key(|adapter| (adapter.kind != AdapterKind::DiscreteGpu, adapter.index));
            match hardware {
                Some(adapter) => Ok(Choice::Adapter {
                    index: adapter.index,
                    reason: format!("{} is a hardware GPU", adapter.name),
                }),
                None if adapters.is_empty() => {
                    Ok(Choice::Cpu { reason: "no GPU adapter was found".into() })
                }
                None => Ok(Choice::Cpu {
                    reason: "only software adapters were found, and the CPU backend is faster than them".into(),
                }),
            }
        }
    }
}

pub(crate) enum Backend {
    Cpu,
    Gpu(GpuBackend),
}

struct DeviceInner {
    id: u64,
    backend: Backend,
    description: String,
}

/// A device that owns tensors and runs ops on them.
///
/// Cloning is cheap; clones refer to the same device.
#[derive(Clone)]
pub struct Device {
    inner: Arc<DeviceInner>,
}

impl fmt::Debug for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Device").field("description", &self.inner.description).finish()
    }
}

fn next_device_id() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

impl Device {
    /// Opens the CPU reference backend.
    pub fn cpu() -> Device {
        let threads = rayon::current_num_threads();
        Device {
            inner: Arc::new(DeviceInner {
                id: next_device_id(),
                backend: Backend::Cpu,
                description: format!("CPU ({threads} threads)"),
            }),
        }
    }

    /// Opens the device `request` names, logging the choice and its reason.
    pub fn open(request: DeviceRequest) -> Result<Device> {
        let adapters = if request == DeviceRequest::Cpu { Vec::new() } else { gpu::list_adapters() };
        match choose(request, &adapters)? {
            Choice::Cpu { reason } => {
                let device = Device::cpu();
                tracing::info!("device: {} ({reason})", device.description());
                Ok(device)
            }
            Choice::Adapter { index, reason } => {
                let device = Device::gpu(index)?;
                tracing::info!("device: {} ({reason})", device.description());
                Ok(device)
            }
        }
    }

    /// Opens the wgpu adapter at `index` in [`gpu::list_adapters`].
    pub fn gpu(index: usize) -> Result<Device> {
        let id = next_device_id();
        let backend = GpuBackend::open(index, id)?;
        let description = backend.description();
        Ok(Device { inner: Arc::new(DeviceInner { id, backend: Backend::Gpu(backend), description }) })
    }

    /// Opens adapter `index` with explicit options (a capped storage binding
    /// size, f16 or subgroups left off), to exercise fallback paths.
    pub fn gpu_with_options(index: usize, options: &gpu::GpuOptions) -> Result<Device> {
        let id = next_device_id();
        let backend = GpuBackend::open_with(index, id, options)?;
        let description = backend.description();
        Ok(Device { inner: Arc::new(DeviceInner { id, backend: Backend::Gpu(backend), description }) })
    }

    /// A one-line description: the adapter name and API, or the CPU and its threads.
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// Whether ops run on a wgpu adapter.
    pub fn is_gpu(&self) -> bool {
        matches!(self.inner.backend, Backend::Gpu(_))
    }

    pub(crate) fn id(&self) -> u64 {
        self.inner.id
    }

    pub(crate) fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    /// The element type frozen weights should be stored in on this device:
    /// f16 where the adapter has SHADER_F16, else f32.
    pub fn weight_dtype(&self) -> DType {
        match &self.inner.backend {
            Backend::Gpu(gpu) if gpu.supports_f16() => DType::F16,
            _ => DType::F32,
        }
    }

    /// Waits until all submitted work has finished.
    pub fn synchronize(&self) -> Result<()> {
        match &self.inner.backend {
            Backend::Cpu => Ok(()),
            Backend::Gpu(gpu) => gpu.synchronize(),
        }
    }

    /// Checks that `tensor` belongs to this device.
    pub(crate) fn check(&self, op: &'static str, operand: &'static str, tensor: &Tensor) -> Result<()> {
        if tensor.device_id == self.inner.id {
            return Ok(());
        }
        Err(Error::DeviceMismatch {
            op,
            operand,
            expected: self.inner.description.clone(),
            found: "another device".into(),
        })
    }

    /// Checks that `tensor` belongs to this device and has element type `dtype`.
    pub(crate) fn check_f(&self, op: &'static str, operand: &'static str, tensor: &Tensor, dtype: DType) -> Result<()> {
        self.check(op, operand, tensor)?;
        if tensor.dtype != dtype {
            return Err(tensor.dtype_error(op, operand, dtype.name()));
        }
        Ok(())
    }

    /// Copies a host tensor to this device, keeping its element type.
    pub fn upload(&self, host: &HostTensor) -> Result<Tensor> {
        let expected: usize = host.shape.iter().product();
        if expected != host.numel() {
            return Err(shape_err!("upload", "shape {:?} does not match the data", host.shape));
        }
        match &self.inner.backend {
            Backend::Cpu => {
                let storage = match &host.data {
                    HostData::F32(values) => CpuStorage::F32(values.clone()),
                    HostData::F16(values) => CpuStorage::F16(values.clone()),
                    HostData::U32(values) => CpuStorage::U32(values.clone()),
                };
                Ok(Tensor::from_storage(host.shape.clone(), host.dtype(), Storage::Cpu(storage), self.id()))
            }
            Backend::Gpu(gpu) => {
                let buffer = gpu.upload(&host.data)?;
                Ok(Tensor::from_storage(host.shape.clone(), host.dtype(), Storage::Gpu(buffer), self.id()))
            }
        }
    }

    /// Copies a host tensor to this device as `dtype` (f32 or f16).
    pub fn upload_as(&self, host: HostTensor, dtype: DType) -> Result<Tensor> {
        let host = match dtype {
            DType::F32 => host.into_f32(),
            DType::F16 => host.into_f16(),
            DType::U32 => return Err(Error::InvalidValue {
                op: "upload_as",
                message: "weights can be stored as f32 or f16, not u32".into(),
            }),
        };
        self.upload(&host)
    }

    /// Creates an f32 tensor from host values.
    pub fn from_f32(&self, shape: impl Into<Vec<usize>>, values: Vec<f32>) -> Result<Tensor> {
        let host = HostTensor::from_f32(shape, values)?;
        match &self.inner.backend {
            Backend::Cpu => Ok(Tensor::cpu_f32(host.shape, match host.data {
                HostData::F32(values) => values,
                _ => unreachable!("from_f32 builds f32 data"),
            }, self.id())),
            Backend::Gpu(_) => self.upload(&host),
        }
    }

    /// Creates an f16 tensor from host values.
    pub fn from_f16(&self, shape: impl Into<Vec<usize>>, values: Vec<f16>) -> Result<Tensor> {
        self.upload(&HostTensor::from_f16(shape, values)?)
    }

    /// Creates a u32 tensor (ids, indices, masks) from host values.
    pub fn from_u32(&self, shape: impl Into<Vec<usize>>, values: Vec<u32>) -> Result<Tensor> {
        let host = HostTensor::from_u32(shape, values)?;
        match &self.inner.backend {
            Backend::Cpu => Ok(Tensor::cpu_u32(host.shape, match host.data {
                HostData::U32(values) => values,
                _ => unreachable!("from_u32 builds u32 data"),
            }, self.id())),
            Backend::Gpu(_) => self.upload(&host),
        }
    }

    /// Creates a tensor of zeros.
    pub fn zeros(&self, shape: impl Into<Vec<usize>>, dtype: DType) -> Result<Tensor> {
        let shape = shape.into();
        let numel = shape.iter().product();
        match &self.inner.backend {
            Backend::Cpu => {
                let storage = match dtype {
                    DType::F32 => CpuStorage::F32(vec![0.0; numel]),
                    DType::F16 => CpuStorage::F16(vec![f16::ZERO; numel]),
                    DType::U32 => CpuStorage::U32(vec![0; numel]),
                };
                Ok(Tensor::from_storage(shape, dtype, Storage::Cpu(storage), self.id()))
            }
            Backend::Gpu(gpu) => {
                let buffer = gpu.zeros(numel * dtype.size_in_bytes())?;
                Ok(Tensor::from_storage(shape, dtype, Storage::Gpu(buffer), self.id()))
            }
        }
    }

    /// Creates an f32 tensor with every element equal to `value`.
    pub fn full(&self, shape: impl Into<Vec<usize>>, value: f32) -> Result<Tensor> {
        let shape = shape.into();
        let numel = shape.iter().product();
        self.from_f32(shape, vec![value; numel])
    }

    /// Copies `tensor` from another device to this one.
    pub fn transfer(&self, tensor: &Tensor) -> Result<Tensor> {
        if tensor.device_id == self.id() {
            return Ok(tensor.clone());
        }
        self.upload(&tensor.to_host()?)
    }

    /// Returns a copy of `tensor` that shares no storage with it.
    pub fn copy(&self, tensor: &Tensor) -> Result<Tensor> {
        self.check("copy", "tensor", tensor)?;
        match (&self.inner.backend, tensor.storage.as_ref()) {
            (Backend::Gpu(gpu), Storage::Gpu(buffer)) => {
                let copy = gpu.copy_buffer(buffer, tensor.size_in_bytes())?;
                Ok(Tensor::from_storage(tensor.shape.clone(), tensor.dtype, Storage::Gpu(copy), self.id()))
            }
            _ => self.upload(&tensor.to_host()?),
        }
    }
}
