// Fused Adam/AdamW over every parameter of a model in one launch (multi-tensor, as llm.c and
// PyTorch's foreach/fused optimisers do), each element exactly as `update` in
// crates/autograd/src/optim.rs (PyTorch semantics):
//   g' = g + l2 * p                 (l2 = weight decay for Adam's L2 variant, else 0)
//   p *= decay_keep                 (decay_keep = 1 - lr * wd for decoupled AdamW, else 1)
//   m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps),  step_size = lr / (1 - b1^t)
// The host computes each group's scalars in f64 and rounds them once, as optim.rs does.
//
// One launch per group of tensors sharing their scalars (weight decay, step count): two for a
// model with AdamW's usual groups, instead of one per tensor (~100 for MiniLM, most of them
// LayerNorm and bias vectors whose update takes less time than its launch). A group's T tensors
// are listed in two device tables of `device_address` entries:
//   state: [p_0..p_T-1, m_0.., v_0.., len_0.., first_chunk_0..]  uploaded once, and again only
//          when a parameter or moment moves;
//   grads: [g_0..g_T-1]  this step's gradients, 8 bytes a tensor each step (the backward's
//          outputs come out of the caching allocator in a different order from step to step).
//
// Layout: each block updates `chunk` consecutive elements of one tensor (256 threads striding
// over them), finding its tensor by binary search of first_chunk, so blocks are spread over the
// tensors in proportion to their sizes. Bytes per element: 28 (p, g, m, v in; p, m, v out).
// HBM-bandwidth bound on an H100.

// A device pointer or a length, stored in a device table.
typedef unsigned long long device_address;

extern "C" __global__ void adamw_step_f32(int tensors, int chunk, const device_address* __restrict__ state,
                                          const device_address* __restrict__ grads, float step_size,
                                          float bias_correction2_sqrt, float beta1, float beta2, float one_minus_beta1,
                                          float one_minus_beta2, float eps, float decay_keep, float l2) {
    const device_address* first_chunk = state + 4 * tensors;
    int t = 0, last = tensors - 1;  // the last tensor whose first chunk is at or before this block
    while (t < last) {
        int mid = (t + last + 1) / 2;
        if (first_chunk[mid] <= blockIdx.x) t = mid;
        else last = mid - 1;
    }
    float* p = (float*)state[t];
    float* m = (float*)state[tensors + t];
    float* v = (float*)state[2 * tensors + t];
    long long n = (long long)state[3 * tensors + t];
    const float* g = (const float*)grads[t];
    long long begin = (long long)(blockIdx.x - first_chunk[t]) * chunk;
    long long end = min(begin + chunk, n);
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) {
        float grad = g[i] + l2 * p[i];
        float param = p[i] * decay_keep;
        float mi = beta1 * m[i] + one_minus_beta1 * grad;
        float vi = beta2 * v[i] + one_minus_beta2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        p[i] = param - step_size * mi / (sqrtf(vi) / bias_correction2_sqrt + eps);
    }
}
