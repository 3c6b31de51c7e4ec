// One fused Adam/AdamW step over a flat parameter buffer, exactly as `update` in
// crates/autograd/src/optim.rs (PyTorch semantics):
//   g' = g + l2 * p                 (l2 = weight decay for Adam's L2 variant, else 0)
//   p *= decay_keep                 (decay_keep = 1 - lr * wd for decoupled AdamW, else 1)
//   m = b1 m + (1 - b1) g';  v = b2 v + (1 - b2) g'^2
//   p -= step_size * m / (sqrt(v) / sqrt(1 - b2^t) + eps),  step_size = lr / (1 - b1^t)
// The host computes the step's scalars in f64 and rounds them once, as optim.rs does.
//
// Layout: one element per thread in a grid-stride loop (256-thread blocks). Bytes per element:
// 28 (p, g, m, v in; p, m, v out). HBM-bandwidth bound on an H100: ~15 flops per 28 bytes.

extern "C" __global__ void adamw_step_f32(int n, float step_size, float bias_correction2_sqrt, float beta1, float beta2,
                                          float one_minus_beta1, float one_minus_beta2, float eps, float decay_keep,
                                          float l2, float* __restrict__ p, const float* __restrict__ g,
                                          float* __restrict__ m, float* __restrict__ v) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (long long)blockDim.x * gridDim.x) {
        float grad = g[i] + l2 * p[i];
        float param = p[i] * decay_keep;
        float mi = beta1 * m[i] + one_minus_beta1 * grad;
        float vi = beta2 * v[i] + one_minus_beta2 * grad * grad;
        m[i] = mi;
        v[i] = vi;
        p[i] = param - step_size * mi / (sqrtf(vi) / bias_correction2_sqrt + eps);
    }
}
