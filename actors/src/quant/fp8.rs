//! FP8 block quantization of the DeepSeek-V3 / Kimi-K2 release: `F8_E4M3` weights and one f32
//! `weight_scale_inv` per `block[0] × block[1]` tile, `w = fp8 · scale_inv`.

/// e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits, no infinities, `S.1111.111` is NaN.
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = ((b >> 3) & 0x0f) as i32;
    let man = (b & 0x07) as f32;
    if exp == 0x0f && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * man / 8.0 * 2f32.powi(-6)
    } else {
        sign * (1.0 + man / 8.0) * 2f32.powi(exp - 7)
    }
}

/// Dequantizes an `[rows, cols]` e4m3 matrix with its `[ceil(rows/br), ceil(cols/bc)]` block scales.
/// Each product is rounded to bf16, as mlx-lm's loader does (`from_fp8(…, bfloat16) · scale_inv → bfloat16`),
/// so logits match the reference implementation bit for bit in the weights.
pub fn dequantize_blocks(
    codes: &[u8],
    rows: usize,
    cols: usize,
    scale_inv: &[f32],
    block: [usize; 2],
) -> Vec<f32> {
    let table: Vec<f32> = (0..=255u8).map(e4m3_to_f32).collect();
    let bcols = cols.div_ceil(block[1]);
    let mut w = Vec::with_capacity(rows * cols);
    for r in 0..rows {
        let srow = &scale_inv[(r / block[0]) * bcols..(r / block[0] + 1) * bcols];
        for c in 0..cols {
            let v = table[codes[r * cols + c] as usize] * srow[c / block[1]];
            w.push(half::bf16::from_f32(v).to_f32());
        }
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0); // exp 7, man 0
        assert_eq!(e4m3_to_f32(0xb8), -1.0);
        assert_eq!(e4m3_to_f32(0x7e), 448.0); // the largest finite value
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // the smallest subnormal
        assert!(e4m3_to_f32(0x7f).is_nan());
    }

    #[test]
    fn blocks_scale_their_own_tiles() {
        // 3×3 of ones (0x38) with 2×2 blocks: four scales.
        let w = dequantize_blocks(&[0x38; 9], 3, 3, &[1.0, 2.0, 3.0, 4.0], [2, 2]);
        assert_eq!(w, vec![1.0, 1.0, 2.0, 1.0, 1.0, 2.0, 3.0, 3.0, 4.0]);
    }
}
