//! MLX affine quantization: `w ≈ scale · q + bias` per group of `group` consecutive input columns, with the
//! codes `q` (`bits` wide) packed as one little-endian bitstream per row (`U32` words in the checkpoint).
//! Scales and biases are bf16, f16 or f32, shaped `[rows, cols / group]`.

use crate::quant::kernels::{self, Activations};
use crate::weights::Buf;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleType {
    Bf16,
    F16,
    F32,
}

impl ScaleType {
    pub fn size(self) -> usize {
        match self {
            ScaleType::Bf16 | ScaleType::F16 => 2,
            ScaleType::F32 => 4,
        }
    }

    #[inline]
    pub fn read(self, b: &[u8], i: usize) -> f32 {
        match self {
            ScaleType::Bf16 => half::bf16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            ScaleType::F16 => half::f16::from_le_bytes([b[2 * i], b[2 * i + 1]]).to_f32(),
            ScaleType::F32 => {
                f32::from_le_bytes([b[4 * i], b[4 * i + 1], b[4 * i + 2], b[4 * i + 3]])
            }
        }
    }
}

/// One affine-quantized matrix `[rows, cols]` (one expert's projection, one head of `embed_q`, …).
#[derive(Clone)]
pub struct AffineMatrix {
    pub rows: usize,
    pub cols: usize,
    pub bits: u32,
    pub group: usize,
    pub packed: Buf,
    pub scales: Buf,
    pub biases: Buf,
    pub scale_type: ScaleType,
    /// f32 (exact) or int8 (fast) activations.
    pub activations: Activations,
    /// 2- to 6- or 8-bit rows stored at load sixteen to a block in the order of the rows-in-lanes kernel, with their
    /// scales and biases per block and group (`kernels::lanes_codes`, `kernels::lanes_scales`): the AVX-512 +
    /// VNNI rows-in-lanes kernel multiplies such a matrix, with int8 activations or f32 ones as three int8
    /// slices (no other kernel does); the dequantizing readers read it back.
    pub lanes: bool,
}

impl AffineMatrix {
    pub fn row_bytes(&self) -> usize {
        self.cols * self.bits as usize / 8
    }

    pub fn groups_per_row(&self) -> usize {
        self.cols / self.group
    }

    /// Bytes of codes, scales and biases: what a matmul reads.
    pub fn weight_bytes(&self) -> usize {
        self.packed.len() + self.scales.len() + self.biases.len()
    }

    /// Where group `g` of row `r` has its scale and bias (in values of the scale type).
    #[inline]
    fn scale_index(&self, r: usize, g: usize) -> usize {
        let gpr = self.groups_per_row();
        if self.lanes {
            (r / 16 * gpr + g) * 16 + r % 16
        } else {
            r * gpr + g
        }
    }

    /// Scale and bias of group `g` of row `r`.
    #[inline]
    pub fn scale_bias(&self, r: usize, g: usize) -> (f32, f32) {
        let i = self.scale_index(r, g);
        (
            self.scale_type.read(&self.scales, i),
            self.scale_type.read(&self.biases, i),
        )
    }

    /// Scales and biases of rows `rows` as f32, row after row (one tight loop per storage type, so it
    /// vectorizes).
    #[inline(always)]
    pub fn rows_scales(
        &self,
        rows: std::ops::Range<usize>,
        scales: &mut [f32],
        biases: &mut [f32],
    ) {
        let (g, size) = (self.groups_per_row(), self.scale_type.size());
        if self.lanes {
            let all = rows.flat_map(|r| (0..g).map(move |j| (r, j)));
            for ((r, j), (s, b)) in all.zip(scales.iter_mut().zip(biases.iter_mut())) {
                (*s, *b) = self.scale_bias(r, j);
            }
            return;
        }
        let (a, b) = (rows.start * g * size, rows.end * g * size);
        for (src, dst) in [
            (&self.scales[a..b], &mut *scales),
            (&self.biases[a..b], &mut *biases),
        ] {
            match self.scale_type {
                ScaleType::Bf16 => {
                    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *d = f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16);
                    }
                }
                ScaleType::F16 => {
                    for (d, c) in dst.iter_mut().zip(src.chunks_exact(2)) {
                        *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                    }
                }
                ScaleType::F32 => {
                    for (d, c) in dst.iter_mut().zip(src.chunks_exact(4)) {
                        *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    }
                }
            }
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        self.dequantize_rows(r..r + 1, out);
    }

    pub fn dequantize(&self) -> Vec<f32> {
        let mut w = vec![0f32; self.rows * self.cols];
        self.dequantize_into(&mut w);
        w
    }

    /// The whole matrix as f32 into `w` (`rows · cols` values, row-major).
    pub fn dequantize_into(&self, w: &mut [f32]) {
        self.dequantize_rows(0..self.rows, w);
    }

    /// Rows `rows` as f32 into `out`, a block of rows (about `DEQUANT_BLOCK` codes) at a time through one
    /// buffer of codes, so narrow matrices (attention heads) pay the unpacking's setup once per block, and the
    /// multiply-add over each group vectorizes.
    fn dequantize_rows(&self, rows: std::ops::Range<usize>, out: &mut [f32]) {
        let gpr = self.groups_per_row();
        let block = (DEQUANT_BLOCK / self.cols).max(1);
        let mut codes = vec![0u8; block * self.cols];
        let (mut scales, mut biases) = (vec![0f32; block * gpr], vec![0f32; block * gpr]);
        let rb = self.row_bytes();
        let starts = rows.clone().step_by(block);
        for (r0, dst) in starts.zip(out.chunks_mut(block * self.cols)) {
            let r1 = (r0 + block).min(rows.end);
            let n = r1 - r0;
            let codes = &mut codes[..n * self.cols];
            if self.lanes {
                for (r, codes) in (r0..r1).zip(codes.chunks_exact_mut(self.cols)) {
                    kernels::lanes_row_codes(self, r, codes);
                }
            } else {
                unpack(&self.packed[r0 * rb..r1 * rb], self.bits, codes);
            }
            self.rows_scales(r0..r1, &mut scales[..n * gpr], &mut biases[..n * gpr]);
            let groups = dst
                .chunks_exact_mut(self.group)
                .zip(codes.chunks_exact(self.group));
            for ((o, q), (&s, &b)) in groups.zip(scales.iter().zip(&biases)) {
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = s * q as f32 + b;
                }
            }
        }
    }

    /// `y[t, rows] = x[t, cols] · Wᵀ` for `t = x.len() / cols` tokens, on this matrix's activation path.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        kernels::affine_matmul(self, x, y)
    }

    /// Quantizes `w` (`[rows, cols]`, row-major) with min/max groups: the codes span each group's range.
    pub fn quantize(w: &[f32], rows: usize, cols: usize, bits: u32, group: usize) -> AffineMatrix {
        assert!(cols.is_multiple_of(group) && w.len() == rows * cols);
        let levels = ((1u32 << bits) - 1) as f32;
        let mut codes = vec![0u8; rows * cols];
        let mut scales = Vec::with_capacity(rows * cols / group * 4);
        let mut biases = Vec::with_capacity(rows * cols / group * 4);
        for (gi, chunk) in w.chunks_exact(group).enumerate() {
            let (lo, hi) = chunk
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let scale = if hi > lo { (hi - lo) / levels } else { 1.0 };
            for (j, &v) in chunk.iter().enumerate() {
                codes[gi * group + j] = ((v - lo) / scale).round().clamp(0.0, levels) as u8;
            }
            scales.extend_from_slice(&scale.to_le_bytes());
            biases.extend_from_slice(&lo.to_le_bytes());
        }
        AffineMatrix {
            rows,
            cols,
            bits,
            group,
            packed: Buf::owned(pack(&codes, bits)),
            scales: Buf::owned(scales),
            biases: Buf::owned(biases),
            scale_type: ScaleType::F32,
            activations: Activations::F32,
            lanes: false,
        }
    }
}

/// Packs `bits`-wide codes into a little-endian bitstream (MLX's layout for every bit width).
pub fn pack(codes: &[u8], bits: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity((codes.len() * bits as usize).div_ceil(8));
    let (mut acc, mut n) = (0u64, 0u32);
    for &c in codes {
        debug_assert!((c as u32) < (1 << bits));
        acc |= (c as u64) << n;
        n += bits;
        while n >= 8 {
            out.push(acc as u8);
            acc >>= 8;
            n -= 8;
        }
    }
    if n > 0 {
        out.push(acc as u8);
    }
    out
}

/// Codes [`AffineMatrix::dequantize_rows`] unpacks at a time.
const DEQUANT_BLOCK: usize = 16384;

/// Unpacks `out.len()` codes of `bits` each from the start of `bytes`. Eight codes span exactly `bits` bytes,
/// so each step reads those bytes as one little-endian word and shifts the codes out (4-bit codes: two per byte).
pub fn unpack(bytes: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        2 => unpack_words::<2>(bytes, out),
        3 => unpack_words::<3>(bytes, out),
        // Byte by byte: the compiler vectorizes this one (the dequantization of attention heads).
        4 => {
            let (pairs, tail) = out.split_at_mut(out.len() / 2 * 2);
            for (o, &b) in pairs.chunks_exact_mut(2).zip(bytes) {
                o[0] = b & 0x0f;
                o[1] = b >> 4;
            }
            if let Some(t) = tail.first_mut() {
                *t = bytes[pairs.len() / 2] & 0x0f;
            }
        }
        5 => unpack_words::<5>(bytes, out),
        6 => unpack_words::<6>(bytes, out),
        _ => unpack_bits(bytes, bits, out),
    }
}

fn unpack_words<const B: usize>(bytes: &[u8], out: &mut [u8]) {
    let mask = (1u64 << B) - 1;
    let whole = out.len() / 8 * 8;
    let (head, rest) = out.split_at_mut(whole);
    for (o, src) in head.chunks_exact_mut(8).zip(bytes.chunks_exact(B)) {
        let mut w = [0u8; 8];
        w[..B].copy_from_slice(src);
        let v = u64::from_le_bytes(w);
        for (k, c) in o.iter_mut().enumerate() {
            *c = ((v >> (k * B)) & mask) as u8;
        }
    }
    if !rest.is_empty() {
        unpack_bits(&bytes[whole * B / 8..], B as u32, rest);
    }
}

/// A row of 2-, 3-, 5- or 6-bit codes rewritten for the kernels: 2- and 3-bit codes as an MLX 4-bit row (code
/// `2j` in the low nibble of byte `j`, `2j+1` in the high; `out` is half as many bytes as codes), 5- and 6-bit
/// codes as a byte each. The number of codes is a multiple of 16 (groups are 32, 64 or 128 codes).
pub fn widen(bytes: &[u8], bits: u32, out: &mut [u8]) {
    match bits {
        2 => widen_words::<2, 4>(bytes, out),
        3 => widen_words::<3, 4>(bytes, out),
        5 => widen_words::<5, 8>(bytes, out),
        6 => widen_words::<6, 8>(bytes, out),
        _ => unreachable!("widen: {bits}-bit rows are read as they are"),
    }
}

/// Bytes of a widened row of `codes` codes of `bits` each (see [`widen`]).
pub fn widened_len(codes: usize, bits: u32) -> usize {
    if bits <= 4 { codes / 2 } else { codes }
}

/// [`widen`] one 64-bit word at a time: `64 / D` codes of `B` bits come in, each leaves in `D` bits.
fn widen_words<const B: u32, const D: u32>(bytes: &[u8], out: &mut [u8]) {
    let in_bytes = (64 / D * B / 8) as usize;
    for (src, dst) in bytes.chunks_exact(in_bytes).zip(out.chunks_exact_mut(8)) {
        let mut w = [0u8; 8];
        w[..in_bytes].copy_from_slice(src);
        dst.copy_from_slice(&spread::<B, D>(u64::from_le_bytes(w)).to_le_bytes());
    }
}

/// Moves `64 / D` packed `B`-bit fields of `v` to `D`-bit strides by halving: each step splits every run of
/// `m` codes in two and shifts the upper half left by `m/2 · (D − B)` bits.
#[inline(always)]
fn spread<const B: u32, const D: u32>(v: u64) -> u64 {
    let (mut x, mut m) = (v, 64 / D);
    while m > 1 {
        let h = m / 2;
        let field = (1u64 << (h * B)) - 1;
        let mut lo = 0u64;
        let mut at = 0;
        while at < 64 {
            lo |= field << at;
            at += m * D;
        }
        x = (x & lo) | ((x & (lo << (h * B))) << (h * (D - B)));
        m = h;
    }
    x
}

/// Bit-serial unpacking: the reference for [`unpack`] and its tail.
fn unpack_bits(bytes: &[u8], bits: u32, out: &mut [u8]) {
    let mask = (1u64 << bits) - 1;
    let (mut acc, mut n, mut i) = (0u64, 0u32, 0usize);
    for o in out.iter_mut() {
        while n < bits {
            acc |= (bytes[i] as u64) << n;
            i += 1;
            n += 8;
        }
        *o = (acc & mask) as u8;
        acc >>= bits;
        n -= bits;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn pack_unpack_roundtrip_every_width() {
        let mut seed = 7;
        for bits in crate::config::SUPPORTED_BITS {
            let codes: Vec<u8> = (0..256)
                .map(|_| (lcg(&mut seed) % (1 << bits)) as u8)
                .collect();
            let packed = pack(&codes, bits);
            assert_eq!(packed.len(), 256 * bits as usize / 8);
            let mut back = vec![0u8; 256];
            unpack(&packed, bits, &mut back);
            assert_eq!(back, codes, "bits {bits}");
            let mut serial = vec![0u8; 250];
            unpack_bits(&packed, bits, &mut serial);
            assert_eq!(serial, codes[..250], "bits {bits}");
        }
    }

    #[test]
    fn widened_rows_hold_the_codes() {
        let mut seed = 11;
        for bits in [2, 3, 5, 6] {
            let codes: Vec<u8> = (0..320)
                .map(|_| (lcg(&mut seed) % (1 << bits)) as u8)
                .collect();
            let mut out = vec![0u8; widened_len(codes.len(), bits)];
            widen(&pack(&codes, bits), bits, &mut out);
            let want = if bits <= 4 { pack(&codes, 4) } else { codes };
            assert_eq!(out, want, "bits {bits}");
        }
    }

    #[test]
    fn four_bit_layout_is_low_nibble_first() {
        // MLX: element k of a u32 word sits at bits 4k..4k+4.
        assert_eq!(
            pack(&[1, 2, 3, 4, 5, 6, 7, 8], 4),
            0x8765_4321u32.to_le_bytes()
        );
    }

    #[test]
    fn quantize_dequantize_error_is_within_half_a_step() {
        let mut seed = 3;
        let (rows, cols) = (3, 256);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| lcg(&mut seed) as f32 / u32::MAX as f32 - 0.5)
            .collect();
        for bits in crate::config::SUPPORTED_BITS {
            for group in crate::config::SUPPORTED_GROUPS {
                let m = AffineMatrix::quantize(&w, rows, cols, bits, group);
                let d = m.dequantize();
                for (gi, (a, b)) in w.chunks(group).zip(d.chunks(group)).enumerate() {
                    let (s, _) = m.scale_bias(gi / (cols / group), gi % (cols / group));
                    let err = a
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (x - y).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        err <= s * 0.5 + 1e-6,
                        "bits {bits} group {group}: {err} > {}",
                        s * 0.5
                    );
                }
            }
        }
    }

    /// Whole-matrix dequantization goes a block of rows at a time: with rows that do not fill the last block,
    /// every value is still `s · q + b` of its own row's codes and group.
    #[test]
    fn dequantize_in_row_blocks_matches_codes_scales_and_biases() {
        let mut seed = 5;
        let (rows, cols, group) = (37, 1024, 64);
        assert!(rows * cols > 2 * DEQUANT_BLOCK && !(rows * cols).is_multiple_of(DEQUANT_BLOCK));
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| lcg(&mut seed) as f32 / u32::MAX as f32 - 0.5)
            .collect();
        for bits in crate::config::SUPPORTED_BITS {
            let m = AffineMatrix::quantize(&w, rows, cols, bits, group);
            let got = m.dequantize();
            let mut codes = vec![0u8; cols];
            for r in 0..rows {
                let rb = m.row_bytes();
                unpack(&m.packed[r * rb..(r + 1) * rb], bits, &mut codes);
                for (c, &q) in codes.iter().enumerate() {
                    let (s, b) = m.scale_bias(r, c / group);
                    assert_eq!(
                        got[r * cols + c],
                        s * q as f32 + b,
                        "bits {bits} row {r} col {c}"
                    );
                }
            }
        }
    }
}
