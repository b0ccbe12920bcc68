// Matrix products C = act(alpha · op(A) · op(B) [+ C] [+ bias]).
//
// Shapes (row-major, in elements): op(A) is M × K, stored [M, K] (lda = K)
// or, with TRANS_A, [K, M] (lda = M); op(B) is K × N, stored [K, N] or,
// with TRANS_B, [N, K] (the layout of a PyTorch `Linear` weight); C is
// M × N with row stride ldc. workgroup_id.z indexes the batch; a_batch,
// b_batch and c_batch are the strides between batch entries (b_batch = 0
// for a B shared by every entry). a_off, b_off and c_off locate this
// dispatch's matrices inside their bindings, so the host can split large
// operands into chunks along M, N or K.
//
// Epilogue, in this order: v = alpha · acc; with ACCUMULATE, v += C (the
// old value); with HAS_BIAS, v += bias[n_global]; then v = activate(v, ACT).
// The host splits K across dispatches by running the first without
// ACCUMULATE and the later ones with it, the bias and the activation only
// in the last.
//
// Element types: A, C and bias are f32. B is f32, or f16 with the flag
// B_F16: native `f16` where the adapter has SHADER_F16 (flag NATIVE_F16),
// else pairs of halves in u32 words unpacked with unpack2x16float.
//
// Two kernels share the loads and the epilogue:
//
// - `matmul_register`: no workgroup memory and no barriers. The threads of
//   a workgroup share one block of THREAD_M rows and take THREAD_N columns
//   each, so their loads of A are uniform across the workgroup (software
//   rasterizers such as llvmpipe run a workgroup's threads as SIMD lanes and
//   load a uniform value once) and each thread keeps a THREAD_M × THREAD_N
//   tile of C in registers.
// - `matmul_tiled`: the classic GPU kernel. A workgroup computes a
//   TILE_M × TILE_N block of C, staging TILE_K-deep slices of A and B in
//   workgroup memory; each of its (TILE_M / THREAD_M) · (TILE_N / THREAD_N)
//   threads accumulates a THREAD_M × THREAD_N tile.
//
// With VEC4 the loads read four consecutive elements at once; the host sets
// it only when the dimensions read that way (K for A and Bᵀ, M for Aᵀ, N for
// B), the leading dimensions and the offsets are multiples of 4. Without it
// every load is checked against the matrix bounds.
//
// With TEXTURE (always with VEC4), A and B are read from textures that the
// host copied them into, four elements per texel (rgba32float, or
// rgba16float for an f16 B): element e lies in texel e / 4, at column
// (e / 4) % TEXELS_PER_ROW of row (e / 4) / TEXELS_PER_ROW. llvmpipe
// fetches texels for all the SIMD lanes of a thread at once, while it
// reads a storage buffer one lane and one component at a time, about
// eight times slower for this kernel.
//
// With BROADCAST (only with SUBGROUPS, for `matmul_register` run as one
// subgroup per workgroup), each lane loads THREAD_M / BROADCAST_LANES of the
// THREAD_M quads of A a step needs, and subgroupBroadcast hands them to every
// lane, instead of every lane loading all of them.

#include "activation.wgsl"

#if B_F16
#if NATIVE_F16
enable f16;
#endif
#endif

struct Params {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    ldc: u32,
    a_off: u32,
    b_off: u32,
    c_off: u32,
    a_batch: u32,
    b_batch: u32,
    c_batch: u32,
    alpha: f32,
    // Column of C (in the whole product) where this dispatch's n = 0 lies, for the bias.
    n_base: u32,
}

override TRANS_A: bool = false;
override TRANS_B: bool = false;
override ACCUMULATE: bool = false;
override HAS_BIAS: bool = false;
override ACT: u32 = 0u;
// Threads per workgroup of `matmul_register`.
override REGISTER_WG: u32 = 16u;

@group(0) @binding(0) var<uniform> params: Params;
#if TEXTURE
@group(0) @binding(1) var a_texels: texture_2d<f32>;
@group(0) @binding(2) var b_texels: texture_2d<f32>;
#else
#if VEC4
@group(0) @binding(1) var<storage, read> a: array<vec4<f32>>;
#else
@group(0) @binding(1) var<storage, read> a: array<f32>;
#endif
#if B_F16
#if NATIVE_F16
#if VEC4
@group(0) @binding(2) var<storage, read> b: array<vec4<f16>>;
#else
@group(0) @binding(2) var<storage, read> b: array<f16>;
#endif
#else
#if VEC4
@group(0) @binding(2) var<storage, read> b: array<vec2<u32>>;
#else
@group(0) @binding(2) var<storage, read> b: array<u32>;
#endif
#endif
#else
#if VEC4
@group(0) @binding(2) var<storage, read> b: array<vec4<f32>>;
#else
@group(0) @binding(2) var<storage, read> b: array<f32>;
#endif
#endif
#endif
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> c: array<f32>;

// Four consecutive elements of A's storage starting at element `index`
// (a multiple of 4 with VEC4); `limit` is one past the last valid element
// of the run they belong to, and elements at or past it read as 0.
#if TEXTURE
const TEXELS_PER_ROW: u32 = 4096u;

fn texel_of(index: u32) -> vec2<u32> {
    let texel = index / 4u;
    return vec2<u32>(texel % TEXELS_PER_ROW, texel / TEXELS_PER_ROW);
}
#endif

fn load_a4(index: u32, limit: u32) -> vec4<f32> {
#if TEXTURE
    return textureLoad(a_texels, texel_of(index), 0);
#else
#if VEC4
    return a[index / 4u];
#else
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if index + i < limit {
            v[i] = a[index + i];
        }
    }
    return v;
#endif
#endif
}

#if !TEXTURE
#if !VEC4
fn b_scalar(index: u32) -> f32 {
#if B_F16
#if NATIVE_F16
    return f32(b[index]);
#else
    let pair = unpack2x16float(b[index / 2u]);
    return select(pair.x, pair.y, (index & 1u) == 1u);
#endif
#else
    return b[index];
#endif
}
#endif
#endif

fn load_b4(index: u32, limit: u32) -> vec4<f32> {
#if TEXTURE
    return textureLoad(b_texels, texel_of(index), 0);
#else
#if VEC4
#if B_F16
#if NATIVE_F16
    return vec4<f32>(b[index / 4u]);
#else
    let words = b[index / 4u];
    return vec4<f32>(unpack2x16float(words.x), unpack2x16float(words.y));
#endif
#else
    return b[index / 4u];
#endif
#else
    var v = vec4<f32>(0.0);
    for (var i = 0u; i < 4u; i++) {
        if index + i < limit {
            v[i] = b_scalar(index + i);
        }
    }
    return v;
#endif
#endif
}

fn load_a_scalar(index: u32) -> f32 {
#if TEXTURE
    return load_a4(index - index % 4u, 0u)[index % 4u];
#else
#if VEC4
    return a[index / 4u][index % 4u];
#else
    return a[index];
#endif
#endif
}

fn load_b_scalar(index: u32) -> f32 {
#if TEXTURE
    return load_b4(index - index % 4u, 0u)[index % 4u];
#else
#if VEC4
#if B_F16
#if NATIVE_F16
    return f32(b[index / 4u][index % 4u]);
#else
    let words = b[index / 4u];
    let word = select(words.x, words.y, (index % 4u) >= 2u);
    let pair = unpack2x16float(word);
    return select(pair.x, pair.y, (index & 1u) == 1u);
#endif
#else
    return b[index / 4u][index % 4u];
#endif
#else
    return b_scalar(index);
#endif
#endif
}

fn epilogue(batch: u32, row: u32, col: u32, acc: f32) {
    if row >= params.m || col >= params.n {
        return;
    }
    let index = params.c_off + batch * params.c_batch + row * params.ldc + col;
    var v = params.alpha * acc;
    if ACCUMULATE {
        v += c[index];
    }
    if HAS_BIAS {
        v += bias[params.n_base + col];
    }
    c[index] = activate(v, ACT);
}

// ---------------------------------------------------------------------------
// matmul_register
//
// The tile is written out by the templating step's #for (THREAD_MQ quads
// of rows, THREAD_NQ quads of columns), so every accumulator is a named vec4 that a
// compiler keeps in registers rather than in an indexed private array.

fn store_quad(batch: u32, row: u32, col: u32, value: vec4<f32>) {
    epilogue(batch, row, col, value.x);
    epilogue(batch, row, col + 1u, value.y);
    epilogue(batch, row, col + 2u, value.z);
    epilogue(batch, row, col + 3u, value.w);
}

@compute @workgroup_size(REGISTER_WG)
fn matmul_register(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_index) lane: u32,
#if SUBGROUPS
    @builtin(subgroup_invocation_id) subgroup_lane: u32,
#endif
) {
    let batch = wg.z;
    let row0 = wg.y * THREAD_MQ * 4u;
    let col0 = (wg.x * REGISTER_WG + lane) * THREAD_NQ * 4u;
    let a_base = params.a_off + batch * params.a_batch;
    let b_base = params.b_off + batch * params.b_batch;

    // Rows and columns past the edge read the last row or quad instead, and
    // the epilogue drops what they produce. Row 4·Q + E of the tile is
    // written r{Q}_{E}; column quad J starts at q{J}.
    let last_quad = (params.n - 1u) / 4u * 4u;
    let last_row_quad = (params.m - 1u) / 4u * 4u;
#for Q in 0..THREAD_MQ
    let p{Q} = min(row0 + {Q}u * 4u, last_row_quad);
#for E in 0..4
    let r{Q}_{E} = min(row0 + {Q}u * 4u + {E}u, params.m - 1u);
#endfor
#endfor
#for J in 0..THREAD_NQ
    let q{J} = min(col0 + {J}u * 4u, last_quad);
#endfor
#for Q in 0..THREAD_MQ
#for E in 0..4
#for J in 0..THREAD_NQ
    var c{Q}_{E}_{J} = vec4<f32>(0.0);
#endfor
#endfor
#endfor

    for (var k = 0u; k < params.k; k += 4u) {
        // b{R}_{J}: row k + R of op(B), columns q{J} .. q{J} + 4.
#for R in 0..4
#for J in 0..THREAD_NQ
        var b{R}_{J}: vec4<f32>;
#endfor
#endfor
        if TRANS_B {
#for J in 0..THREAD_NQ
#for E in 0..4
            let column{J}_{E} = b_base + min(q{J} + {E}u, params.n - 1u) * params.ldb;
            let t{J}_{E} = load_b4(column{J}_{E} + k, column{J}_{E} + params.k);
#endfor
            b0_{J} = vec4<f32>(t{J}_0.x, t{J}_1.x, t{J}_2.x, t{J}_3.x);
            b1_{J} = vec4<f32>(t{J}_0.y, t{J}_1.y, t{J}_2.y, t{J}_3.y);
            b2_{J} = vec4<f32>(t{J}_0.z, t{J}_1.z, t{J}_2.z, t{J}_3.z);
            b3_{J} = vec4<f32>(t{J}_0.w, t{J}_1.w, t{J}_2.w, t{J}_3.w);
#endfor
        } else {
#for R in 0..4
#if VEC4
            // K is a multiple of 4 here, so rows k .. k + 4 all exist.
            let row{R} = b_base + (k + {R}u) * params.ldb;
#for J in 0..THREAD_NQ
            b{R}_{J} = load_b4(row{R} + q{J}, row{R} + params.n);
#endfor
#else
            let row{R} = b_base + min(k + {R}u, params.k - 1u) * params.ldb;
            let keep{R} = select(0.0, 1.0, k + {R}u < params.k);
#for J in 0..THREAD_NQ
            b{R}_{J} = keep{R} * load_b4(row{R} + q{J}, row{R} + params.n);
#endfor
#endif
#endfor
        }

        // a{Q}_{E}: row 4·Q + E of op(A), columns k .. k + 4.
#for Q in 0..THREAD_MQ
#for E in 0..4
        var a{Q}_{E}: vec4<f32>;
#endfor
#endfor
#if BROADCAST
        // Load j of a step (j < THREAD_M) is, for A, row j and, for Aᵀ,
        // stored row k + j % 4 at the rows' quad j / 4. Lane L takes the
        // loads j = S · BROADCAST_LANES + L.
#for S in 0..BROADCAST_STEPS
        var own{S}: vec4<f32>;
        {
            let j = {S}u * BROADCAST_LANES + subgroup_lane;
            if TRANS_A {
                let depth = k + j % 4u;
                let stored = a_base + min(depth, params.k - 1u) * params.lda;
                let keep = select(0.0, 1.0, depth < params.k);
                own{S} = keep * load_a4(stored + min(row0 + j / 4u * 4u, last_row_quad), stored + params.m);
            } else {
                let stored = a_base + min(row0 + j, params.m - 1u) * params.lda;
                own{S} = load_a4(stored + k, stored + params.k);
            }
        }
#endfor
#endif
        if TRANS_A {
            // Stored [K, M]: four rows of the storage hold the tile's rows as quads.
#if BROADCAST
#for Q in 0..THREAD_MQ
#for R in 0..4
            let s{R}_{Q} = subgroupBroadcast(own{(4*Q+R)/BROADCAST_LANES}, {(4*Q+R)%BROADCAST_LANES}u);
#endfor
#endfor
#else
#for R in 0..4
#if VEC4
            let stored{R} = a_base + (k + {R}u) * params.lda;
#for Q in 0..THREAD_MQ
            let s{R}_{Q} = load_a4(stored{R} + p{Q}, stored{R} + params.m);
#endfor
#else
            let stored{R} = a_base + min(k + {R}u, params.k - 1u) * params.lda;
            let use{R} = select(0.0, 1.0, k + {R}u < params.k);
#for Q in 0..THREAD_MQ
            let s{R}_{Q} = use{R} * load_a4(stored{R} + p{Q}, stored{R} + params.m);
#endfor
#endif
#endfor
#endif
#for Q in 0..THREAD_MQ
            a{Q}_0 = vec4<f32>(s0_{Q}.x, s1_{Q}.x, s2_{Q}.x, s3_{Q}.x);
            a{Q}_1 = vec4<f32>(s0_{Q}.y, s1_{Q}.y, s2_{Q}.y, s3_{Q}.y);
            a{Q}_2 = vec4<f32>(s0_{Q}.z, s1_{Q}.z, s2_{Q}.z, s3_{Q}.z);
            a{Q}_3 = vec4<f32>(s0_{Q}.w, s1_{Q}.w, s2_{Q}.w, s3_{Q}.w);
#endfor
        } else {
#for Q in 0..THREAD_MQ
#for E in 0..4
#if BROADCAST
            a{Q}_{E} = subgroupBroadcast(own{(4*Q+E)/BROADCAST_LANES}, {(4*Q+E)%BROADCAST_LANES}u);
#else
            let stored{Q}_{E} = a_base + r{Q}_{E} * params.lda;
            a{Q}_{E} = load_a4(stored{Q}_{E} + k, stored{Q}_{E} + params.k);
#endif
#endfor
#endfor
        }

#for Q in 0..THREAD_MQ
#for E in 0..4
#for J in 0..THREAD_NQ
        c{Q}_{E}_{J} += a{Q}_{E}.x * b0_{J} + a{Q}_{E}.y * b1_{J} + a{Q}_{E}.z * b2_{J} + a{Q}_{E}.w * b3_{J};
#endfor
#endfor
#endfor
    }

#for Q in 0..THREAD_MQ
#for E in 0..4
#for J in 0..THREAD_NQ
    store_quad(batch, row0 + {Q}u * 4u + {E}u, col0 + {J}u * 4u, c{Q}_{E}_{J});
#endfor
#endfor
#endfor
}

// ---------------------------------------------------------------------------
// matmul_tiled

const TILED_THREADS_N: u32 = TILE_N / THREAD_N;
const TILED_THREADS: u32 = (TILE_M / THREAD_M) * (TILE_N / THREAD_N);

// Slices of op(A) and op(B), stored k-major so a thread reads its rows and
// columns as consecutive elements.
var<workgroup> tile_a: array<f32, TILE_K * TILE_M>;
var<workgroup> tile_b: array<f32, TILE_K * TILE_N>;

fn op_a(base: u32, row: u32, k: u32) -> f32 {
    if row >= params.m || k >= params.k {
        return 0.0;
    }
    if TRANS_A {
        return load_a_scalar(base + k * params.lda + row);
    }
    return load_a_scalar(base + row * params.lda + k);
}

fn op_b(base: u32, k: u32, col: u32) -> f32 {
    if col >= params.n || k >= params.k {
        return 0.0;
    }
    if TRANS_B {
        return load_b_scalar(base + col * params.ldb + k);
    }
    return load_b_scalar(base + k * params.ldb + col);
}

@compute @workgroup_size(TILED_THREADS)
fn matmul_tiled(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) local: u32) {
    let batch = wg.z;
    let tile_row = wg.y * TILE_M;
    let tile_col = wg.x * TILE_N;
    let thread_row = (local / TILED_THREADS_N) * THREAD_M;
    let thread_col = (local % TILED_THREADS_N) * THREAD_N;
    let a_base = params.a_off + batch * params.a_batch;
    let b_base = params.b_off + batch * params.b_batch;

    var acc: array<array<f32, THREAD_N>, THREAD_M>;
    for (var k0 = 0u; k0 < params.k; k0 += TILE_K) {
        // Stage the slices. Consecutive threads take consecutive elements
        // along the stored row, so global reads coalesce.
        for (var e = local; e < TILE_K * TILE_M; e += TILED_THREADS) {
            var kk: u32;
            var mm: u32;
            if TRANS_A {
                kk = e / TILE_M;
                mm = e % TILE_M;
            } else {
                mm = e / TILE_K;
                kk = e % TILE_K;
            }
            tile_a[kk * TILE_M + mm] = op_a(a_base, tile_row + mm, k0 + kk);
        }
        for (var e = local; e < TILE_K * TILE_N; e += TILED_THREADS) {
            var kk: u32;
            var nn: u32;
            if TRANS_B {
                nn = e / TILE_K;
                kk = e % TILE_K;
            } else {
                kk = e / TILE_N;
                nn = e % TILE_N;
            }
            tile_b[kk * TILE_N + nn] = op_b(b_base, k0 + kk, tile_col + nn);
        }
        workgroupBarrier();

        for (var kk = 0u; kk < TILE_K; kk++) {
            var column: array<f32, THREAD_M>;
            for (var i = 0u; i < THREAD_M; i++) {
                column[i] = tile_a[kk * TILE_M + thread_row + i];
            }
            for (var j = 0u; j < THREAD_N; j++) {
                let value = tile_b[kk * TILE_N + thread_col + j];
                for (var i = 0u; i < THREAD_M; i++) {
                    acc[i][j] += column[i] * value;
                }
            }
        }
        workgroupBarrier();
    }

    for (var i = 0u; i < THREAD_M; i++) {
        for (var j = 0u; j < THREAD_N; j++) {
            epilogue(batch, tile_row + thread_row + i, tile_col + thread_col + j, acc[i][j]);
        }
    }
}
