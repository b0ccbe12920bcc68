// Row gather from an embedding table and its backward, a scatter-add.
//
// table [V, C] serves ids offset .. offset + V; ids u32 [N]; out, dy [N, C].
// The host may split the table into chunks of rows (table_start is the
// first row a chunk holds, table_rows how many) and the ids into chunks
// of rows; out starts zeroed and a chunk writes only the rows whose id it
// holds, so ids outside every chunk keep their zero row.
//
// embedding_gather: one thread per element of out.
// embedding_scatter: one thread per column c, walking the ids in order:
//   dtable[id − offset, c] += dy[n, c]. Each element is summed in the order
//   of n alone, so repeated ids add up exactly as on the CPU, run after run.
//
// The table is f32, or f16 with TABLE_F16 (native with NATIVE_F16, else
// pairs of halves in u32 words).
//
// Bindings: embedding_gather   table, ids -> out (3)
//           embedding_scatter  ids, dy -> dtable (3)

#if TABLE_F16
#if NATIVE_F16
enable f16;
#endif
#endif

struct Params {
    // Ids (rows of out or dy) in this chunk.
    count: u32,
    cols: u32,
    offset: u32,
    table_start: u32,
    table_rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
#if TABLE_F16
#if NATIVE_F16
@group(0) @binding(1) var<storage, read> table: array<f16>;
#else
@group(0) @binding(1) var<storage, read> table: array<u32>;
#endif
#else
@group(0) @binding(1) var<storage, read> table: array<f32>;
#endif
@group(0) @binding(2) var<storage, read> ids: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(1) var<storage, read> scatter_ids: array<u32>;
@group(0) @binding(2) var<storage, read> dy: array<f32>;
@group(0) @binding(3) var<storage, read_write> dtable: array<f32>;

const WG: u32 = 256u;

fn table_value(index: u32) -> f32 {
#if TABLE_F16
#if NATIVE_F16
    return f32(table[index]);
#else
    let pair = unpack2x16float(table[index / 2u]);
    return select(pair.x, pair.y, (index & 1u) == 1u);
#endif
#else
    return table[index];
#endif
}

// The row of this table chunk that `id` selects, or table_rows if none.
fn chunk_row(id: u32) -> u32 {
    let first = params.offset + params.table_start;
    if id < first || id - first >= params.table_rows {
        return params.table_rows;
    }
    return id - first;
}

@compute @workgroup_size(WG)
fn embedding_gather(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>, @builtin(local_invocation_index) lid: u32) {
    let i = (wg.y * nwg.x + wg.x) * WG + lid;
    if i >= params.count * params.cols {
        return;
    }
    let row = chunk_row(ids[i / params.cols]);
    if row < params.table_rows {
        out[i] = table_value(row * params.cols + i % params.cols);
    }
}

@compute @workgroup_size(64)
fn embedding_scatter(@builtin(global_invocation_id) id: vec3<u32>) {
    let col = id.x;
    if col >= params.cols {
        return;
    }
    for (var n = 0u; n < params.count; n++) {
        let row = chunk_row(scatter_ids[n]);
        if row < params.table_rows {
            dtable[row * params.cols + col] += dy[n * params.cols + col];
        }
    }
}
