//! Listing wgpu adapters and opening one as a device with its own limits.
//!
//! Adapters are listed from every backend wgpu was built with (Vulkan,
//! Metal, DX12, GL). They are sorted by API, then name, vendor and device
//! id, so an index stays the same from one run to the next on one machine.

use std::sync::OnceLock;

use crate::device::GraphicsApi;
use crate::error::{Error, Result};

/// The kind of processor an adapter drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterKind {
    DiscreteGpu,
    IntegratedGpu,
    VirtualGpu,
    /// A software rasterizer such as Mesa's lavapipe.
    Cpu,
    Other,
}

impl AdapterKind {
    /// Whether the adapter is a real GPU rather than software emulation.
    pub fn is_hardware(self) -> bool {
        matches!(self, AdapterKind::DiscreteGpu | AdapterKind::IntegratedGpu | AdapterKind::VirtualGpu)
    }

    /// The lower-case name used in listings.
    pub fn name(self) -> &'static str {
        match self {
            AdapterKind::DiscreteGpu => "discrete GPU",
            AdapterKind::IntegratedGpu => "integrated GPU",
            AdapterKind::VirtualGpu => "virtual GPU",
            AdapterKind::Cpu => "software (CPU)",
            AdapterKind::Other => "other",
        }
    }
}

/// A description of one adapter, for listing and for device choice.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterSummary {
    /// Position in [`list_adapters`], usable as `--device INDEX`.
    pub index: usize,
    pub name: String,
    pub api: Option<GraphicsApi>,
    pub kind: AdapterKind,
    /// The driver name and version, as the driver reports them.
    pub driver: String,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_binding: u64,
    /// Largest buffer, in bytes.
    pub max_buffer: u64,
    pub shader_f16: bool,
    pub subgroups: bool,
    /// Smallest and largest subgroup size, as the adapter reports them.
    pub subgroup_sizes: (u32, u32),
    /// Every limit the adapter reports; opening it requests these.
    pub limits: wgpu::Limits,
    /// Every optional feature the adapter offers.
    pub features: wgpu::Features,
}

/// Settings for opening an adapter, mostly to exercise fallback paths in tests.
///
/// [`GpuOptions::from_env`] reads them from the environment, so that a whole
/// test suite can run with a small storage binding or without f16 and
/// subgroups:
///
/// - `FLAMINGO_GPU_MAX_BINDING=BYTES` caps the storage binding size (and raises
///   the binding offset alignment to 256 bytes, the common hardware value);
/// - `FLAMINGO_GPU_NO_F16=1` and `FLAMINGO_GPU_NO_SUBGROUPS=1` leave the
///   features off.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct GpuOptions {
    /// Request at most this many bytes per storage binding.
    pub max_storage_binding: Option<u64>,
    /// Leave SHADER_F16 off even where the adapter has it.
    pub disable_f16: bool,
    /// Leave SUBGROUP off even where the adapter has it.
    pub disable_subgroups: bool,
}

impl GpuOptions {
    /// Reads the options from the `FLAMINGO_GPU_*` environment variables.
    /// A value that does not parse is logged as a warning and ignored.
    pub fn from_env() -> Self {
        let flag = |name: &str| match std::env::var(name) {
            Ok(value) if value == "1" => true,
            Ok(value) if value.is_empty() || value == "0" => false,
            Ok(value) => {
                tracing::warn!("{name}={value:?} is ignored: the flag takes effect only when set to 1");
                false
            }
            Err(_) => false,
        };
        let max_storage_binding = match std::env::var("FLAMINGO_GPU_MAX_BINDING") {
            Ok(value) if !value.trim().is_empty() => match value.trim().parse::<u64>() {
                Ok(bytes) => Some(bytes),
                Err(_) => {
                    tracing::warn!("FLAMINGO_GPU_MAX_BINDING={value:?} is ignored: it must be a whole number of bytes, at least 256, such as 134217728");
                    None
                }
            },
            _ => None,
        };
        GpuOptions {
            max_storage_binding,
            disable_f16: flag("FLAMINGO_GPU_NO_F16"),
            disable_subgroups: flag("FLAMINGO_GPU_NO_SUBGROUPS"),
        }
    }
}

/// The process-wide wgpu instance; adapters and devices borrow from it.
pub(crate) fn instance() -> &'static wgpu::Instance {
    static INSTANCE: OnceLock<wgpu::Instance> = OnceLock::new();
    INSTANCE.get_or_init(|| {
        let mut descriptor = wgpu::InstanceDescriptor::new_without_display_handle_from_env();
        // Backend validation layers are for debugging wgpu itself; WGPU_VALIDATION turns them on.
        if std::env::var_os("WGPU_VALIDATION").is_none() {
            descriptor.flags.remove(wgpu::InstanceFlags::VALIDATION | wgpu::InstanceFlags::GPU_BASED_VALIDATION);
        }
        wgpu::Instance::new(descriptor)
    })
}

fn api_of(backend: wgpu::Backend) -> Option<GraphicsApi> {
    match backend {
        wgpu::Backend::Vulkan => Some(GraphicsApi::Vulkan),
        wgpu::Backend::Metal => Some(GraphicsApi::Metal),
        wgpu::Backend::Dx12 => Some(GraphicsApi::Dx12),
        wgpu::Backend::Gl => Some(GraphicsApi::Gl),
        _ => None,
    }
}

fn kind_of(device_type: wgpu::DeviceType) -> AdapterKind {
    match device_type {
        wgpu::DeviceType::DiscreteGpu => AdapterKind::DiscreteGpu,
        wgpu::DeviceType::IntegratedGpu => AdapterKind::IntegratedGpu,
        wgpu::DeviceType::VirtualGpu => AdapterKind::VirtualGpu,
        wgpu::DeviceType::Cpu => AdapterKind::Cpu,
        wgpu::DeviceType::Other => AdapterKind::Other,
    }
}

/// Every adapter wgpu finds, in the stable order of [`list_adapters`],
/// enumerated once per process: adapters do not change while it runs, and
/// enumerating again would touch the GL backend's shared EGL context while
/// another thread may be using it.
pub(crate) fn sorted_adapters() -> &'static [wgpu::Adapter] {
    static ADAPTERS: OnceLock<Vec<wgpu::Adapter>> = OnceLock::new();
    ADAPTERS.get_or_init(enumerate_sorted)
}

fn enumerate_sorted() -> Vec<wgpu::Adapter> {
    let mut adapters = pollster::block_on(instance().enumerate_adapters(wgpu::Backends::all()));
    adapters.sort_by_cached_key(|adapter| {
        let info = adapter.get_info();
        let api_rank = match info.backend {
            wgpu::Backend::Vulkan => 0,
            wgpu::Backend::Metal => 1,
            wgpu::Backend::Dx12 => 2,
            wgpu::Backend::Gl => 3,
            _ => 4,
        };
        (api_rank, info.name, info.vendor, info.device, info.driver, info.driver_info)
    });
    adapters
}

pub(crate) fn summarize(index: usize, adapter: &wgpu::Adapter) -> AdapterSummary {
    let info = adapter.get_info();
    let limits = adapter.limits();
    let features = adapter.features();
    let driver = match (info.driver.is_empty(), info.driver_info.is_empty()) {
        (false, false) => format!("{} ({})", info.driver, info.driver_info),
        (false, true) => info.driver.clone(),
        (true, false) => info.driver_info.clone(),
        (true, true) => "unknown driver".to_string(),
    };
    AdapterSummary {
        index,
        name: info.name.clone(),
        api: api_of(info.backend),
        kind: kind_of(info.device_type),
        driver,
        max_storage_binding: limits.max_storage_buffer_binding_size,
        max_buffer: limits.max_buffer_size,
        shader_f16: features.contains(wgpu::Features::SHADER_F16),
        subgroups: features.contains(wgpu::Features::SUBGROUP),
        subgroup_sizes: (info.subgroup_min_size, info.subgroup_max_size),
        limits,
        features,
    }
}

/// Lists every adapter wgpu finds, in a stable order.
pub fn list_adapters() -> Vec<AdapterSummary> {
    sorted_adapters()
        .iter()
        .enumerate()
        .map(|(index, adapter)| summarize(index, adapter))
        .collect()
}

/// An opened adapter: its device and queue, and what was enabled.
pub(crate) struct Opened {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub summary: AdapterSummary,
    /// The limits the device was created with.
    pub limits: wgpu::Limits,
    pub f16: bool,
    pub subgroups: bool,
}

/// Opens adapter `index` of [`list_adapters`] with its own limits.
pub(crate) fn open(index: usize, options: &GpuOptions) -> Result<Opened> {
    let adapters = sorted_adapters();
    let count = adapters.len();
    let adapter = adapters.get(index).ok_or_else(|| {
        Error::Device(format!(
            "adapter index {index} does not exist; {count} adapter(s) were found (run `flamingo devices`)"
        ))
    })?;
    let summary = summarize(index, adapter);

    let f16 = summary.shader_f16 && !options.disable_f16;
    let subgroups = summary.subgroups && !options.disable_subgroups;
    let mut features = wgpu::Features::empty();
    if f16 {
        features |= wgpu::Features::SHADER_F16;
    }
    if subgroups {
        features |= wgpu::Features::SUBGROUP;
    }

    // wgpu's default limits cap a storage binding at 128 MiB and a buffer at
    // 256 MiB; embeddings and logits of real models exceed both.
    let mut limits = adapter.limits();
    if let Some(cap) = options.max_storage_binding {
        limits.max_storage_buffer_binding_size = limits.max_storage_buffer_binding_size.min(cap.max(256));
        limits.min_storage_buffer_offset_alignment = limits.min_storage_buffer_offset_alignment.max(256);
    }

    let descriptor = wgpu::DeviceDescriptor {
        label: Some("flamingo"),
        required_features: features,
        required_limits: limits.clone(),
        experimental_features: wgpu::ExperimentalFeatures::disabled(),
        memory_hints: wgpu::MemoryHints::Performance,
        trace: wgpu::Trace::Off,
    };
    let (device, queue) = pollster::block_on(adapter.request_device(&descriptor)).map_err(|error| {
        Error::Device(format!("adapter {index} ({}) could not be opened: {error}", summary.name))
    })?;
    Ok(Opened { device, queue, summary, limits, f16, subgroups })
}
