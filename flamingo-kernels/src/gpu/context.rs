//! The state one opened adapter shares with its buffers: device, queue,
//! error log, buffer pool and pipeline cache, and the `Job` through which
//! every op records and submits its dispatches.
//!
//! Errors: wgpu reports validation errors, out-of-memory and internal
//! errors to an uncaptured-error handler, which here records them instead
//! of panicking. Every op checks the record after submitting, so a failure
//! surfaces as `Error::Gpu` from the op that caused it (or, for errors the
//! driver reports late, from the next op, sync or download). A lost device
//! is recorded for good: every later call fails with its reason.
//!
//! Submission: each op records its dispatches into one command encoder and
//! submits it when done. Each dispatch gets its own small uniform buffer of
//! parameters from a pool. A uniform buffer returns to the pool only after
//! the submission that reads it. `Queue::write_buffer` lands before the next
//! submission, so a later write never overwrites parameters that a pending
//! dispatch still needs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};
use crate::gpu::adapter::{AdapterSummary, Opened};
use crate::gpu::pool::{GpuBuffer, Pool};
use crate::gpu::shaders;

/// Bytes of one dispatch's uniform parameter block.
pub(crate) const UNIFORM_BYTES: u64 = 256;

/// Kernel files compiled without wgpu's buffer bounds checks. Each index
/// they compute is clamped to the matrix (rows and columns past the edge
/// read the last one) or tested before use.
const UNCHECKED_FILES: &[&str] = &["matmul.wgsl"];

/// Threads per workgroup of the one-dimensional elementwise kernels.
pub(crate) const ELEMENTWISE_WORKGROUP: u32 = 256;

/// The identity of one compiled kernel: WGSL file, entry point and specialisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct KernelKey {
    pub file: &'static str,
    pub entry: &'static str,
    /// `#if` flags of the templating step.
    pub flags: Vec<&'static str>,
    /// Value constants pasted in as `const` declarations.
    pub consts: Vec<(&'static str, u32)>,
    /// Pipeline-overridable constants, as f64 bit patterns so the key hashes.
    pub overrides: Vec<(&'static str, u64)>,
    /// Kinds of bindings 1, 2, … (binding 0 is the parameter block).
    pub bindings: Vec<BindingKind>,
}

/// The kind of one binding after the parameter block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum BindingKind {
    /// A storage buffer, read-only or read and written.
    Storage { read_only: bool },
    /// A `texture_2d<f32>` read with `textureLoad`.
    Texture,
}

impl KernelKey {
    pub(crate) fn new(file: &'static str, entry: &'static str) -> Self {
        Self { file, entry, flags: Vec::new(), consts: Vec::new(), overrides: Vec::new(), bindings: Vec::new() }
    }

    pub(crate) fn flag(mut self, flag: &'static str, on: bool) -> Self {
        if on {
            self.flags.push(flag);
        }
        self
    }

    pub(crate) fn constant(mut self, name: &'static str, value: u32) -> Self {
        self.consts.push((name, value));
        self
    }

    pub(crate) fn set(mut self, name: &'static str, value: f64) -> Self {
        self.overrides.push((name, value.to_bits()));
        self
    }
}

/// One storage binding of a dispatch: a byte range of a buffer.
#[derive(Clone, Copy)]
pub(crate) struct Arg<'a> {
    pub buffer: &'a wgpu::Buffer,
    pub offset: u64,
    pub size: u64,
    pub read_only: bool,
}

impl<'a> Arg<'a> {
    /// Binds the whole tensor, read-only.
    pub(crate) fn read(buffer: &'a GpuBuffer) -> Self {
        Self { buffer: buffer.raw(), offset: 0, size: buffer.bindable_bytes(), read_only: true }
    }

    /// Binds the whole tensor, read and written.
    pub(crate) fn write(buffer: &'a GpuBuffer) -> Self {
        Self { read_only: false, ..Self::read(buffer) }
    }

    /// Bytes `offset .. offset + size` of a tensor; `size` is rounded up to whole words.
    pub(crate) fn range(buffer: &'a GpuBuffer, offset: u64, size: u64, read_only: bool) -> Self {
        let end = (offset + size.max(4)).next_multiple_of(4).min(buffer.raw().size());
        Self { buffer: buffer.raw(), offset, size: end - offset, read_only }
    }
}

/// One binding of a dispatch after the parameter block.
#[derive(Clone, Copy)]
pub(crate) enum Binding<'a> {
    Buffer(Arg<'a>),
    Texture(&'a wgpu::TextureView),
}

impl Binding<'_> {
    fn kind(&self) -> BindingKind {
        match self {
            Binding::Buffer(arg) => BindingKind::Storage { read_only: arg.read_only },
            Binding::Texture(_) => BindingKind::Texture,
        }
    }
}

/// Texels per row of a staging texture. A tensor is copied into one as a
/// flat run of texels: texel `t` lies at column `t % TEXELS_PER_ROW` of row
/// `t / TEXELS_PER_ROW`. WebGPU guarantees 8192 texels per dimension.
pub(crate) const TEXELS_PER_ROW: u32 = 4096;

/// Parameters of one dispatch, written as 32-bit words in the order of the
/// shader's uniform struct.
#[derive(Default, Clone)]
pub(crate) struct Params(pub Vec<u32>);

impl Params {
    pub(crate) fn new() -> Self {
        Self(Vec::with_capacity(16))
    }

    pub(crate) fn u(mut self, value: usize) -> Self {
        self.0.push(u32::try_from(value).expect("kernel sizes are checked to fit u32 before dispatch"));
        self
    }

    pub(crate) fn f(mut self, value: f32) -> Self {
        self.0.push(value.to_bits());
        self
    }
}

/// A shader module's identity: file, template flags and value constants.
type ModuleKey = (&'static str, Vec<&'static str>, Vec<(&'static str, u32)>);

struct Layout {
    bind_group: wgpu::BindGroupLayout,
    pipeline: wgpu::PipelineLayout,
}

/// Shared state of one opened adapter.
pub(crate) struct Context {
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub summary: AdapterSummary,
    pub limits: wgpu::Limits,
    pub f16: bool,
    pub subgroups: bool,
    errors: Arc<Mutex<Vec<String>>>,
    lost: Arc<Mutex<Option<String>>>,
    pub(crate) pool: Mutex<Pool>,
    uniforms: Mutex<Vec<wgpu::Buffer>>,
    modules: Mutex<HashMap<ModuleKey, wgpu::ShaderModule>>,
    layouts: Mutex<HashMap<Vec<BindingKind>, Arc<Layout>>>,
    /// Staging textures by slot and format (see [`Context::staging_texture`]).
    staging: Mutex<HashMap<(u8, wgpu::TextureFormat), wgpu::Texture>>,
    pipelines: Mutex<HashMap<KernelKey, Arc<wgpu::ComputePipeline>>>,
}

impl Context {
    pub(crate) fn new(opened: Opened) -> Arc<Self> {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let lost = Arc::new(Mutex::new(None));
        let sink = errors.clone();
        opened.device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let message = match &error {
                wgpu::Error::OutOfMemory { .. } => "out of GPU memory".to_string(),
                other => other.to_string(),
            };
            if let Ok(mut errors) = sink.lock() {
                // Keep the first few; later ones are usually consequences of the first.
                if errors.len() < 8 {
                    errors.push(message);
                }
            }
        }));
        let lost_sink = lost.clone();
        opened.device.set_device_lost_callback(move |reason, message| {
            if let Ok(mut lost) = lost_sink.lock() {
                lost.get_or_insert_with(|| format!("the GPU device was lost ({reason:?}): {message}"));
            }
        });
        Arc::new(Context {
            device: opened.device,
            queue: opened.queue,
            summary: opened.summary,
            limits: opened.limits,
            f16: opened.f16,
            subgroups: opened.subgroups,
            errors,
            lost,
            pool: Mutex::new(Pool::default()),
            uniforms: Mutex::new(Vec::new()),
            modules: Mutex::new(HashMap::new()),
            layouts: Mutex::new(HashMap::new()),
            staging: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
        })
    }

    /// Turns any error recorded since the last check into `Error::Gpu`.
    pub(crate) fn check(&self, op: &'static str) -> Result<()> {
        if let Some(reason) = self.lost.lock().ok().and_then(|lost| lost.clone()) {
            return Err(Error::Gpu(format!("{op}: {reason}")));
        }
        let recorded: Vec<String> = match self.errors.lock() {
            Ok(mut errors) => errors.drain(..).collect(),
            Err(_) => Vec::new(),
        };
        if recorded.is_empty() {
            return Ok(());
        }
        Err(Error::Gpu(format!("{op}: {}", recorded.join("; "))))
    }

    /// Waits for every submitted command and reports recorded errors.
    pub(crate) fn synchronize(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|error| Error::Gpu(format!("synchronize: waiting for the GPU failed: {error}")))?;
        self.check("synchronize")
    }

    /// Returns the largest storage binding, in bytes.
    pub(crate) fn max_binding(&self) -> u64 {
        self.limits.max_storage_buffer_binding_size
    }

    /// Returns the required alignment of a storage binding's offset, in bytes.
    pub(crate) fn binding_alignment(&self) -> u64 {
        self.limits.min_storage_buffer_offset_alignment as u64
    }

    /// Splits `groups` workgroups into a grid within the per-dimension limit.
    pub(crate) fn grid(&self, groups: u64) -> [u32; 3] {
        let max = self.limits.max_compute_workgroups_per_dimension.max(1) as u64;
        if groups <= max {
            return [groups.max(1) as u32, 1, 1];
        }
        [max as u32, groups.div_ceil(max) as u32, 1]
    }

    /// Returns a texture of `format` with at least `rows` rows of
    /// [`TEXELS_PER_ROW`] texels, for operands copied out of buffers.
    ///
    /// Each slot keeps one texture, replaced by a larger one when a bigger
    /// operand comes. A job copies into it and reads it in the same
    /// submission, and submissions run in order, so later jobs can reuse it
    /// (wgpu keeps a replaced texture alive until the work reading it ends).
    pub(crate) fn staging_texture(&self, slot: u8, format: wgpu::TextureFormat, rows: u32) -> wgpu::Texture {
        let mut staging = self.staging.lock().expect("staging texture lock");
        if let Some(texture) = staging.get(&(slot, format)) {
            if texture.height() >= rows {
                return texture.clone();
            }
        }
        let rows = rows.next_power_of_two().min(self.limits.max_texture_dimension_2d).max(rows);
        let texture = self.device.create_texture(&wgpu::TextureDescriptor {
            label: Some("flamingo staging texture"),
            size: wgpu::Extent3d { width: TEXELS_PER_ROW, height: rows, depth_or_array_layers: 1 },
            mip_level_count: 1,
            sample_count: 1,
            dimension: wgpu::TextureDimension::D2,
            format,
            usage: wgpu::TextureUsages::TEXTURE_BINDING | wgpu::TextureUsages::COPY_DST,
            view_formats: &[],
        });
        staging.insert((slot, format), texture.clone());
        texture
    }

    fn layout(&self, kinds: &[BindingKind]) -> Arc<Layout> {
        let mut layouts = self.layouts.lock().expect("layout cache lock");
        if let Some(layout) = layouts.get(kinds) {
            return layout.clone();
        }
        let mut entries = vec![wgpu::BindGroupLayoutEntry {
            binding: 0,
            visibility: wgpu::ShaderStages::COMPUTE,
            ty: wgpu::BindingType::Buffer {
                ty: wgpu::BufferBindingType::Uniform,
                has_dynamic_offset: false,
                min_binding_size: None,
            },
            count: None,
        }];
        for (index, kind) in kinds.iter().enumerate() {
            let ty = match *kind {
                BindingKind::Storage { read_only } => wgpu::BindingType::Buffer {
                    ty: wgpu::BufferBindingType::Storage { read_only },
                    has_dynamic_offset: false,
                    min_binding_size: None,
                },
                BindingKind::Texture => wgpu::BindingType::Texture {
                    sample_type: wgpu::TextureSampleType::Float { filterable: false },
                    view_dimension: wgpu::TextureViewDimension::D2,
                    multisampled: false,
                },
            };
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: index as u32 + 1,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty,
                count: None,
            });
        }
        let bind_group = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
            label: Some("flamingo kernel bindings"),
            entries: &entries,
        });
        let pipeline = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some("flamingo kernel layout"),
            bind_group_layouts: &[Some(&bind_group)],
            immediate_size: 0,
        });
        let layout = Arc::new(Layout { bind_group, pipeline });
        layouts.insert(kinds.to_vec(), layout.clone());
        layout
    }

    /// Compiles (once per process and device) the pipeline `key` names.
    fn pipeline(&self, op: &'static str, key: &KernelKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(pipeline) = self.pipelines.lock().expect("pipeline cache lock").get(key) {
            return Ok(pipeline.clone());
        }

        let mut flags = key.flags.clone();
        if self.f16 {
            flags.push("NATIVE_F16");
        }
        if self.subgroups {
            flags.push("SUBGROUPS");
        }
        flags.sort_unstable();
        flags.dedup();

        let module_key = (key.file, flags.clone(), key.consts.clone());
        let module = {
            let mut modules = self.modules.lock().expect("shader module cache lock");
            match modules.get(&module_key) {
                Some(module) => module.clone(),
                None => {
                    let source = shaders::expand(key.file, &flags, &key.consts)
                        .map_err(|message| Error::Gpu(format!("{op}: shader template: {message}")))?;
                    let descriptor = wgpu::ShaderModuleDescriptor {
                        label: Some(key.file),
                        source: wgpu::ShaderSource::Wgsl(source.into()),
                    };
                    // wgpu's runtime checks clamp every buffer index and add a
                    // counter to every loop; on llvmpipe they halve matmul speed.
                    // Every loop here ends after a bound the host computes, so the
                    // loop counter goes everywhere. Bounds checks go only for the
                    // files in UNCHECKED_FILES, whose indices are clamped by hand.
                    let checks = wgpu::ShaderRuntimeChecks {
                        force_loop_bounding: false,
                        bounds_checks: !UNCHECKED_FILES.contains(&key.file),
                        ..wgpu::ShaderRuntimeChecks::checked()
                    };
                    // SAFETY: the loops of every kernel terminate (see above), and
                    // the kernels of UNCHECKED_FILES clamp or test each index
                    // against sizes the host checked against the bound ranges.
                    let module = unsafe { self.device.create_shader_module_trusted(descriptor, checks) };
                    self.check(op)?;
                    modules.insert(module_key, module.clone());
                    module
                }
            }
        };

        let layout = self.layout(&key.bindings);
        let constants: Vec<(&str, f64)> =
            key.overrides.iter().map(|&(name, bits)| (name, f64::from_bits(bits))).collect();
        let pipeline = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(key.entry),
            layout: Some(&layout.pipeline),
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                // Every kernel initialises the workgroup memory it reads.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        self.check(op).map_err(|error| Error::Gpu(format!("{error} (kernel {}::{})", key.file, key.entry)))?;
        let pipeline = Arc::new(pipeline);
        self.pipelines.lock().expect("pipeline cache lock").insert(key.clone(), pipeline.clone());
        Ok(pipeline)
    }

    fn uniform(&self) -> wgpu::Buffer {
        if let Some(buffer) = self.uniforms.lock().expect("uniform pool lock").pop() {
            return buffer;
        }
        self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flamingo kernel parameters"),
            size: UNIFORM_BYTES,
            usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        })
    }

    /// Starts recording the commands of one op.
    pub(crate) fn job(self: &Arc<Self>, op: &'static str) -> Job {
        let encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(op) });
        Job { context: self.clone(), op, encoder: Some(encoder), uniforms: Vec::new() }
    }
}

/// The commands of one op, submitted together by [`Job::submit`].
pub(crate) struct Job {
    context: Arc<Context>,
    op: &'static str,
    encoder: Option<wgpu::CommandEncoder>,
    uniforms: Vec<wgpu::Buffer>,
}

impl Job {
    /// Returns the op this job records, for messages.
    pub(crate) fn op(&self) -> &'static str {
        self.op
    }

    fn encoder(&mut self) -> &mut wgpu::CommandEncoder {
        self.encoder.as_mut().expect("a job records until it is submitted")
    }

    /// Records one dispatch of the kernel `key` over `groups` workgroups.
    pub(crate) fn dispatch(&mut self, key: KernelKey, params: &Params, args: &[Arg], groups: [u32; 3]) -> Result<()> {
        let bindings: Vec<Binding> = args.iter().map(|&arg| Binding::Buffer(arg)).collect();
        self.dispatch_bindings(key, params, &bindings, groups)
    }

    /// Records one dispatch whose bindings may include textures.
    pub(crate) fn dispatch_bindings(&mut self, key: KernelKey, params: &Params, bindings: &[Binding], groups: [u32; 3]) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let mut key = key;
        key.bindings = bindings.iter().map(Binding::kind).collect();
        let pipeline = self.context.pipeline(self.op, &key)?;
        let layout = self.context.layout(&key.bindings);

        let uniform = self.context.uniform();
        debug_assert!(params.0.len() * 4 <= UNIFORM_BYTES as usize, "{}: too many parameters", self.op);
        if !params.0.is_empty() {
            self.context.queue.write_buffer(&uniform, 0, bytemuck::cast_slice(&params.0));
        }

        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: uniform.as_entire_binding() }];
        for (index, binding) in bindings.iter().enumerate() {
            let resource = match binding {
                Binding::Buffer(arg) => wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: arg.buffer,
                    offset: arg.offset,
                    size: wgpu::BufferSize::new(arg.size),
                }),
                Binding::Texture(view) => wgpu::BindingResource::TextureView(view),
            };
            entries.push(wgpu::BindGroupEntry { binding: index as u32 + 1, resource });
        }
        let bind_group = self.context.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(key.entry),
            layout: &layout.bind_group,
            entries: &entries,
        });

        {
            let mut pass = self.encoder().begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(key.entry),
                timestamp_writes: None,
            });
            pass.set_pipeline(&pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(groups[0], groups[1], groups[2]);
        }
        self.uniforms.push(uniform);
        Ok(())
    }

    /// Records zero-filling a whole buffer.
    pub(crate) fn clear(&mut self, buffer: &GpuBuffer) {
        let raw = buffer.raw().clone();
        self.encoder().clear_buffer(&raw, 0, None);
    }

    /// Records a copy of `size` bytes between buffers (offsets and size in whole words).
    pub(crate) fn copy(&mut self, source: &GpuBuffer, source_offset: u64, target: &GpuBuffer, target_offset: u64, size: u64) {
        if size == 0 {
            return;
        }
        let (source, target) = (source.raw().clone(), target.raw().clone());
        self.encoder().copy_buffer_to_buffer(&source, source_offset, &target, target_offset, size);
    }

    /// Records a copy of `texels` texels of `texel_bytes` each, from byte
    /// `offset` of a buffer, into the first texels of a staging texture
    /// (in the layout of [`Context::staging_texture`]).
    pub(crate) fn copy_to_texture(&mut self, source: &wgpu::Buffer, offset: u64, texels: u64, texel_bytes: u64, texture: &wgpu::Texture) {
        let row = TEXELS_PER_ROW as u64;
        let full_rows = texels / row;
        let remainder = texels % row;
        let layout = |start: u64| wgpu::TexelCopyBufferLayout {
            offset: start,
            bytes_per_row: Some((row * texel_bytes) as u32),
            rows_per_image: None,
        };
        let target = |y: u64| wgpu::TexelCopyTextureInfo {
            texture,
            mip_level: 0,
            origin: wgpu::Origin3d { x: 0, y: y as u32, z: 0 },
            aspect: wgpu::TextureAspect::All,
        };
        let encoder = self.encoder.as_mut().expect("a job records until it is submitted");
        if full_rows > 0 {
            encoder.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo { buffer: source, layout: layout(offset) },
                target(0),
                wgpu::Extent3d { width: TEXELS_PER_ROW, height: full_rows as u32, depth_or_array_layers: 1 },
            );
        }
        if remainder > 0 {
            encoder.copy_buffer_to_texture(
                wgpu::TexelCopyBufferInfo { buffer: source, layout: layout(offset + full_rows * row * texel_bytes) },
                target(full_rows),
                wgpu::Extent3d { width: remainder as u32, height: 1, depth_or_array_layers: 1 },
            );
        }
    }

    /// Submits the recorded commands and reports any error they caused.
    pub(crate) fn submit(mut self) -> Result<()> {
        let encoder = self.encoder.take().expect("a job is submitted once");
        self.context.queue.submit([encoder.finish()]);
        let uniforms = std::mem::take(&mut self.uniforms);
        self.context.uniforms.lock().expect("uniform pool lock").extend(uniforms);
        self.context.check(self.op)
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        // A job abandoned by an error still submits nothing; its uniforms
        // were never read by a submission, so they can be reused at once.
        let uniforms = std::mem::take(&mut self.uniforms);
        if let Ok(mut pool) = self.context.uniforms.lock() {
            pool.extend(uniforms);
        }
    }
}
