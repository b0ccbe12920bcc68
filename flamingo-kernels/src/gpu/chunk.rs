//! Splitting work so that every binding fits the adapter's limits.
//!
//! A storage binding covers at most `max_storage_buffer_binding_size` bytes
//! and must start at a multiple of `min_storage_buffer_offset_alignment`.
//! Ops whose tensors exceed one binding process them in chunks of whole
//! rows (or blocks, or elements), binding each chunk's byte range. When not
//! even the smallest aligned chunk fits, the op fails with an error that
//! names the operand, the sizes and the limit, rather than truncating.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::context::{Arg, Context, Job, KernelKey, Params};
use crate::gpu::pool::GpuBuffer;

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Context {
    /// Splits `rows` rows into consecutive chunks. For every operand, given
    /// as (name, bytes per row), a chunk's rows fit one binding and the
    /// chunk's first byte is aligned for binding.
    pub(crate) fn row_chunks(&self, op: &'static str, rows: usize, operands: &[(&'static str, u64)]) -> Result<Vec<Range<usize>>> {
        if rows == 0 {
            return Ok(Vec::new());
        }
        let max = self.max_binding();
        let align = self.binding_alignment().max(4);
        let fits_whole = operands.iter().all(|&(_, row_bytes)| row_bytes * rows as u64 <= max);
        if fits_whole {
            return Ok(std::iter::once(0..rows).collect());
        }

        // Rows per chunk must be a multiple of `granularity` so every operand's
        // chunk offset (rows × row bytes) is a multiple of the alignment.
        // NOTE: a 4-byte per-row operand (lse, targets, rstd) with 256-byte
        // alignment makes chunks multiples of 64 rows, so 64 rows of the big
        // operand must fit one binding. Binding from an aligned-down offset
        // plus an element offset in the kernel (as matmul does) would lift that.
        let mut granularity = 1u64;
        let mut max_rows = u64::MAX;
        for &(_, row_bytes) in operands {
            if row_bytes == 0 {
                continue;
            }
            let needed = align / gcd(row_bytes, align);
            granularity = granularity / gcd(granularity, needed) * needed;
            max_rows = max_rows.min(max / row_bytes);
        }
        let chunk = max_rows / granularity * granularity;
        if chunk == 0 {
            let (name, row_bytes) = operands
                .iter()
                .copied()
                .max_by_key(|&(_, row_bytes)| row_bytes)
                .expect("an operand that does not fit exists");
            return Err(Error::Gpu(format!(
                "{op}: `{name}` is {} bytes ({rows} rows of {row_bytes} bytes), more than this adapter's max storage binding of {max} bytes, \
                 and the smallest piece it can be split into ({granularity} rows, {} bytes) does not fit either",
                row_bytes * rows as u64,
                granularity * row_bytes
            )));
        }
        let chunk = chunk as usize;
        Ok((0..rows).step_by(chunk).map(|start| start..(start + chunk).min(rows)).collect())
    }

    /// Fails unless `bytes` fit one storage binding; `name` is the operand.
    pub(crate) fn check_binding(&self, op: &'static str, name: &'static str, bytes: u64) -> Result<()> {
        let max = self.max_binding();
        if bytes <= max {
            return Ok(());
        }
        Err(Error::Gpu(format!(
            "{op}: `{name}` is {bytes} bytes, more than this adapter's max storage binding of {max} bytes, and this op cannot split it"
        )))
    }
}

/// One binding of a row-split dispatch.
pub(crate) struct Operand<'a> {
    pub buffer: &'a GpuBuffer,
    pub read_only: bool,
    /// Bytes per row when the binding is split with the rows; 0 binds the whole buffer.
    pub row_bytes: u64,
    pub name: &'static str,
}

impl<'a> Operand<'a> {
    /// An input split with the rows.
    pub(crate) fn rows(name: &'static str, buffer: &'a GpuBuffer, row_bytes: u64) -> Self {
        Self { buffer, read_only: true, row_bytes, name }
    }

    /// An output (or in-place operand) split with the rows.
    pub(crate) fn rows_mut(name: &'static str, buffer: &'a GpuBuffer, row_bytes: u64) -> Self {
        Self { buffer, read_only: false, row_bytes, name }
    }

    /// An input bound whole in every chunk.
    pub(crate) fn whole(name: &'static str, buffer: &'a GpuBuffer) -> Self {
        Self { buffer, read_only: true, row_bytes: 0, name }
    }
}

impl Context {
    /// Records `key` once per chunk of `rows` rows. Split operands bind the
    /// chunk's rows; whole operands must fit one binding. `params` and
    /// `groups` give each chunk's parameters and workgroup grid.
    pub(crate) fn dispatch_rows(
        &self,
        job: &mut Job,
        key: &KernelKey,
        rows: usize,
        operands: &[Operand],
        params: impl Fn(&Range<usize>) -> Params,
        groups: impl Fn(&Range<usize>) -> [u32; 3],
    ) -> Result<()> {
        for operand in operands.iter().filter(|operand| operand.row_bytes == 0) {
            self.check_binding(job.op(), operand.name, operand.buffer.bytes())?;
        }
        let split: Vec<(&'static str, u64)> = operands
            .iter()
            .filter(|operand| operand.row_bytes > 0)
            .map(|operand| (operand.name, operand.row_bytes))
            .collect();
        for chunk in self.row_chunks(job.op(), rows, &split)? {
            let args: Vec<Arg> = operands
                .iter()
                .map(|operand| {
                    if operand.row_bytes == 0 {
                        Arg { read_only: operand.read_only, ..Arg::read(operand.buffer) }
                    } else {
                        let offset = chunk.start as u64 * operand.row_bytes;
                        let size = chunk.len() as u64 * operand.row_bytes;
                        Arg::range(operand.buffer, offset, size, operand.read_only)
                    }
                })
                .collect();
            job.dispatch(key.clone(), &params(&chunk), &args, groups(&chunk))?;
        }
        Ok(())
    }
}
