//! A branch-free `e^x` for loops that should vectorize (SwiGLU's activation, the attention's softmax).

/// `e^x` within 2 ulp of `f32::exp` for `x` in [-87, 88], clamped outside: `2^n · e^r` with `n` the nearest
/// integer to `x / ln 2`, `r = x - n·ln 2` (ln 2 in two parts, as fdlibm's `expf`) and a degree-7
/// polynomial for `e^r`, `|r| ≤ ln 2 / 2`. Branch-free, so a loop over it vectorizes (`f32::exp` is a call).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Rounded to the nearest integer by adding and subtracting 1.5 · 2^23, whose bits then hold `n` in their
    // low part (`round` and float-to-int conversions would keep the loop from vectorizing).
    const ROUND: f32 = 12_582_912.0;
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let two_n = f32::from_bits(t.to_bits().wrapping_sub(ROUND.to_bits() - 127) << 23);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor coefficients 1/k! (k = 2..7): the remainder at |r| = 0.347 is below 2^-27.
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    p * two_n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_the_standard_one() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f32 / 200_000.0;
            let (got, want) = (exp(x), x.exp());
            let ulp = (want.to_bits() as i64 - got.to_bits() as i64).unsigned_abs() as f32;
            worst = worst.max(ulp);
        }
        assert!(worst <= 2.0, "{worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-200.0), exp(-87.0));
    }
}
