// Workgroup-wide sum and max, pasted into kernels where one workgroup
// cooperates on a row (softmax, norms, cross-entropy, sums).
//
// Contract: every thread of the workgroup calls the function in uniform
// control flow with its own value and gets the reduction of all values.
// The including file declares `override WG: u32` (threads per workgroup, a
// power of two, at most 256) and `override ONE_SUBGROUP: bool` (the host
// sets it when WG is at most the adapter's smallest subgroup size, so one
// subgroup operation reduces the whole workgroup without a barrier), and
// takes a `Lane` as an entry-point argument.
//
// With subgroups, each subgroup reduces its values with one operation and
// the workgroup adds the per-subgroup results in subgroup order. Without
// them (wgpu's GL backend, or adapters without the feature) a shared-memory
// tree does the work.

const REDUCE_SLOTS: u32 = 256u;
var<workgroup> reduce_scratch: array<f32, REDUCE_SLOTS>;

struct Lane {
    @builtin(local_invocation_index) index: u32,
#if SUBGROUPS
    @builtin(subgroup_invocation_id) subgroup_lane: u32,
    @builtin(subgroup_id) subgroup: u32,
    @builtin(num_subgroups) subgroups: u32,
#endif
}

fn workgroup_sum(value: f32, lane: Lane) -> f32 {
#if SUBGROUPS
    let partial = subgroupAdd(value);
    if ONE_SUBGROUP {
        return partial;
    }
    workgroupBarrier();
    if lane.subgroup_lane == 0u {
        reduce_scratch[lane.subgroup] = partial;
    }
    workgroupBarrier();
    var total = 0.0;
    for (var i = 0u; i < lane.subgroups; i++) {
        total += reduce_scratch[i];
    }
    return total;
#else
    workgroupBarrier();
    reduce_scratch[lane.index] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if lane.index < stride {
            reduce_scratch[lane.index] += reduce_scratch[lane.index + stride];
        }
        workgroupBarrier();
    }
    return reduce_scratch[0];
#endif
}

fn workgroup_max(value: f32, lane: Lane) -> f32 {
#if SUBGROUPS
    let partial = subgroupMax(value);
    if ONE_SUBGROUP {
        return partial;
    }
    workgroupBarrier();
    if lane.subgroup_lane == 0u {
        reduce_scratch[lane.subgroup] = partial;
    }
    workgroupBarrier();
    var best = reduce_scratch[0];
    for (var i = 1u; i < lane.subgroups; i++) {
        best = max(best, reduce_scratch[i]);
    }
    return best;
#else
    workgroupBarrier();
    reduce_scratch[lane.index] = value;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride /= 2u) {
        if lane.index < stride {
            reduce_scratch[lane.index] = max(reduce_scratch[lane.index], reduce_scratch[lane.index + stride]);
        }
        workgroupBarrier();
    }
    return reduce_scratch[0];
#endif
}
