//! Inverted dropout with a counter-based mask: element `i` is dropped when the top 32 bits of a
//! hash of `(seed, i)` fall below `p·2³²`, and kept and scaled by `1/(1−p)` otherwise. The mask
//! is a pure function of seed and index, so the backward recomputes it instead of storing it,
//! threads need not agree on an order, and the CUDA kernel (`kernels/dropout.cu`) draws the same
//! mask bit for bit (and, in f32, the same values).

use crate::Float;

/// SplitMix64's finaliser: a bijection of `u64` whose outputs pass BigCrush as a counter-based
/// generator (Steele, Lea & Flood 2014).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The drop threshold of probability `p` on the hash's top 32 bits (`p` quantised to 2⁻³²).
pub fn dropout_threshold(p: f64) -> u32 {
    (p * 4_294_967_296.0).round().min(u32::MAX as f64) as u32
}

/// Whether element `index` is dropped under `threshold` ([`dropout_threshold`]) and `seed`.
pub fn dropped(index: u64, threshold: u32, seed: u64) -> bool {
    ((splitmix64(seed ^ splitmix64(index)) >> 32) as u32) < threshold
}

/// `x ← x · mask(p, seed)`: dropped elements become 0, kept ones are multiplied by `1/(1−p)`
/// (in `F`, so f32 rounds as the kernel does).
pub fn dropout<F: Float>(x: &mut [F], p: f64, seed: u64) {
    let (threshold, keep) = (dropout_threshold(p), F::from_f64(1.0 / (1.0 - p)));
    for (i, v) in x.iter_mut().enumerate() {
        *v = if dropped(i as u64, threshold, seed) {
            F::ZERO
        } else {
            *v * keep
        };
    }
}
