//! Host side of shaders/matmul.wgsl: C = act(alpha · op(A) · op(B) [+ C] [+ bias]).
//!
//! The kernel and its tile sizes are chosen per adapter (see [`Tuning`]).
//! On software adapters the register kernel reads A and B from staging
//! textures when every size it reads four at a time is a multiple of 4.
//! The reason is llvmpipe (Mesa 22.3): it loads a storage buffer one SIMD
//! lane at a time but fetches texels for all lanes at once. On two Zen 3
//! cores that made the kernel about eight times faster (4.2 to 35 GFLOP/s
//! for 1024³). Each dispatch first copies the ranges it reads into the
//! textures.
//! When an operand exceeds one storage binding, the product is split along
//! M (rows of A and C), N (rows of Bᵀ) and K (rows of Aᵀ and of B). The K
//! pieces accumulate into C, and the last one adds the bias and applies the
//! activation. Batch entries are then done one by one.

use std::ops::Range;

use crate::error::{Error, Result};
use crate::gpu::activation::activation_code;
use crate::gpu::context::{Arg, Binding, Context, Job, KernelKey, Params, TEXELS_PER_ROW};
use crate::gpu::pool::GpuBuffer;
use crate::gpu::GpuBackend;
use crate::ops::activation::Activation;
use crate::ops::matmul::{Matmul, MatmulDims};
use crate::tensor::{DType, Tensor};

const FILE: &str = "matmul.wgsl";

/// The environment variable that overrides the matmul kernel choice.
const MATMUL_VARIABLE: &str = "FLAMINGO_MATMUL";

/// The values [`MATMUL_VARIABLE`] accepts, for warnings.
const MATMUL_FORMS: &str = "texture:TMxTNxWG, register:TMxTNxWG (TM and TN multiples of 4, WG 1 to 256) \
                            and tiled:BMxBNxBKxTMxTN, such as register:16x8x8 or tiled:64x64x16x4x4";

/// The matmul kernel an adapter runs, with its tile sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tuning {
    /// `matmul_register`: each of `workgroup` threads keeps a
    /// `thread_m` × `thread_n` tile of C in registers. For software
    /// rasterizers, which run a workgroup as SIMD lanes of one CPU thread:
    /// big per-thread tiles and no barriers. With `textures`, A and B are
    /// copied into staging textures and read from there (flag TEXTURE of
    /// matmul.wgsl). With `broadcast`, the lanes share the loads of A
    /// through subgroup operations (flag BROADCAST).
    Register { thread_m: u32, thread_n: u32, workgroup: u32, textures: bool, broadcast: bool },
    /// `matmul_tiled`: a `tile_m` × `tile_n` block per workgroup staged
    /// through workgroup memory in slices `tile_k` deep, `thread_m` ×
    /// `thread_n` per thread. For GPUs.
    Tiled { tile_m: u32, tile_n: u32, tile_k: u32, thread_m: u32, thread_n: u32 },
}

impl Tuning {
    /// Picks the kernel for an adapter; `FLAMINGO_MATMUL` overrides it with
    /// `texture:TMxTNxWG` or `register:TMxTNxWG` (the register kernel with
    /// or without staging textures; TM and TN multiples of 4) or
    /// `tiled:BMxBNxBKxTMxTN` (for tuning and tests). A value that does not
    /// parse is logged as a warning and the adapter's default is used.
    pub(crate) fn for_adapter(context: &Context) -> Self {
        let requested = match std::env::var(MATMUL_VARIABLE) {
            Ok(text) if !text.trim().is_empty() => match Self::parse(&text) {
                Ok(tuning) => Some(tuning),
                Err(reason) => {
                    tracing::warn!("{MATMUL_VARIABLE}={text:?} is ignored, so the adapter's default matmul kernel runs: {reason}; the accepted forms are {MATMUL_FORMS}");
                    None
                }
            },
            _ => None,
        };
        let tuning = match requested {
            Some(tuning) => tuning,
            None => match context.summary.kind {
                crate::gpu::AdapterKind::Cpu => {
                    Tuning::Register { thread_m: 16, thread_n: 8, workgroup: 8, textures: true, broadcast: false }
                }
                _ => Tuning::Tiled { tile_m: 64, tile_n: 64, tile_k: 16, thread_m: 4, thread_n: 4 },
            },
        };
        match tuning {
            Tuning::Register { thread_m, thread_n, workgroup, textures, .. } => {
                // A workgroup is one subgroup only when it is no larger than
                // the adapter's smallest subgroup. The lanes must also be
                // whole quads and share the tile's rows evenly.
                let (smallest, _) = context.summary.subgroup_sizes;
                let broadcast = context.subgroups && workgroup <= smallest && workgroup % 4 == 0 && thread_m % workgroup == 0;
                let textures = textures && TEXELS_PER_ROW <= context.limits.max_texture_dimension_2d;
                Tuning::Register { thread_m, thread_n, workgroup, textures, broadcast }
            }
            tiled => tiled,
        }
    }

    /// Parses a `FLAMINGO_MATMUL` value. The error names the part that is wrong.
    fn parse(text: &str) -> std::result::Result<Self, String> {
        let text = text.trim();
        let Some((kind, sizes)) = text.split_once(':') else {
            return Err("it has no `:` between the kernel and its sizes".to_string());
        };
        let expected = match kind {
            "register" | "texture" => 3,
            "tiled" => 5,
            _ => return Err(format!("`{kind}` is not a kernel; the kernels are texture, register and tiled")),
        };
        let numbers: Vec<u32> = sizes
            .split('x')
            .map(|part| part.trim().parse().map_err(|_| format!("`{}` is not a whole number", part.trim())))
            .collect::<std::result::Result<_, _>>()?;
        if numbers.len() != expected {
            return Err(format!("{kind} takes {expected} sizes joined by `x`, but {} were given", numbers.len()));
        }
        let tuning = match (kind, numbers.as_slice()) {
            ("tiled", &[tile_m, tile_n, tile_k, thread_m, thread_n]) => Tuning::Tiled { tile_m, tile_n, tile_k, thread_m, thread_n },
            (_, &[thread_m, thread_n, workgroup]) => {
                Tuning::Register { thread_m, thread_n, workgroup, textures: kind == "texture", broadcast: false }
            }
            _ => unreachable!("the number of sizes was checked above"),
        };
        tuning.check()?;
        Ok(tuning)
    }

    /// Checks the sizes that a kernel can be built with; the error names the rule broken.
    fn check(&self) -> std::result::Result<(), String> {
        let rule = |holds: bool, rule: &str| if holds { Ok(()) } else { Err(rule.to_string()) };
        match *self {
            Tuning::Register { thread_m, thread_n, workgroup, .. } => {
                rule(thread_m > 0 && thread_m % 4 == 0, "TM must be a positive multiple of 4")?;
                rule(thread_n > 0 && thread_n % 4 == 0, "TN must be a positive multiple of 4")?;
                rule(workgroup > 0 && workgroup <= 256, "WG must be 1 to 256")
            }
            Tuning::Tiled { tile_m, tile_n, tile_k, thread_m, thread_n } => {
                rule(thread_m > 0 && thread_n > 0 && tile_k > 0, "BK, TM and TN must be at least 1")?;
                rule(tile_m % thread_m == 0 && tile_n % thread_n == 0, "BM must be a multiple of TM and BN a multiple of TN")?;
                let threads = u64::from(tile_m / thread_m) * u64::from(tile_n / thread_n);
                rule(threads <= 256, "(BM / TM) × (BN / TN) threads must be at most 256")?;
                let bytes = (u64::from(tile_m) + u64::from(tile_n)) * u64::from(tile_k) * 4;
                rule(bytes <= 16384, "(BM + BN) × BK × 4 bytes of workgroup memory must be at most 16384")
            }
        }
    }

    /// Rows and columns of C one workgroup covers.
    fn block(&self) -> (u32, u32) {
        match *self {
            Tuning::Register { thread_m, thread_n, workgroup, .. } => (thread_m, thread_n * workgroup),
            Tuning::Tiled { tile_m, tile_n, .. } => (tile_m, tile_n),
        }
    }

    fn key(&self, vec4: bool, b_f16: bool, textures: bool) -> KernelKey {
        match *self {
            Tuning::Register { thread_m, thread_n, workgroup, broadcast, .. } => KernelKey::new(FILE, "matmul_register")
                .constant("THREAD_M", thread_m)
                .constant("THREAD_N", thread_n)
                .constant("THREAD_NQ", thread_n / 4)
                .constant("THREAD_MQ", thread_m / 4)
                // The tiled kernel shares the module; these sizes keep it valid (one thread).
                .constant("TILE_M", thread_m)
                .constant("TILE_N", thread_n)
                .constant("TILE_K", 4)
                .constant("BROADCAST_LANES", workgroup)
                .constant("BROADCAST_STEPS", thread_m / workgroup)
                .flag("BROADCAST", broadcast)
                .set("REGISTER_WG", workgroup as f64),
            Tuning::Tiled { tile_m, tile_n, tile_k, thread_m, thread_n } => KernelKey::new(FILE, "matmul_tiled")
                .constant("THREAD_M", thread_m)
                .constant("THREAD_N", thread_n)
                .constant("TILE_M", tile_m)
                .constant("TILE_N", tile_n)
                .constant("TILE_K", tile_k)
                .constant("THREAD_NQ", 1)
                .constant("THREAD_MQ", 1),
        }
        .flag("VEC4", vec4)
        .flag("B_F16", b_f16)
        .flag("TEXTURE", textures)
    }

    fn textures(&self) -> bool {
        matches!(self, Tuning::Register { textures: true, .. })
    }
}

/// One product, with sizes in elements.
#[derive(Debug, Clone, Copy)]
struct Gemm {
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    trans_a: bool,
    trans_b: bool,
    /// Whether every batch entry uses the same B.
    shared_b: bool,
    b_f16: bool,
}

/// The epilogue applied to each product element.
struct Epilogue<'a> {
    alpha: f32,
    accumulate: bool,
    bias: Option<&'a GpuBuffer>,
    activation: Activation,
}

/// The location of one dispatch's piece of an operand: the bound byte range
/// and the element offset of the piece inside it.
struct Piece {
    offset: u64,
    size: u64,
    element: usize,
}

impl GpuBackend {
    pub(crate) fn matmul(&self, a: &Tensor, b: &Tensor, spec: &Matmul, dims: MatmulDims, out_shape: Vec<usize>) -> Result<Tensor> {
        const OP: &str = "matmul";
        let (x, y) = (a.gpu_buffer(OP, "a")?, b.gpu_buffer(OP, "b")?);
        let bias = match spec.bias {
            Some(bias) => Some(bias.gpu_buffer(OP, "bias")?),
            None => None,
        };
        let out = self.output(OP, &out_shape, DType::F32)?;
        let mut gemm = Gemm {
            batch: dims.batch,
            m: dims.m,
            n: dims.n,
            k: dims.k,
            trans_a: spec.trans_a,
            trans_b: spec.trans_b,
            shared_b: dims.shared_b,
            b_f16: b.dtype() == DType::F16,
        };
        if gemm.shared_b && !gemm.trans_a {
            // Every entry multiplies the same B, so the batch folds into rows.
            gemm.m *= gemm.batch;
            gemm.batch = 1;
        }
        let epilogue = Epilogue { alpha: 1.0, accumulate: false, bias, activation: spec.activation };
        let mut job = self.context.job(OP);
        self.gemm(&mut job, x, y, &out, gemm, &epilogue)?;
        job.submit()?;
        Ok(self.tensor(out_shape, DType::F32, out))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn matmul_accumulate(&self, c: &mut Tensor, a: &Tensor, b: &Tensor, trans_a: bool, trans_b: bool, alpha: f32, dims: MatmulDims) -> Result<()> {
        const OP: &str = "matmul_accumulate";
        let (x, y) = (a.gpu_buffer(OP, "a")?, b.gpu_buffer(OP, "b")?);
        let out = c.gpu_buffer_unique(OP, "c")?;
        let gemm = Gemm { batch: 1, m: dims.m, n: dims.n, k: dims.k, trans_a, trans_b, shared_b: true, b_f16: false };
        let epilogue = Epilogue { alpha, accumulate: true, bias: None, activation: Activation::Identity };
        let mut job = self.context.job(OP);
        self.gemm(&mut job, x, y, out, gemm, &epilogue)?;
        job.submit()
    }

    /// Records the dispatches of one (batched) product into `job`.
    fn gemm(&self, job: &mut Job, a: &GpuBuffer, b: &GpuBuffer, c: &GpuBuffer, gemm: Gemm, epilogue: &Epilogue) -> Result<()> {
        let Gemm { batch, m, n, k, .. } = gemm;
        if batch == 0 || m == 0 || n == 0 {
            return Ok(());
        }
        let b_size = if gemm.b_f16 { 2 } else { 4 };
        let max = self.context.max_binding();
        let (block_m, _) = self.tuning.block();
        let max_groups = self.context.limits.max_compute_workgroups_per_dimension as usize;
        let fits = a.bytes() <= max && b.bytes() <= max && c.bytes() <= max;
        let rows_fit = m.div_ceil(block_m as usize) <= max_groups;

        if fits && rows_fit {
            // One dispatch per group of up to max_groups batch entries.
            for entries in chunked(0..batch, max_groups) {
                let first = entries.start;
                let a_piece = Piece { offset: 0, size: a.bindable_bytes(), element: first * m * k };
                let b_piece = Piece { offset: 0, size: b.bindable_bytes(), element: if gemm.shared_b { 0 } else { first * k * n } };
                let c_piece = Piece { offset: 0, size: c.bindable_bytes(), element: first * m * n };
                let sizes = Sizes { m, n, k, n_base: 0, lda: if gemm.trans_a { m } else { k }, ldb: if gemm.trans_b { k } else { n }, ldc: n };
                let strides = [m * k, if gemm.shared_b { 0 } else { k * n }, m * n];
                self.dispatch_gemm(job, gemm, epilogue, (a, a_piece), (b, b_piece), (c, c_piece), sizes, strides, entries.len(), (true, true))?;
            }
            return Ok(());
        }

        // Split: each batch entry alone, then M, N and K pieces that fit.
        let op = job.op();
        let align = self.context.binding_alignment();
        let budget = max.saturating_sub(align);
        let m_rows = self.plan(op, m, &[("c", n as u64 * 4), ("a", if gemm.trans_a { 0 } else { k as u64 * 4 })], budget, block_m as usize * max_groups)?;
        let n_rows = self.plan(op, n, &[("b", if gemm.trans_b { k as u64 * b_size } else { 0 })], budget, usize::MAX)?;
        let k_rows = self.plan(op, k, &[("a", if gemm.trans_a { m as u64 * 4 } else { 0 }), ("b", if gemm.trans_b { 0 } else { n as u64 * b_size })], budget, usize::MAX)?;

        for entry in 0..batch {
            let a_entry = entry * m * k;
            let b_entry = if gemm.shared_b { 0 } else { entry * k * n };
            let c_entry = entry * m * n;
            for rows in &m_rows {
                for cols in &n_rows {
                    for (piece, depth) in k_rows.iter().enumerate() {
                        let first = piece == 0;
                        let last = piece + 1 == k_rows.len();
                        let (a_start, a_len, a_inner) = if gemm.trans_a {
                            (a_entry + depth.start * m, depth.len() * m, rows.start)
                        } else {
                            (a_entry + rows.start * k, rows.len() * k, depth.start)
                        };
                        let (b_start, b_len, b_inner) = if gemm.trans_b {
                            (b_entry + cols.start * k, cols.len() * k, depth.start)
                        } else {
                            (b_entry + depth.start * n, depth.len() * n, cols.start)
                        };
                        let c_start = c_entry + rows.start * n;
                        let a_piece = self.piece(a, a_start, a_len, 4, a_inner);
                        let b_piece = self.piece(b, b_start, b_len, b_size as usize, b_inner);
                        let c_piece = self.piece(c, c_start, rows.len() * n, 4, cols.start);
                        let sizes = Sizes {
                            m: rows.len(),
                            n: cols.len(),
                            k: depth.len(),
                            n_base: cols.start,
                            lda: if gemm.trans_a { m } else { k },
                            ldb: if gemm.trans_b { k } else { n },
                            ldc: n,
                        };
                        self.dispatch_gemm(job, gemm, epilogue, (a, a_piece), (b, b_piece), (c, c_piece), sizes, [0, 0, 0], 1, (first, last))?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Splits `len` rows so each listed operand's rows fit `budget` bytes,
    /// with at most `max_rows` rows per piece.
    fn plan(&self, op: &'static str, len: usize, operands: &[(&'static str, u64)], budget: u64, max_rows: usize) -> Result<Vec<Range<usize>>> {
        let mut rows = len.min(max_rows).max(1);
        for &(name, row_bytes) in operands {
            if row_bytes == 0 {
                continue;
            }
            let fit = (budget / row_bytes) as usize;
            if fit == 0 {
                return Err(Error::Gpu(format!(
                    "{op}: one row of `{name}` is {row_bytes} bytes, more than this adapter's max storage binding of {} bytes",
                    self.context.max_binding()
                )));
            }
            rows = rows.min(fit);
        }
        Ok(chunked(0..len, rows).collect())
    }

    /// Locates elements `start .. start + len` (of `size` bytes each) as a
    /// binding from an aligned offset, with `inner` added to the element offset.
    fn piece(&self, buffer: &GpuBuffer, start: usize, len: usize, size: usize, inner: usize) -> Piece {
        let align = self.context.binding_alignment().max(4);
        let byte = (start * size) as u64;
        let offset = byte / align * align;
        let end = (byte + (len * size) as u64).next_multiple_of(4).min(buffer.raw().size());
        Piece { offset, size: end - offset, element: (byte - offset) as usize / size + inner }
    }

    #[allow(clippy::too_many_arguments)]
    fn dispatch_gemm(
        &self,
        job: &mut Job,
        gemm: Gemm,
        epilogue: &Epilogue,
        a: (&GpuBuffer, Piece),
        b: (&GpuBuffer, Piece),
        c: (&GpuBuffer, Piece),
        sizes: Sizes,
        strides: [usize; 3],
        batch: usize,
        (first, last): (bool, bool),
    ) -> Result<()> {
        let (a, a_piece) = a;
        let (b, b_piece) = b;
        let (c, c_piece) = c;

        // Four-wide loads need every vectorised extent and offset in whole
        // quads, and K too, so the register kernel's steps of four never
        // cross the end of K.
        let quads = |values: &[usize]| values.iter().all(|value| value % 4 == 0);
        let a_extent = if gemm.trans_a { sizes.m } else { sizes.k };
        let b_extent = if gemm.trans_b { sizes.k } else { sizes.n };
        let vec4 = quads(&[a_extent, b_extent, sizes.k, sizes.lda, sizes.ldb, a_piece.element, b_piece.element, strides[0], strides[1]]);

        let staged = if vec4 && self.tuning.textures() { self.stage(job, (a, &a_piece), (b, &b_piece), gemm.b_f16) } else { None };

        let accumulate = epilogue.accumulate || !first;
        let key = self
            .tuning
            .key(vec4, gemm.b_f16, staged.is_some())
            .set("TRANS_A", gemm.trans_a as u8 as f64)
            .set("TRANS_B", gemm.trans_b as u8 as f64)
            .set("ACCUMULATE", accumulate as u8 as f64)
            .set("HAS_BIAS", (last && epilogue.bias.is_some()) as u8 as f64)
            .set("ACT", if last { activation_code(epilogue.activation) } else { 0.0 });
        let params = Params::new()
            .u(sizes.m)
            .u(sizes.n)
            .u(sizes.k)
            .u(sizes.lda)
            .u(sizes.ldb)
            .u(sizes.ldc)
            .u(a_piece.element)
            .u(b_piece.element)
            .u(c_piece.element)
            .u(strides[0])
            .u(strides[1])
            .u(strides[2])
            .f(epilogue.alpha)
            .u(sizes.n_base);
        // The kernel always declares a bias binding. Without a bias, B's range
        // fills it, and HAS_BIAS = false keeps the kernel from reading it.
        let bias = match epilogue.bias {
            Some(bias) => Arg::read(bias),
            None => Arg { buffer: b.raw(), offset: b_piece.offset, size: b_piece.size, read_only: true },
        };
        let args = [
            Arg { buffer: a.raw(), offset: a_piece.offset, size: a_piece.size, read_only: true },
            Arg { buffer: b.raw(), offset: b_piece.offset, size: b_piece.size, read_only: true },
            bias,
            Arg { buffer: c.raw(), offset: c_piece.offset, size: c_piece.size, read_only: false },
        ];
        let (block_m, block_n) = self.tuning.block();
        let groups = [
            sizes.n.div_ceil(block_n as usize) as u32,
            sizes.m.div_ceil(block_m as usize) as u32,
            batch as u32,
        ];
        if groups[0] as u64 > self.context.limits.max_compute_workgroups_per_dimension as u64 {
            return Err(Error::Gpu(format!("{}: N = {} needs more workgroups than this adapter allows", job.op(), sizes.n)));
        }
        match &staged {
            Some((a_view, b_view)) => {
                let bindings = [Binding::Texture(a_view), Binding::Texture(b_view), Binding::Buffer(args[2]), Binding::Buffer(args[3])];
                job.dispatch_bindings(key, &params, &bindings, groups)
            }
            None => job.dispatch(key, &params, &args, groups),
        }
    }

    /// Records copies of the bound ranges of A and B into staging textures
    /// and returns views of them, or `None` when a range does not split
    /// into whole texels or needs more rows than a texture may have.
    fn stage(&self, job: &mut Job, a: (&GpuBuffer, &Piece), b: (&GpuBuffer, &Piece), b_f16: bool) -> Option<(wgpu::TextureView, wgpu::TextureView)> {
        let b_format = if b_f16 { (wgpu::TextureFormat::Rgba16Float, 8) } else { (wgpu::TextureFormat::Rgba32Float, 16) };
        let operands = [(0, a, (wgpu::TextureFormat::Rgba32Float, 16)), (1, b, b_format)];
        let max_rows = self.context.limits.max_texture_dimension_2d as u64;
        let fits = operands.iter().all(|&(_, (_, piece), (_, texel_bytes))| {
            piece.offset % texel_bytes == 0
                && piece.size % texel_bytes == 0
                && (piece.size / texel_bytes).div_ceil(TEXELS_PER_ROW as u64) <= max_rows
        });
        if !fits {
            return None;
        }
        let mut views = operands.map(|(slot, (buffer, piece), (format, texel_bytes))| {
            let texels = piece.size / texel_bytes;
            let texture = self.context.staging_texture(slot, format, texels.div_ceil(TEXELS_PER_ROW as u64) as u32);
            job.copy_to_texture(buffer.raw(), piece.offset, texels, texel_bytes, &texture);
            Some(texture.create_view(&wgpu::TextureViewDescriptor::default()))
        });
        Some((views[0].take()?, views[1].take()?))
    }
}

/// Sizes of one dispatch, in elements.
#[derive(Debug, Clone, Copy)]
struct Sizes {
    m: usize,
    n: usize,
    k: usize,
    /// Column of the whole product where this dispatch's column 0 lies.
    n_base: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
}

/// Consecutive ranges of at most `step` covering `range`.
fn chunked(range: Range<usize>, step: usize) -> impl Iterator<Item = Range<usize>> {
    let step = step.max(1);
    let end = range.end;
    (range.start..end).step_by(step).map(move |start| start..(start + step).min(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matmul_override_parses() {
        assert_eq!(
            Tuning::parse("register:16x8x8"),
            Ok(Tuning::Register { thread_m: 16, thread_n: 8, workgroup: 8, textures: false, broadcast: false })
        );
        assert_eq!(
            Tuning::parse(" texture:8x8x16 "),
            Ok(Tuning::Register { thread_m: 8, thread_n: 8, workgroup: 16, textures: true, broadcast: false })
        );
        assert_eq!(Tuning::parse("tiled:64x64x16x4x4"), Ok(Tuning::Tiled { tile_m: 64, tile_n: 64, tile_k: 16, thread_m: 4, thread_n: 4 }));
    }

    #[test]
    fn bad_matmul_override_names_fault() {
        let cases = [
            ("register", "no `:`"),
            ("tile:64x64x16x4x4", "`tile` is not a kernel"),
            ("register:16x8", "register takes 3 sizes"),
            ("tiled:64x64x16", "tiled takes 5 sizes"),
            ("register:16xeightx8", "`eight` is not a whole number"),
            ("register:6x8x8", "TM must be a positive multiple of 4"),
            ("texture:8x8x0", "WG must be 1 to 256"),
            ("tiled:64x64x16x0x4", "at least 1"),
            ("tiled:64x64x16x1x1", "at most 256"),
            ("tiled:4294967295x4294967295x4294967295x1x1", "at most 256"),
            ("tiled:128x128x32x8x8", "16384"),
        ];
        for (text, expected) in cases {
            let reason = Tuning::parse(text).expect_err(text);
            assert!(reason.contains(expected), "{text}: expected {expected:?} in {reason:?}");
        }
    }
}
