// Rotary position embeddings, "rotate half" as Hugging Face's Llama (crates/tensor/src/cpu/rope.rs):
// within each head of head_dim channels, channel i and i + head_dim/2 turn together by the angle
// p * inv_freq_i, inv_freq_i = 1 / theta^(2i/head_dim):
//   y_i = x_i cos - x_{i+h} sin,  y_{i+h} = x_{i+h} cos + x_i sin.
// `sign` = -1 turns the other way (the backward). x, y are [rows, width = heads*head_dim]; row r
// is at position position0 + r % seq (consecutive positions, the same for every sequence).
//
// The angles are computed here exactly as the CPU table does (cpu::rope::inverse_frequency): the
// power in double of the float operands rounded once to float, the float product with the
// position, its cosine and sine in double rounded to float; so no table crosses the bus and a
// decoding step sends nothing for its positions.
// One thread per (row, frequency), looping over the heads so the three double-precision calls
// (pow, cos, sin: on the order of 100 instructions each) are paid once per row and frequency, not
// per head. Bytes per element: 8 (x in, y out). On an H100 (FP64 at half the FP32 rate) that
// math should cost about as much as moving the 16·heads bytes it rotates (an estimate; not yet
// timed on a GPU); on a GPU with 1/64-rate FP64 it would dominate, and a table would pay.

#include "grid_stride.cuh"

extern "C" __global__ void rope_f32(int rows, int seq, int width, int head_dim, int position0, float theta,
                                    float sign, const float* __restrict__ x, float* __restrict__ y) {
    const int half = head_dim / 2;
    const long long pairs = (long long)rows * half;
    GRID_STRIDE(idx, pairs) {
        const int row = (int)(idx / half), i = (int)(idx % half);
        const float exponent = (float)(2 * i) / (float)head_dim;
        const float inv_freq = 1.0f / (float)pow((double)theta, (double)exponent);
        const float angle = (float)(position0 + row % seq) * inv_freq;
        const float c = (float)cos((double)angle), s = sign * (float)sin((double)angle);
        const float* xr = x + (long long)row * width;
        float* yr = y + (long long)row * width;
        for (int h0 = 0; h0 < width; h0 += head_dim) {
            const float x1 = xr[h0 + i], x2 = xr[h0 + half + i];
            yr[h0 + i] = x1 * c - x2 * s;
            yr[h0 + half + i] = x2 * c + x1 * s;
        }
    }
}
