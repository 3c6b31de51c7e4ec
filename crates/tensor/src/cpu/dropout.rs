//! Inverted dropout with a counter-based mask: element `i` is kept (and scaled by `1/(1−p)`)
//! unless a hash of `(seed, i)` falls below `p`. The mask is a pure function of seed and index,
//! so the backward recomputes it instead of storing it, threads need not agree on an order, and
//! the CUDA kernel (`kernels/dropout.cu`) draws the same mask bit for bit.

use crate::Float;

/// SplitMix64's finaliser: a bijection of `u64` whose outputs pass BigCrush as a counter-based
/// generator (Steele, Lea & Flood 2014).
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The factor element `index` is multiplied by: 0 with probability `p`, else `1/(1−p)`.
pub fn dropout_factor(index: u64, p: f64, seed: u64) -> f64 {
    // The top 53 bits as a uniform double in [0, 1).
    let u = (splitmix64(seed ^ splitmix64(index)) >> 11) as f64 / (1u64 << 53) as f64;
    if u < p {
        0.0
    } else {
        1.0 / (1.0 - p)
    }
}

/// `x ← x · mask(p, seed)`, the product rounded once from f64 (as the CUDA kernel does).
pub fn dropout<F: Float>(x: &mut [F], p: f64, seed: u64) {
    for (i, v) in x.iter_mut().enumerate() {
        *v = F::from_f64(v.to_f64() * dropout_factor(i as u64, p, seed));
    }
}
