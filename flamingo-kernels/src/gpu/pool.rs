//! Device buffers and the pool that recycles them.
//!
//! A training step allocates the same sizes every time, so buffers are not
//! freed when a tensor drops: they go back to a free list keyed by a size
//! class (four classes per power of two above 4 KiB, so at most a quarter is
//! wasted) and the next request of that class takes one. Reuse is safe
//! because one queue executes everything in submission order: a buffer
//! handed out again is only written by commands recorded after the last
//! command that read it. The one exception, `Queue::write_buffer`, lands
//! before the next submission, which is still after every earlier one.
//!
//! When an allocation runs out of memory, the free lists are released and
//! the allocation is tried once more.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::gpu::context::Context;
use crate::host::HostData;
use crate::tensor::DType;

/// Usage of every tensor buffer: bound as storage, and copied to and from.
pub(crate) const STORAGE_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::STORAGE
    .union(wgpu::BufferUsages::COPY_SRC)
    .union(wgpu::BufferUsages::COPY_DST);

/// Usage of the staging buffers downloads copy into.
const READBACK_USAGE: wgpu::BufferUsages = wgpu::BufferUsages::MAP_READ.union(wgpu::BufferUsages::COPY_DST);

/// Free buffers by (usage, capacity).
#[derive(Default)]
pub(crate) struct Pool {
    free: HashMap<(u32, u64), Vec<wgpu::Buffer>>,
    free_bytes: u64,
}

/// The capacity a request of `bytes` is rounded up to.
fn size_class(bytes: u64) -> u64 {
    let bytes = bytes.max(16).next_multiple_of(16);
    if bytes <= 4096 {
        return bytes.next_power_of_two();
    }
    let octave = 1u64 << (63 - bytes.leading_zeros());
    bytes.next_multiple_of(octave / 4)
}

impl Pool {
    fn take(&mut self, usage: wgpu::BufferUsages, capacity: u64) -> Option<wgpu::Buffer> {
        let buffer = self.free.get_mut(&(usage.bits(), capacity))?.pop()?;
        self.free_bytes -= capacity;
        Some(buffer)
    }

    fn give_back(&mut self, usage: wgpu::BufferUsages, buffer: wgpu::Buffer) {
        self.free_bytes += buffer.size();
        self.free.entry((usage.bits(), buffer.size())).or_default().push(buffer);
    }

    /// Drops every free buffer, returning the bytes released.
    pub(crate) fn release_all(&mut self) -> u64 {
        let released = self.free_bytes;
        self.free.clear();
        self.free_bytes = 0;
        released
    }
}

impl Context {
    /// Takes a buffer of at least `bytes` from the pool or allocates one.
    pub(crate) fn allocate(self: &Arc<Self>, op: &'static str, bytes: u64) -> Result<GpuBuffer> {
        let buffer = self.raw_buffer(op, STORAGE_USAGE, bytes)?;
        Ok(GpuBuffer { buffer: Some(buffer), bytes, usage: STORAGE_USAGE, context: self.clone() })
    }

    pub(crate) fn raw_buffer(&self, op: &'static str, usage: wgpu::BufferUsages, bytes: u64) -> Result<wgpu::Buffer> {
        let max = self.limits.max_buffer_size;
        if bytes > max {
            return Err(Error::Gpu(format!(
                "{op}: a tensor of {bytes} bytes does not fit one buffer of this adapter, whose max_buffer_size is {max} bytes"
            )));
        }
        let mut capacity = size_class(bytes);
        if capacity > max {
            capacity = bytes.max(4).next_multiple_of(4);
        }
        if let Some(buffer) = self.pool.lock().expect("buffer pool lock").take(usage, capacity) {
            return Ok(buffer);
        }
        match self.create_buffer(usage, capacity) {
            Ok(buffer) => Ok(buffer),
            Err(_) => {
                // Out of memory: give the cached free buffers back to the driver and retry once.
                let released = self.pool.lock().expect("buffer pool lock").release_all();
                let _ = self.device.poll(wgpu::PollType::wait_indefinitely());
                self.create_buffer(usage, capacity).map_err(|message| {
                    Error::Gpu(format!(
                        "{op}: allocating {capacity} bytes failed even after releasing {released} cached bytes: {message}"
                    ))
                })
            }
        }
    }

    fn create_buffer(&self, usage: wgpu::BufferUsages, capacity: u64) -> std::result::Result<wgpu::Buffer, String> {
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let buffer = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("flamingo tensor"),
            size: capacity,
            usage,
            mapped_at_creation: false,
        });
        match pollster::block_on(scope.pop()) {
            None => Ok(buffer),
            Some(error) => Err(error.to_string()),
        }
    }

    fn recycle(&self, usage: wgpu::BufferUsages, buffer: wgpu::Buffer) {
        if let Ok(mut pool) = self.pool.lock() {
            pool.give_back(usage, buffer);
        }
    }

    /// Uploads `bytes` into a new buffer; a partial last word is zero-padded.
    pub(crate) fn upload_bytes(self: &Arc<Self>, op: &'static str, bytes: &[u8]) -> Result<GpuBuffer> {
        let buffer = self.allocate(op, bytes.len() as u64)?;
        let whole = bytes.len() / 4 * 4;
        if whole > 0 {
            self.queue.write_buffer(buffer.raw(), 0, &bytes[..whole]);
        }
        if whole < bytes.len() {
            let mut tail = [0u8; 4];
            tail[..bytes.len() - whole].copy_from_slice(&bytes[whole..]);
            self.queue.write_buffer(buffer.raw(), whole as u64, &tail);
        }
        self.check(op)?;
        Ok(buffer)
    }

    /// Copies the first `bytes` bytes of `source` to host memory.
    pub(crate) fn download_bytes(&self, op: &'static str, source: &wgpu::Buffer, bytes: u64) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let padded = bytes.next_multiple_of(4);
        let staging = self.raw_buffer(op, READBACK_USAGE, padded)?;
        let mut encoder = self.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(op) });
        encoder.copy_buffer_to_buffer(source, 0, &staging, 0, padded);
        self.queue.submit([encoder.finish()]);

        let (sender, receiver) = std::sync::mpsc::channel();
        let slice = staging.slice(..padded);
        slice.map_async(wgpu::MapMode::Read, move |result| {
            let _ = sender.send(result);
        });
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map_err(|error| Error::Gpu(format!("{op}: waiting for the GPU failed: {error}")))?;
        self.check(op)?;
        match receiver.recv() {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(Error::Gpu(format!("{op}: mapping the staging buffer failed: {error}"))),
            Err(_) => return Err(Error::Gpu(format!("{op}: the GPU never finished mapping the staging buffer"))),
        }
        let data = {
            let view = slice
                .get_mapped_range()
                .map_err(|error| Error::Gpu(format!("{op}: reading the staging buffer failed: {error}")))?;
            view[..bytes as usize].to_vec()
        };
        staging.unmap();
        self.recycle(READBACK_USAGE, staging);
        Ok(data)
    }
}

/// Device memory holding a tensor's elements.
///
/// Dropping it returns the memory to its device's pool.
pub struct GpuBuffer {
    buffer: Option<wgpu::Buffer>,
    /// Bytes requested; the buffer's capacity may be larger.
    bytes: u64,
    usage: wgpu::BufferUsages,
    pub(crate) context: Arc<Context>,
}

impl fmt::Debug for GpuBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GpuBuffer").field("bytes", &self.bytes).finish()
    }
}

impl Drop for GpuBuffer {
    fn drop(&mut self) {
        if let Some(buffer) = self.buffer.take() {
            self.context.recycle(self.usage, buffer);
        }
    }
}

impl GpuBuffer {
    pub(crate) fn raw(&self) -> &wgpu::Buffer {
        self.buffer.as_ref().expect("a live GpuBuffer holds its buffer")
    }

    /// Bytes requested for the tensor.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes that can be bound: the request rounded up to whole 4-byte words.
    pub(crate) fn bindable_bytes(&self) -> u64 {
        self.bytes.max(4).next_multiple_of(4).min(self.raw().size())
    }

    pub(crate) fn download(&self, dtype: DType, numel: usize) -> Result<HostData> {
        let bytes = (numel * dtype.size_in_bytes()) as u64;
        let data = self.context.download_bytes("download", self.raw(), bytes)?;
        Ok(match dtype {
            DType::F32 => HostData::F32(bytemuck::pod_collect_to_vec(&data)),
            DType::U32 => HostData::U32(bytemuck::pod_collect_to_vec(&data)),
            DType::F16 => HostData::F16(bytemuck::pod_collect_to_vec(&data)),
        })
    }
}
