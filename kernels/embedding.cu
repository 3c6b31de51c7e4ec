// Embedding lookup and its backward (crates/tensor/src/cpu/embedding.rs).
//
// Forward: a row gather, one element per thread in a grid-stride loop; 8 bytes per element plus
// the id (cached). Backward: a scatter-add into the table's gradient with atomicAdd, since
// repeated ids must accumulate; 8 bytes per element plus the atomic's read-modify-write in L2.
// Both are HBM-bandwidth bound on an H100; the backward's atomics only contend on repeated ids.
// Ids are checked against the table size on the host.

extern "C" __global__ void embedding_forward_f32(int rows, int dim, const float* __restrict__ table,
                                                 const int* __restrict__ ids, float* __restrict__ out) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)rows * dim;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i / dim;
        out[i] = table[(long long)ids[r] * dim + (i - r * dim)];
    }
}

// dtable[ids[r], c] += dout[r, c]; accumulates.
extern "C" __global__ void embedding_backward_f32(int rows, int dim, const int* __restrict__ ids,
                                                  const float* __restrict__ dout, float* __restrict__ dtable) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (long long)rows * dim;
         i += (long long)blockDim.x * gridDim.x) {
        long long r = i / dim;
        atomicAdd(&dtable[(long long)ids[r] * dim + (i - r * dim)], dout[i]);
    }
}

// out[i] = i mod period: the position ids of a batch of equal-length rows (period = seq) or its
// token types (period = 1), made on the device so that no index array crosses the bus for them.
extern "C" __global__ void repeated_range_i32(int n, int period, int* __restrict__ out) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        out[i] = i % period;
    }
}
