// Fused scaled dot-product attention, FlashAttention-2 style, for the encoder (key-padding mask,
// crates/tensor/src/cpu/attention.rs) and the decoder (causal grouped-query attention over a KV
// cache, crates/tensor/src/cpu/causal_attention.rs): the shapes are at the entry points below.
// With `causal` != 0 each query sees only the keys at or before its position, and each block
// skips the key (or query) tiles that mask removes entirely, about halving the work. The
// q_len x kv_len score matrix never reaches global memory: the forward keeps an online softmax
// per query row and saves lse = log sum_j exp(s_ij); the backward recomputes P = exp(S - lse)
// tile by tile. Fully masked rows give zero output, lse = -inf and zero gradients.
//
// Tiling: one block of 128 threads per (query or key tile, head, batch). A row (query row, or
// key row in dK/dV) belongs to a group of `group` = 1, 2 or 4 adjacent lanes, each owning 16 of
// its dims as four float4 chunks interleaved with the group's other lanes (chunk g + group*k),
// so head_dim <= 16*group <= 64, zero-padded; a block covers 128/group rows. The other operand
// streams through dynamic shared memory in tiles of 32 rows; every lane of a warp reads the same
// tile row, so the float4 loads are broadcasts with no bank conflicts. Each lane's partial dot
// products with a whole tile go through shared memory and every lane of the group sums them in
// the same order: one barrier per tile instead of a shuffle per key (the CPU emulator pays for
// every warp collective, and on the GPU the barrier is cheaper than 32 shuffle rounds).
//   forward:       per key tile, S row -> tile max -> rescale O, l -> O += P V. Registers hold
//                  q, o (16 each) and the 32 scores.
//   backward dQ:   per query row, delta = rowsum(dO o O) (saved for dK/dV), then per key tile
//                  P, dP, and dQ += P (dP - delta) K.
//   backward dKdV: per key row, streams query tiles (Q, dO, lse, delta) and accumulates
//                  dV += P^T dO and dK += dS^T Q in registers.
// The two backward kernels need no atomics and no inter-block waits (deterministic results);
// the price is computing S and dP twice (14 T^2 d flops for the backward instead of 10).
//
// Bytes moved per (batch, head), T = seq (q_len = kv_len), d = head_dim, R = 128/group rows per block:
// forward 8Td (Q, O) + ceil(T/R) 8Td (K, V per query tile) + 4T (lse); dQ 16Td + ceil(T/R) 8Td;
// dK/dV 16Td + ceil(T/R) 8Td (with grouped-query heads, every query head of a group reads its K
// and V tiles in the forward and dQ, and a dK/dV block streams Q and dO of all of them). For MiniLM (T = 128, d = 32: one tile) that is 4T^2 d = 2 MFLOP
// of forward work per 64 KiB, ~32 flop/byte: above the H100's f32-to-HBM balance (~20), so these
// kernels are bound by FP32 FMA issue on the CUDA cores, with the broadcast shared loads and the
// partial-sum exchange beside it, not by HBM. The next step is tensor cores (mma on bf16/tf32).
// Shared memory per block: 2 tiles of 32 x 4*group float4 + 16 KiB of partials + 256 B.
// ptxas (NVRTC 12.9): forward 128 registers, dQ 168, dK/dV 203 on sm_90 (198 on sm_80), no spills:
// 4, 3 and 2 blocks per SM. The forward and dK/dV ask for those occupancies in their launch
// bounds: left to itself, ptxas kept the forward at 96 registers on sm_80 and dK/dV at 168, and
// both spilled (8 and 16 bytes) once they took grouped heads and keys longer than queries.

#include "warp.cuh"
// float4 chunks of one row each lane owns: 16 dims.
#define LANE_CHUNKS 4
// Rows of K/V (forward, dQ) or Q/dO (dK/dV) staged in shared memory at a time.
#define TILE_ROWS 32

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// This lane's part of a . row, `row` being one row of chunks in shared memory.
__device__ __forceinline__ float partial_dot(const float4 (&a)[LANE_CHUNKS], const float4* row, int lane_in_group,
                                             int group) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < LANE_CHUNKS; ++k) {
        float4 b = row[lane_in_group + group * k];
        acc += a[k].x * b.x + a[k].y * b.y + a[k].z * b.z + a[k].w * b.w;
    }
    return acc;
}

// Threads per block (the launch uses exactly this many): the partial sums are laid out for it.
#define BLOCK_THREADS 128

// dots[j] = a . tile row j for the lane group's row: each lane's partial products go through
// `partials` (TILE_ROWS x BLOCK_THREADS floats) and every lane of the group adds the group's
// partials in the same order, so all of them hold identical sums. The caller must not write
// `partials` again before a barrier that follows every lane's reads.
__device__ __forceinline__ void tile_dots(float (&dots)[TILE_ROWS], const float4 (&a)[LANE_CHUNKS], const float4* tile,
                                          float* partials, int chunks, int lane_in_group, int group) {
    // Unrolled only in part: fully unrolled, the compiler hoists every tile load and spills.
#pragma unroll 4
    for (int j = 0; j < TILE_ROWS; ++j)
        partials[j * BLOCK_THREADS + threadIdx.x] = partial_dot(a, tile + j * chunks, lane_in_group, group);
    __syncthreads();
    const int first = threadIdx.x - lane_in_group;
#pragma unroll
    for (int j = 0; j < TILE_ROWS; ++j) {
        float sum = 0.0f;
        for (int g = 0; g < group; ++g) sum += partials[j * BLOCK_THREADS + first + g];
        dots[j] = sum;
    }
}

// acc += alpha * row (this lane's chunks).
__device__ __forceinline__ void add_scaled(float4 (&acc)[LANE_CHUNKS], float alpha, const float4* row,
                                           int lane_in_group, int group) {
#pragma unroll
    for (int k = 0; k < LANE_CHUNKS; ++k) {
        float4 b = row[lane_in_group + group * k];
        acc[k].x += alpha * b.x;
        acc[k].y += alpha * b.y;
        acc[k].z += alpha * b.z;
        acc[k].w += alpha * b.w;
    }
}

// Chunk `chunk` of a global row, zero past head_dim.
__device__ __forceinline__ float4 load_chunk(const float* __restrict__ row, int chunk, int head_dim) {
    int c = 4 * chunk;
    return make_float4(c < head_dim ? row[c] : 0.0f, c + 1 < head_dim ? row[c + 1] : 0.0f,
                       c + 2 < head_dim ? row[c + 2] : 0.0f, c + 3 < head_dim ? row[c + 3] : 0.0f);
}

// This lane's chunks of a global row times `scale`; zero for a row past the sequence.
__device__ __forceinline__ void load_lane_chunks(float4 (&dst)[LANE_CHUNKS], const float* __restrict__ row, bool valid,
                                                 int head_dim, float scale, int lane_in_group, int group) {
#pragma unroll
    for (int k = 0; k < LANE_CHUNKS; ++k) {
        float4 v = valid ? load_chunk(row, lane_in_group + group * k, head_dim) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        dst[k] = make_float4(v.x * scale, v.y * scale, v.z * scale, v.w * scale);
    }
}

__device__ __forceinline__ void zero_chunks(float4 (&dst)[LANE_CHUNKS]) {
#pragma unroll
    for (int k = 0; k < LANE_CHUNKS; ++k) dst[k] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
}

// Writes this lane's chunks times `scale` to a global row, dims below head_dim only.
__device__ __forceinline__ void store_lane_chunks(float* __restrict__ row, const float4 (&src)[LANE_CHUNKS], float scale,
                                                  int head_dim, int lane_in_group, int group) {
#pragma unroll
    for (int k = 0; k < LANE_CHUNKS; ++k) {
        int c = 4 * (lane_in_group + group * k);
        if (c < head_dim) row[c] = src[k].x * scale;
        if (c + 1 < head_dim) row[c + 1] = src[k].y * scale;
        if (c + 2 < head_dim) row[c + 2] = src[k].z * scale;
        if (c + 3 < head_dim) row[c + 3] = src[k].w * scale;
    }
}

// Stages rows row0.. row0+TILE_ROWS of two [batch, seq, heads*head_dim] tensors of (b, h) in
// shared memory, `chunks` float4 per row, zero past the sequence and past head_dim.
__device__ __forceinline__ void stage_tiles(float4* first_tile, float4* second_tile, const float* __restrict__ first,
                                            const float* __restrict__ second, int row0, int seq, int heads,
                                            int head_dim, int chunks, int b, int h) {
    for (int idx = threadIdx.x; idx < TILE_ROWS * chunks; idx += BLOCK_THREADS) {
        int t = row0 + idx / chunks, chunk = idx % chunks;
        float4 x = make_float4(0.0f, 0.0f, 0.0f, 0.0f), y = x;
        if (t < seq) {
            long long offset = ((long long)(b * seq + t) * heads + h) * head_dim;
            x = load_chunk(first + offset, chunk, head_dim);
            y = load_chunk(second + offset, chunk, head_dim);
        }
        first_tile[idx] = x;
        second_tile[idx] = y;
    }
}

// The last key row (exclusive) any query row of this block sees: every key, or under the causal
// mask the keys up to the position of the block's last query row. Uniform across the block
// (barriers inside).
__device__ __forceinline__ int key_end(int q_len, int kv_len, int rows_per_block, int causal) {
    return causal ? min(kv_len, kv_len - q_len + (int)(blockIdx.x + 1) * rows_per_block) : kv_len;
}

// Whether key t of batch entry b is a token (a null mask: no padding).
__device__ __forceinline__ bool key_present(const float* __restrict__ mask, int kv_len, int b, int t) {
    return mask == nullptr || mask[(long long)b * kv_len + t] != 0.0f;
}

// Additive key mask of the key tile at key0: 0 for tokens, -inf for padding and past kv_len.
__device__ __forceinline__ void stage_key_bias(float* key_bias, const float* __restrict__ mask, int key0, int kv_len,
                                               int b) {
    for (int j = threadIdx.x; j < TILE_ROWS; j += BLOCK_THREADS) {
        int t = key0 + j;
        key_bias[j] = t < kv_len && key_present(mask, kv_len, b, t) ? 0.0f : neg_inf();
    }
}

// Dynamic shared memory layout of every kernel here: two tiles of TILE_ROWS x `chunks` float4,
// then TILE_ROWS x BLOCK_THREADS partial sums, then `stats` x TILE_ROWS floats per tile row.
struct AttentionShared {
    float4* first_tile;
    float4* second_tile;
    float* partials;
    float* stats;
};

__device__ __forceinline__ AttentionShared attention_shared_layout(float4* base, int chunks) {
    AttentionShared s;
    s.first_tile = base;
    s.second_tile = base + TILE_ROWS * chunks;
    s.partials = reinterpret_cast<float*>(s.second_tile + TILE_ROWS * chunks);
    s.stats = s.partials + TILE_ROWS * BLOCK_THREADS;
    return s;
}

// Shapes: q, out, dout, dq are [batch, q_len, heads*head_dim]; k, v, dk, dv [batch, kv_len,
// kv_heads*head_dim], kv_len >= q_len, query head h reading key/value head h / (heads/kv_heads)
// (grouped-query attention; an encoder has q_len = kv_len and kv_heads = heads). The queries are
// the last q_len of the kv_len positions (a decoder's KV cache holds the first kv_len - q_len),
// so under `causal` query i sees keys j <= kv_len - q_len + i. mask is [batch, kv_len], or null
// for no padding; lse and delta are [batch, heads, q_len].

// Grid (ceil(q_len / (128/group)), heads, batch), BLOCK_THREADS threads; shared memory as
// AttentionShared with one stat (the key bias).
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 4)
    attention_forward_f32(int q_len, int kv_len, int heads, int kv_heads, int head_dim, int group, float scale,
                          const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                          const float* __restrict__ mask, int causal, float* __restrict__ out,
                          float* __restrict__ lse) {
    extern __shared__ float4 attention_shared[];
    const int chunks = LANE_CHUNKS * group;
    const AttentionShared sh = attention_shared_layout(attention_shared, chunks);
    const float4* key_tile = sh.first_tile;
    const float4* value_tile = sh.second_tile;
    const float* key_bias = sh.stats;
    const int b = blockIdx.z, h = blockIdx.y, lane_in_group = threadIdx.x % group;
    const int kv_head = h / (heads / kv_heads);
    const int i = blockIdx.x * (BLOCK_THREADS / group) + threadIdx.x / group;
    const int position = kv_len - q_len + i;
    const bool row_valid = i < q_len;
    const long long row_offset = ((long long)(b * q_len + (row_valid ? i : 0)) * heads + h) * head_dim;

    float4 q_scaled[LANE_CHUNKS], o[LANE_CHUNKS];
    load_lane_chunks(q_scaled, q + row_offset, row_valid, head_dim, scale, lane_in_group, group);
    zero_chunks(o);
    float m = neg_inf(), l = 0.0f;
    const int keys = key_end(q_len, kv_len, BLOCK_THREADS / group, causal);
    for (int key0 = 0; key0 < keys; key0 += TILE_ROWS) {
        __syncthreads();  // every row is done with the previous tile and its partials
        stage_tiles(sh.first_tile, sh.second_tile, k, v, key0, kv_len, kv_heads, head_dim, chunks, b, kv_head);
        stage_key_bias(sh.stats, mask, key0, kv_len, b);
        __syncthreads();
        float s[TILE_ROWS];
        tile_dots(s, q_scaled, key_tile, sh.partials, chunks, lane_in_group, group);
        float tile_max = neg_inf();
#pragma unroll
        for (int j = 0; j < TILE_ROWS; ++j) {
            s[j] += key_bias[j];
            if (causal && key0 + j > position) s[j] = neg_inf();  // (as a select in one expression, sm_80 spilled)
            tile_max = fmaxf(tile_max, s[j]);
        }
        float m_new = fmaxf(m, tile_max);
        if (m_new == neg_inf()) continue;  // every key so far is padding
        float correction = expf(m - m_new);
        l *= correction;
#pragma unroll
        for (int c = 0; c < LANE_CHUNKS; ++c) {
            o[c].x *= correction;
            o[c].y *= correction;
            o[c].z *= correction;
            o[c].w *= correction;
        }
#pragma unroll
        for (int j = 0; j < TILE_ROWS; ++j) {
            float p = expf(s[j] - m_new);
            l += p;
            add_scaled(o, p, value_tile + j * chunks, lane_in_group, group);
        }
        m = m_new;
    }
    if (!row_valid) return;
    bool all_padding = m == neg_inf();
    store_lane_chunks(out + row_offset, o, all_padding ? 0.0f : 1.0f / l, head_dim, lane_in_group, group);
    if (lane_in_group == 0) lse[((long long)b * heads + h) * q_len + i] = all_padding ? neg_inf() : m + logf(l);
}

// dQ = scale * sum_j P_ij (dP_ij - delta_i) K_j with P = exp(scale q.k - lse), dP = dO_i . V_j;
// also saves delta = rowsum(dO o O) for the dK/dV kernel. Overwrites dq. Launch as the forward.
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS)
    attention_backward_dq_f32(int q_len, int kv_len, int heads, int kv_heads, int head_dim, int group, float scale,
                              const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                              const float* __restrict__ mask, int causal, const float* __restrict__ out,
                              const float* __restrict__ lse, const float* __restrict__ dout, float* __restrict__ dq,
                              float* __restrict__ delta) {
    extern __shared__ float4 attention_shared[];
    const int chunks = LANE_CHUNKS * group;
    const AttentionShared sh = attention_shared_layout(attention_shared, chunks);
    const float4* key_tile = sh.first_tile;
    const float4* value_tile = sh.second_tile;
    const float* key_bias = sh.stats;
    const int b = blockIdx.z, h = blockIdx.y, lane_in_group = threadIdx.x % group;
    const int kv_head = h / (heads / kv_heads);
    const int i = blockIdx.x * (BLOCK_THREADS / group) + threadIdx.x / group;
    const int position = kv_len - q_len + i;
    const bool row_valid = i < q_len;
    const long long row_offset = ((long long)(b * q_len + (row_valid ? i : 0)) * heads + h) * head_dim;
    const long long stat = ((long long)b * heads + h) * q_len + i;

    float4 q_scaled[LANE_CHUNKS], dout_row[LANE_CHUNKS], dq_acc[LANE_CHUNKS];
    load_lane_chunks(dout_row, dout + row_offset, row_valid, head_dim, 1.0f, lane_in_group, group);
    // delta first, with q_scaled briefly holding this row of O.
    load_lane_chunks(q_scaled, out + row_offset, row_valid, head_dim, 1.0f, lane_in_group, group);
    float row_delta = 0.0f;
#pragma unroll
    for (int c = 0; c < LANE_CHUNKS; ++c)
        row_delta += dout_row[c].x * q_scaled[c].x + dout_row[c].y * q_scaled[c].y + dout_row[c].z * q_scaled[c].z +
                     dout_row[c].w * q_scaled[c].w;
    row_delta = group_sum(row_delta, group);
    if (row_valid && lane_in_group == 0) delta[stat] = row_delta;
    load_lane_chunks(q_scaled, q + row_offset, row_valid, head_dim, scale, lane_in_group, group);
    zero_chunks(dq_acc);
    const float row_lse = row_valid ? lse[stat] : neg_inf();
    const bool row_live = row_lse != neg_inf();

    const int keys = key_end(q_len, kv_len, BLOCK_THREADS / group, causal);
    for (int key0 = 0; key0 < keys; key0 += TILE_ROWS) {
        __syncthreads();
        stage_tiles(sh.first_tile, sh.second_tile, k, v, key0, kv_len, kv_heads, head_dim, chunks, b, kv_head);
        stage_key_bias(sh.stats, mask, key0, kv_len, b);
        __syncthreads();
        float p[TILE_ROWS], dp[TILE_ROWS];
        tile_dots(p, q_scaled, key_tile, sh.partials, chunks, lane_in_group, group);
#pragma unroll
        for (int j = 0; j < TILE_ROWS; ++j)
            p[j] = row_live && !(causal && key0 + j > position) ? expf(p[j] + key_bias[j] - row_lse) : 0.0f;
        __syncthreads();  // every lane has read the score partials
        tile_dots(dp, dout_row, value_tile, sh.partials, chunks, lane_in_group, group);
#pragma unroll
        for (int j = 0; j < TILE_ROWS; ++j) add_scaled(dq_acc, p[j] * (dp[j] - row_delta), key_tile + j * chunks, lane_in_group, group);
    }
    if (row_valid) store_lane_chunks(dq + row_offset, dq_acc, scale, head_dim, lane_in_group, group);
}

// dV_j = sum_i P_ij dO_i and dK_j = scale * sum_i P_ij (dP_ij - delta_i) Q_i, a key row per lane
// group, streaming query tiles of every query head that reads this key/value head (so a group's
// dK/dV is summed in registers: no atomics). Needs delta from attention_backward_dq_f32.
// Overwrites dk, dv. Grid (ceil(kv_len / (128/group)), kv_heads, batch), two stats (lse, delta).
extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 2)
    attention_backward_dkdv_f32(int q_len, int kv_len, int heads, int kv_heads, int head_dim, int group, float scale,
                                const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                                const float* __restrict__ mask, int causal, const float* __restrict__ lse,
                                const float* __restrict__ delta, const float* __restrict__ dout,
                                float* __restrict__ dk, float* __restrict__ dv) {
    extern __shared__ float4 attention_shared[];
    const int chunks = LANE_CHUNKS * group;
    const AttentionShared sh = attention_shared_layout(attention_shared, chunks);
    const float4* query_tile = sh.first_tile;
    const float4* dout_tile = sh.second_tile;
    float* lse_tile = sh.stats;
    float* delta_tile = sh.stats + TILE_ROWS;
    const int b = blockIdx.z, kv_head = blockIdx.y, lane_in_group = threadIdx.x % group;
    const int heads_per_kv = heads / kv_heads, offset = kv_len - q_len;
    const int j = blockIdx.x * (BLOCK_THREADS / group) + threadIdx.x / group;
    const bool key_valid = j < kv_len;
    const long long row_offset = ((long long)(b * kv_len + (key_valid ? j : 0)) * kv_heads + kv_head) * head_dim;
    const bool key_live = key_valid && key_present(mask, kv_len, b, j);

    float4 key_row[LANE_CHUNKS], value_row[LANE_CHUNKS], dk_acc[LANE_CHUNKS], dv_acc[LANE_CHUNKS];
    load_lane_chunks(key_row, k + row_offset, key_valid, head_dim, 1.0f, lane_in_group, group);
    load_lane_chunks(value_row, v + row_offset, key_valid, head_dim, 1.0f, lane_in_group, group);
    zero_chunks(dk_acc);
    zero_chunks(dv_acc);

    // Under the causal mask, query rows before the block's first key's position see none of its
    // keys.
    const int first_key = (int)blockIdx.x * (BLOCK_THREADS / group);
    const int first_query = causal ? max(0, first_key - offset) / TILE_ROWS * TILE_ROWS : 0;
    for (int h = kv_head * heads_per_kv; h < (kv_head + 1) * heads_per_kv; ++h) {
        const long long stats = ((long long)b * heads + h) * q_len;
        for (int query0 = first_query; query0 < q_len; query0 += TILE_ROWS) {
            __syncthreads();
            stage_tiles(sh.first_tile, sh.second_tile, q, dout, query0, q_len, heads, head_dim, chunks, b, h);
            for (int r = threadIdx.x; r < TILE_ROWS; r += BLOCK_THREADS) {
                int t = query0 + r;
                lse_tile[r] = t < q_len ? lse[stats + t] : neg_inf();
                delta_tile[r] = t < q_len ? delta[stats + t] : 0.0f;
            }
            __syncthreads();
            float p[TILE_ROWS], dp[TILE_ROWS];
            tile_dots(p, key_row, query_tile, sh.partials, chunks, lane_in_group, group);
            // Masked keys, fully masked query rows, rows past q_len and (causal) rows before
            // this key's position contribute nothing.
#pragma unroll
            for (int r = 0; r < TILE_ROWS; ++r)
                p[r] = key_live && lse_tile[r] != neg_inf() && !(causal && offset + query0 + r < j)
                           ? expf(scale * p[r] - lse_tile[r])
                           : 0.0f;
            __syncthreads();  // every lane has read the score partials
            tile_dots(dp, value_row, dout_tile, sh.partials, chunks, lane_in_group, group);
            // Two passes rather than one: fewer tile values live at once (no spills).
#pragma unroll
            for (int r = 0; r < TILE_ROWS; ++r) add_scaled(dv_acc, p[r], dout_tile + r * chunks, lane_in_group, group);
#pragma unroll
            for (int r = 0; r < TILE_ROWS; ++r)
                add_scaled(dk_acc, p[r] * (dp[r] - delta_tile[r]), query_tile + r * chunks, lane_in_group, group);
        }
    }
    if (!key_valid) return;
    store_lane_chunks(dk + row_offset, dk_acc, scale, head_dim, lane_in_group, group);
    store_lane_chunks(dv + row_offset, dv_acc, 1.0f, head_dim, lane_in_group, group);
}
