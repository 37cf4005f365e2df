//! x86-64 kernels: AVX2 + FMA, and AVX-512 (F, BW, VL) with VNNI. Callers check the features at run time.
//! All take `group` 32, 64 or 128 (the loader refuses others) and slices whose lengths are a multiple of
//! `group` (codes: bytes, or half as many bytes for packed 4-bit rows). The AVX-512 4-bit kernels have a
//! 256-bit form for groups of 32 and a 512-bit form for 64 and 128 (one or two 64-code chunks per group).

use super::{Activations, Aligned, Dots, Out, Prepared, Q8, UNIT, Weight, rows};
use crate::quant::affine::{AffineMatrix, ScaleType};
use std::arch::x86_64::*;

/// AVX2 + FMA kernels (the `Dots` impls are only reached through the `target_feature` entry points).
struct Avx2;
/// AVX-512 F/BW/VL + VNNI kernels.
struct Avx512;

// SAFETY (all impls below): only called from the entry points, whose features include the kernels'.
impl Dots for Avx2 {
    #[inline(always)]
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot4_f32_rows_avx2([row], x, [scales], group)[0] }
    }
    #[inline(always)]
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot4_i8_xn_avx2(row, [xq], scales, [dx], group)[0] }
    }
    #[inline(always)]
    fn dot4_f32_xn<const N: usize>(
        row: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot4_f32_xn_avx2(row, x, scales, group) }
    }
    #[inline(always)]
    fn dot4_f32_rows4(
        rows: [&[u8]; 4],
        x: &[f32],
        scales: [&[f32]; 4],
        group: usize,
        _stream: bool,
    ) -> [f32; 4] {
        unsafe { dot4_f32_rows_avx2(rows, x, scales, group) }
    }
    #[inline(always)]
    fn dot4_i8_xn<const N: usize>(
        row: &[u8],
        xq: [Q8; N],
        scales: &[f32],
        dx: [&[f32]; N],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot4_i8_xn_avx2(row, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot_f32_xn_avx2(codes, [x], scales, group)[0] }
    }
    #[inline(always)]
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot_i8_avx2(codes, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_f32_xn<const N: usize>(
        codes: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot_f32_xn_avx2(codes, x, scales, group) }
    }
    #[inline(always)]
    fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        unsafe { dot_bf16_xn_avx2(row, [x])[0] }
    }
    #[inline(always)]
    fn dot_bf16_xn<const N: usize>(row: &[u8], x: [&[f32]; N]) -> [f32; N] {
        unsafe { dot_bf16_xn_avx2(row, x) }
    }
    #[inline(always)]
    fn widen(packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
        widen_x86(packed, bits, out)
    }
}

impl Dots for Avx512 {
    #[inline(always)]
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot4_f32_avx512(row, x, scales, group) }
    }
    #[inline(always)]
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot4_i8_vnni(row, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot_f32_avx512(codes, x, scales, group) }
    }
    #[inline(always)]
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot_i8_vnni(codes, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        unsafe { dot_bf16_rows_xn_avx512([row], [x])[0][0] }
    }
    #[inline(always)]
    fn dot_bf16_xn<const N: usize>(row: &[u8], x: [&[f32]; N]) -> [f32; N] {
        unsafe { dot_bf16_rows_xn_avx512([row], x)[0] }
    }
    #[inline(always)]
    fn dot_bf16_rows4_xn<const N: usize>(rows: [&[u8]; 4], x: [&[f32]; N]) -> [[f32; N]; 4] {
        unsafe { dot_bf16_rows_xn_avx512(rows, x) }
    }
    #[inline(always)]
    fn widen(packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
        if has_vbmi() {
            // SAFETY: checked just above.
            unsafe { widen_vbmi(packed, bits, out) }
        } else {
            widen_x86(packed, bits, out)
        }
    }
    #[inline(always)]
    fn dot4_i8_xn<const N: usize>(
        row: &[u8],
        xq: [Q8; N],
        scales: &[f32],
        dx: [&[f32]; N],
        group: usize,
    ) -> [f32; N] {
        debug_assert!(!xq[0].units, "unit-order activations take `rows_xn`");
        unsafe {
            match group {
                32 => dot4_i8_vnni_xn_g32(row, xq, scales, dx),
                64 => dot4_i8_xn_zmm::<1, N>(row, xq, scales, dx),
                _ => dot4_i8_xn_zmm::<2, N>(row, xq, scales, dx),
            }
        }
    }
    #[inline(always)]
    fn rows_xn(
        m: &AffineMatrix,
        px: &Prepared,
        out: &Out,
        rows: std::ops::Range<usize>,
        tokens: std::ops::Range<usize>,
    ) -> bool {
        if px.xq.is_empty() {
            // SAFETY: as below; f32 activations of 4-bit-order rows (`rows_xn` is asked for those only).
            return unsafe {
                match m.group {
                    64 => f32_rows_n::<1>(m, px, out, rows, tokens),
                    128 => f32_rows_n::<2>(m, px, out, rows, tokens),
                    _ => false,
                }
            };
        }
        if !px.units {
            return false;
        }
        // SAFETY: this set is only used where AVX-512 + VNNI exist; `px.units` means int8 activations of
        // 4-bit-order rows (2- and 3-bit ones widened to 4 bits) in unit order, columns a multiple of
        // [`UNIT`], groups of 64 or 128.
        unsafe {
            match m.group {
                64 => units_rows_n::<1>(m, px, out, rows, tokens),
                128 => units_rows_n::<2>(m, px, out, rows, tokens),
                _ => false,
            }
        }
    }
    #[inline(always)]
    fn f32_tiles(
        m: &AffineMatrix,
        px: &Prepared,
        out: &Out,
        rows: std::ops::Range<usize>,
    ) -> usize {
        if !px.xb.is_empty() {
            // SAFETY: `xb` is only prepared where AMX is available (`Isa::Amx`), for groups of 64 or 128.
            unsafe { super::amx::f32_rows(m, px, out, rows) };
            return px.tokens;
        }
        // SAFETY: this set is only used where AVX-512 exists; f32 activations of 4-bit-order rows.
        unsafe {
            match (m.group, px.tiled() > 0) {
                (64, true) => f32_tiles::<1>(m, px, out, rows),
                (128, true) => f32_tiles::<2>(m, px, out, rows),
                (64, false) => f32_dot_tiles::<1>(m, px, out, rows),
                (128, false) => f32_dot_tiles::<2>(m, px, out, rows),
                _ => return 0,
            }
        }
        if px.tiled() > 0 {
            px.tiled()
        } else {
            px.tokens
        }
    }
    #[inline(always)]
    fn int8_lanes(
        m: &AffineMatrix,
        px: &Prepared,
        out: &Out,
        rows: std::ops::Range<usize>,
    ) -> usize {
        // Rows of other widths reach the rows-in-lanes kernel only stored in lanes (`super::lanes_apply`).
        if m.bits != 4 {
            return 0;
        }
        // SAFETY: this set is only used where AVX-512 + VNNI exist; `xl` is prepared for int8 activations
        // (or f32 ones' slices) of 4-bit rows in groups of a multiple of 64.
        unsafe { int8_lanes(m, px, out, rows) };
        px.tokens
    }
    #[inline(always)]
    fn lanes_stored(
        m: &AffineMatrix,
        px: &Prepared,
        out: &Out,
        rows: std::ops::Range<usize>,
    ) -> bool {
        if px.xl.is_empty() || !rows.start.is_multiple_of(16) {
            return false;
        }
        // SAFETY: this set is only used where AVX-512 + VNNI exist; `xl` holds every token's int8 slices.
        unsafe { lanes_stored(m, px, None, out, rows) };
        true
    }
    #[inline(always)]
    fn dot4_f32_xn<const N: usize>(
        row: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        match group {
            32 => unsafe { dot4_f32_avx512_xn_g32(row, x, scales) },
            // Groups of 64 and 128 take `f32_rows` (`rows_xn`) for every block of tokens; this is not reached.
            _ => std::array::from_fn(|i| Self::dot4_f32(row, x[i], scales, group)),
        }
    }
    #[inline(always)]
    fn dot4_i8_rows4(
        rows: [&[u8]; 4],
        xq: Q8,
        scales: [&[f32]; 4],
        dx: &[f32],
        group: usize,
        stream: bool,
    ) -> [f32; 4] {
        unsafe {
            match group {
                32 => std::array::from_fn(|i| dot4_i8_vnni_g32(rows[i], xq, scales[i], dx)),
                _ if !xq.s.is_empty() => {
                    dot4_i8_rows4_any::<true>(rows, xq, scales, dx, group, stream)
                }
                _ => dot4_i8_rows4_any::<false>(rows, xq, scales, dx, group, stream),
            }
        }
    }
    #[inline(always)]
    fn dot4_f32_rows4(
        rows: [&[u8]; 4],
        x: &[f32],
        scales: [&[f32]; 4],
        group: usize,
        stream: bool,
    ) -> [f32; 4] {
        unsafe {
            match group {
                32 => std::array::from_fn(|i| dot4_f32_avx512_g32(rows[i], x, scales[i])),
                64 => dot4_f32_rows4_zmm::<1>(rows, x, scales, stream),
                _ => dot4_f32_rows4_zmm::<2>(rows, x, scales, stream),
            }
        }
    }
}

/// # Safety
/// Needs AVX2 + FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn run_rows_avx2(w: Weight, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    rows::<Avx2>(w, px, out, r0, r1)
}

/// # Safety
/// Needs AVX2 + FMA.
#[target_feature(enable = "avx2,fma")]
pub(super) unsafe fn prepare_avx2(
    x: &[f32],
    cols: usize,
    key: (usize, bool, Activations),
    units: bool,
) -> Prepared {
    Prepared::new(x, cols, key, units)
}

/// [`Prepared::xt`] from the permuted f32 activations `xf` (`[tokens, cols]`, both multiples of 16), sixteen
/// tokens by sixteen columns at a time.
///
/// # Safety
/// Needs AVX-512 F.
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn transpose_tokens(xf: &[f32], tokens: usize, cols: usize) -> Aligned<f32> {
    assert!(cols.is_multiple_of(16) && tokens.is_multiple_of(16) && xf.len() == tokens * cols);
    let mut xt = Aligned::<f32>::zeroed(xf.len());
    for t0 in (0..tokens).step_by(16) {
        // The token block these sixteen tokens are in (see `Prepared::xt_block`) and where in its rows.
        let b0 = t0 / super::XT_BLOCK * super::XT_BLOCK;
        let width = (tokens - b0).min(super::XT_BLOCK);
        let dst = xt[b0 * cols..][..width * cols].as_mut_ptr();
        for c0 in (0..cols).step_by(16) {
            // SAFETY: tokens `t0..t0 + 16` exist and `c0 + 16 <= cols`.
            let rows: [__m512; 16] = std::array::from_fn(|i| unsafe {
                _mm512_loadu_ps(xf.as_ptr().add((t0 + i) * cols + c0))
            });
            for (j, v) in transpose16(rows).into_iter().enumerate() {
                // SAFETY: column `c0 + j` of the block, its tokens `t0 - b0 .. + 16 <= width`.
                unsafe { _mm512_storeu_ps(dst.add((c0 + j) * width + t0 - b0), v) };
            }
        }
    }
    xt
}

/// The 16 × 16 transpose: element `j` of result `i` is element `i` of `r[j]`.
#[inline]
#[target_feature(enable = "avx512f")]
pub(super) fn transpose16(r: [__m512; 16]) -> [__m512; 16] {
    // Per 128-bit lane L: t[2i] = rows 2i, 2i+1 at columns 4L, 4L+1; t[2i+1] the same at 4L+2, 4L+3.
    let t: [__m512; 16] = std::array::from_fn(|k| {
        let (a, b) = (r[k & !1], r[k | 1]);
        if k % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // u[4i + j], lane L: rows 4i..4i+3 at column 4L + j.
    let u: [__m512; 16] = std::array::from_fn(|k| {
        let (i, j) = (k / 4, k % 4);
        let (x, y) = (
            _mm512_castps_pd(t[4 * i + j / 2]),
            _mm512_castps_pd(t[4 * i + j / 2 + 2]),
        );
        _mm512_castpd_ps(if j % 2 == 0 {
            _mm512_unpacklo_pd(x, y)
        } else {
            _mm512_unpackhi_pd(x, y)
        })
    });
    // Column 4L + j: lane L of u[j], u[4 + j], u[8 + j], u[12 + j].
    let mut out = [_mm512_setzero_ps(); 16];
    for j in 0..4 {
        let (a, b, c, d) = (u[j], u[4 + j], u[8 + j], u[12 + j]);
        let p = _mm512_shuffle_f32x4::<0b01_00_01_00>(a, b);
        let q = _mm512_shuffle_f32x4::<0b01_00_01_00>(c, d);
        let r = _mm512_shuffle_f32x4::<0b11_10_11_10>(a, b);
        let s = _mm512_shuffle_f32x4::<0b11_10_11_10>(c, d);
        out[j] = _mm512_shuffle_f32x4::<0b10_00_10_00>(p, q);
        out[4 + j] = _mm512_shuffle_f32x4::<0b11_01_11_01>(p, q);
        out[8 + j] = _mm512_shuffle_f32x4::<0b10_00_10_00>(r, s);
        out[12 + j] = _mm512_shuffle_f32x4::<0b11_01_11_01>(r, s);
    }
    out
}

/// Whether [`prepare_int8_avx512`] also writes each token's slices in nibble order ([`Prepared::xl`]).
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Laned {
    No,
    Also,
    /// Only there: for a matrix stored in lanes, whose kernel reads nothing else.
    Only,
}

impl Laned {
    /// For rows `stored` in lanes, or rows whose kernel builds its tile per call (`built`), which may leave
    /// tokens to the unit-order kernels.
    pub(super) fn of(stored: bool, built: bool) -> Laned {
        match (stored, built) {
            (true, _) => Laned::Only,
            (false, true) => Laned::Also,
            (false, false) => Laned::No,
        }
    }
}

/// `v` within ±127 where `on` (a vector of quotients about to be rounded to int8 codes).
#[inline]
#[target_feature(enable = "avx512f")]
fn clamp127(v: __m512, on: bool) -> __m512 {
    if on {
        _mm512_min_ps(
            _mm512_max_ps(v, _mm512_set1_ps(-127.0)),
            _mm512_set1_ps(127.0),
        )
    } else {
        v
    }
}

/// [`Prepared::new`] for int8 activations in groups of a multiple of 64: each 64-value chunk is permuted
/// (4-bit rows), quantized and stored as four 16-byte blocks, in [`super::transpose_units`] order when `units`
/// allows — the same values as the scalar preparation, without its intermediate copies. `exact`: the three
/// slices of f32 activations instead ([`Q8::s`]).
///
/// # Safety
/// Needs AVX-512 F/BW/VL.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
pub(super) unsafe fn prepare_int8_avx512(
    x: &[f32],
    cols: usize,
    group: usize,
    nibbles: bool,
    units: bool,
    exact: bool,
    lanes: Laned,
) -> Prepared {
    debug_assert!(group.is_multiple_of(64) && cols.is_multiple_of(group));
    let (n, tokens) = (x.len(), x.len() / cols);
    // Also every token's codes in nibble order, not in units order (`Prepared::xl`): its two or three slices.
    let laned = lanes != Laned::No && nibbles;
    // The slices in `xq`, `xr` and `xs`, unless only `xl` is read.
    let plain = !(laned && lanes == Laned::Only);
    let slices = if exact { 3 } else { 2 };
    let stride = super::xl_stride(cols);
    let mut xl = Aligned::<i8>::zeroed(if laned { slices * tokens * stride } else { 0 });
    let xlp = xl.as_mut_ptr();
    let units = units && nibbles && cols.is_multiple_of(UNIT);
    let groups = n / group;
    let np = if plain { n } else { 0 };
    let (mut xq, mut xr) = (Aligned::<i8>::zeroed(np), Aligned::<i8>::zeroed(np));
    let mut xs = Aligned::<i8>::zeroed(if exact { np } else { 0 });
    let (mut dx, mut xsum) = (Vec::with_capacity(groups), Vec::with_capacity(groups));
    // Steps: `q` in `coarse`, `r` in `coarse / ratio`, `s` (exact) in `coarse / ratio²`.
    let ratio = if exact {
        super::EXACT_RESIDUAL
    } else {
        super::RESIDUAL
    } as f32;
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
    let (q, r, s3) = (xq.as_mut_ptr(), xr.as_mut_ptr(), xs.as_mut_ptr());
    for (g, src) in x.chunks_exact(group).enumerate() {
        // The exact Σx in sixteen lanes, summed in order (as `lane_sum`), and max |x|.
        let (mut lanes, mut top) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for v in src.chunks_exact(16) {
            let v = unsafe { _mm512_loadu_ps(v.as_ptr()) };
            lanes = _mm512_add_ps(lanes, v);
            top = _mm512_max_ps(top, _mm512_abs_ps(v));
        }
        let mut l = [0f32; 16];
        unsafe { _mm512_storeu_ps(l.as_mut_ptr(), lanes) };
        xsum.push(super::lane_total(&l));
        let amax = _mm512_reduce_max_ps(top);
        let coarse = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        let fine = coarse / ratio;
        let finest = fine / ratio;
        dx.push(if exact { finest } else { fine });
        let (c, inv_c, inv_f) = (
            _mm512_set1_ps(coarse),
            _mm512_set1_ps(1.0 / coarse),
            _mm512_set1_ps(1.0 / fine),
        );
        let (f, inv_ff) = (_mm512_set1_ps(fine), _mm512_set1_ps(1.0 / finest));
        for (k, chunk) in src.chunks_exact(64).enumerate() {
            // Four loads written out: a `map` closure would not inherit `target_feature`.
            let v = unsafe {
                let p = chunk.as_ptr();
                [
                    _mm512_loadu_ps(p),
                    _mm512_loadu_ps(p.add(16)),
                    _mm512_loadu_ps(p.add(32)),
                    _mm512_loadu_ps(p.add(48)),
                ]
            };
            let blocks = if nibbles {
                [
                    _mm512_permutex2var_ps(v[0], even, v[1]),
                    _mm512_permutex2var_ps(v[2], even, v[3]),
                    _mm512_permutex2var_ps(v[0], odd, v[1]),
                    _mm512_permutex2var_ps(v[2], odd, v[3]),
                ]
            } else {
                v
            };
            let at = g * group + 64 * k;
            for (j, b) in blocks.into_iter().enumerate() {
                // f32 activations' slices are not clamped: `|b| <= max|x|` is at most 127 coarse steps (and a
                // few ulps, which round to 127), and each residual spans ±64 steps of the next slice
                // ([`super::EXACT_RESIDUAL`]). The int8 path's residual spans ±128 fine steps and is clamped.
                let hi = _mm512_cvtps_epi32(clamp127(_mm512_mul_ps(b, inv_c), !exact));
                // One rounding (the int8 path's two match the scalar preparation).
                let rest = if exact {
                    _mm512_fnmadd_ps(_mm512_cvtepi32_ps(hi), c, b)
                } else {
                    _mm512_sub_ps(b, _mm512_mul_ps(_mm512_cvtepi32_ps(hi), c))
                };
                let lo = _mm512_cvtps_epi32(clamp127(_mm512_mul_ps(rest, inv_f), !exact));
                // Block j of the chunk; in units order, block `at / 64 % 4` of chunk j of the unit.
                let to = if units {
                    at / UNIT * UNIT + 64 * j + 16 * (at / 64 % 4)
                } else {
                    at + 16 * j
                };
                let (hi8, lo8) = (_mm512_cvtsepi32_epi8(hi), _mm512_cvtsepi32_epi8(lo));
                if plain {
                    // SAFETY: `to + 16 <= n`.
                    unsafe {
                        _mm_storeu_si128(q.add(to) as *mut __m128i, hi8);
                        _mm_storeu_si128(r.add(to) as *mut __m128i, lo8);
                    }
                }
                // Token `t`'s slices in nibble order, each `stride` after the one before.
                let lane_at = slices * (at / cols) * stride + at % cols + 16 * j;
                if laned {
                    // SAFETY: `lane_at + stride + 16 <= slices · tokens · stride`.
                    unsafe {
                        _mm_storeu_si128(xlp.add(lane_at) as *mut __m128i, hi8);
                        _mm_storeu_si128(xlp.add(lane_at + stride) as *mut __m128i, lo8);
                    }
                }
                if exact {
                    let rest = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(lo), f, rest);
                    let least =
                        _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(rest, inv_ff)));
                    // SAFETY: as above; `lane_at + 2 · stride + 16 <= 3 · tokens · stride`.
                    unsafe {
                        if plain {
                            _mm_storeu_si128(s3.add(to) as *mut __m128i, least);
                        }
                        if laned {
                            _mm_storeu_si128(xlp.add(lane_at + 2 * stride) as *mut __m128i, least);
                        }
                    };
                }
            }
        }
    }
    Prepared {
        tokens,
        cols,
        group,
        xf: Aligned::zeroed(0),
        xq,
        xr,
        xs,
        units,
        dx,
        xsum,
        xt: Aligned::zeroed(0),
        xb: Aligned::zeroed(0),
        xl,
    }
}

/// # Safety
/// Needs AVX-512 F/BW/VL + VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn run_rows_avx512(w: Weight, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    rows::<Avx512>(w, px, out, r0, r1)
}

/// A 2- or 3-bit row widened to 4 bits (the f32 kernels' form) at the start of `out`; returns its length.
pub(super) fn widen_nibbles(packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
    Avx512::widen(packed, bits, out)
}

pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

pub fn has_avx512() -> bool {
    has_avx2()
        && is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("avx512vnni")
}

pub fn has_vbmi() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vbmi")
}

/// [`super::Dots::widen`] where AVX2 is the best widening there is: 2-, 3-, 5- and 6-bit rows with
/// [`widen_avx2`].
#[inline(always)]
fn widen_x86(packed: &[u8], bits: u32, out: &mut [u8]) -> usize {
    // SAFETY: both sets that call this have AVX2.
    match bits {
        2 | 3 => unsafe { widen_avx2::<4>(packed, bits, out) },
        5 | 6 => unsafe { widen_avx2::<8>(packed, bits, out) },
        _ => super::widen_into(packed, bits, out),
    }
}

/// [`crate::quant::affine::widen`] with AVX2, 32 bytes out per step: 2- and 3-bit rows to `D = 4` bits (64
/// codes a step, in 32-bit lanes), 5- and 6-bit ones to a byte per code (`D = 8`: 32 codes, in 64-bit lanes). Each lane takes
/// the `bits` bytes of its eight codes (`vpshufb`, each 128-bit half from its own load: masked to the half's
/// whole dwords, or 16 bytes for 5-bit rows, whose halves are 10), and three mask-and-shift steps move the
/// codes to their strides, as `affine::spread` does in 64-bit words (which does the tail, and 5-bit steps
/// whose second load would pass the row's end). Returns the bytes written. The row's bytes are fetched
/// [`PREFETCH`] ahead.
///
/// # Safety
/// Needs AVX2.
#[target_feature(enable = "avx2")]
unsafe fn widen_avx2<const D: usize>(bytes: &[u8], bits: u32, out: &mut [u8]) -> usize {
    debug_assert!(matches!((D, bits), (4, 2 | 3) | (8, 5 | 6)));
    let b = bits as usize;
    // Codes leave in `D` bits (a constant: divisions by it are shifts); a lane of `8·D` bits takes eight.
    let codes = bytes.len() * 8 / b;
    let len = codes * D / 8;
    assert!(
        out.len() >= len,
        "widen_avx2: {} bytes for {len}",
        out.len()
    );
    // A step's codes, and the bytes of each 128-bit half's.
    let (per_step, half) = (256 / D, 16 * b / D);
    // Halves of whole dwords load only those (a scalar tail of the last step's codes measured ~6 % slower
    // 2- and 3-bit decode); the others 16 bytes, in the steps whose upper half's load lies in the row.
    let whole = half.is_multiple_of(4);
    let load = _mm_setr_epi32(-1, -1, if half > 8 { -1 } else { 0 }, 0);
    let steps = if whole {
        codes / per_step
    } else {
        bytes
            .len()
            .checked_sub(half + 16)
            .map_or(0, |room| (room / (2 * half) + 1).min(codes / per_step))
    };
    // Per half: lane `j` takes bytes `b·j..b·j + b`, the rest zero.
    let order: [i8; 16] = std::array::from_fn(|o| {
        let (j, i) = (o / D, o % D);
        if i < b { (b * j + i) as i8 } else { -1 }
    });
    let order = unsafe { _mm256_broadcastsi128_si256(_mm_loadu_si128(order.as_ptr() as *const _)) };
    // Step `k` splits runs of `8 >> k` codes: the lower half stays (`field` bits at `lo`), the upper half
    // moves up by `(4 >> k)·(D − bits)` bits, within its lane (so 64-bit shifts serve 32-bit lanes too).
    let mut spread = [(
        _mm256_setzero_si256(),
        _mm256_setzero_si256(),
        _mm_setzero_si128(),
    ); 3];
    for (k, st) in spread.iter_mut().enumerate() {
        let (h, m) = (4 >> k, 8 >> k);
        let field = (1u64 << (h * b)) - 1;
        let lo = (0..64 / (m * D)).fold(0u64, |a, i| a | field << (m * D * i));
        *st = (
            _mm256_set1_epi64x(lo as i64),
            _mm256_set1_epi64x((lo << (h * b)) as i64),
            _mm_cvtsi32_si128((h * (D - b)) as i32),
        );
    }
    let p = bytes.as_ptr();
    for s in 0..steps {
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(s * 2 * half + PREFETCH) as *const i8);
            let at = p.add(s * 2 * half);
            let v = if whole {
                _mm256_set_m128i(
                    _mm_maskload_epi32(at.add(half) as *const i32, load),
                    _mm_maskload_epi32(at as *const i32, load),
                )
            } else {
                _mm256_set_m128i(
                    _mm_loadu_si128(at.add(half) as *const _),
                    _mm_loadu_si128(at as *const _),
                )
            };
            let mut x = _mm256_shuffle_epi8(v, order);
            for &(lo, hi, shift) in &spread {
                let up = _mm256_sll_epi64(_mm256_and_si256(x, hi), shift);
                x = _mm256_or_si256(_mm256_and_si256(x, lo), up);
            }
            _mm256_storeu_si256(out.as_mut_ptr().add(32 * s) as *mut __m256i, x);
        }
    }
    crate::quant::affine::widen(&bytes[steps * 2 * half..], bits, &mut out[steps * 32..len]);
    len
}

/// [`crate::quant::affine::widen`] with AVX-512 VBMI, 64 codes per step: `vpermb` gives each 64-bit lane the
/// bytes of its eight codes, `vpmultishiftqb` moves each code to its own byte. 2- and 3-bit codes are then
/// paired into nibbles (`even + 16·odd`). Returns the bytes written.
///
/// # Safety
/// Needs AVX-512 F/BW/VBMI.
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
pub unsafe fn widen_vbmi(bytes: &[u8], bits: u32, out: &mut [u8]) -> usize {
    let b = bits as usize;
    let codes = bytes.len() * 8 / b;
    // 64 codes in, as 32 bytes of nibbles or 64 of codes out.
    let in_step = 8 * b;
    let (out_step, len) = if b <= 4 { (32, codes / 2) } else { (64, codes) };
    assert!(
        out.len() >= len,
        "widen_vbmi: {} bytes for {len}",
        out.len()
    );
    let steps = codes / 64;
    let (idx, ctl) = vbmi_tables(bits);
    let (idx, ctl) = unsafe {
        (
            _mm512_loadu_si512(idx.as_ptr() as *const _),
            _mm512_loadu_si512(ctl.as_ptr() as *const _),
        )
    };
    let mask = _mm512_set1_epi8(((1u32 << bits) - 1) as i8);
    let pair = _mm512_set1_epi16(0x1001);
    let load: __mmask64 = (1u64 << in_step) - 1;
    for s in 0..steps {
        unsafe {
            // The packed rows come from memory, a row after another: fetched ahead, as the 4-bit kernels do.
            _mm_prefetch::<_MM_HINT_T0>(
                bytes.as_ptr().wrapping_add(s * in_step + PREFETCH) as *const i8
            );
            let src = _mm512_maskz_loadu_epi8(load, bytes.as_ptr().add(s * in_step) as *const i8);
            let codes = _mm512_and_si512(
                _mm512_multishift_epi64_epi8(ctl, _mm512_permutexvar_epi8(idx, src)),
                mask,
            );
            let dst = out.as_mut_ptr().add(s * out_step);
            if out_step == 32 {
                let nibbles = _mm512_cvtepi16_epi8(_mm512_maddubs_epi16(codes, pair));
                _mm256_storeu_si256(dst as *mut __m256i, nibbles);
            } else {
                _mm512_storeu_si512(dst as *mut _, codes);
            }
        }
    }
    crate::quant::affine::widen(
        &bytes[steps * in_step..],
        bits,
        &mut out[steps * out_step..len],
    );
    len
}

/// `vpermb` indices and `vpmultishiftqb` bit offsets that put the codes of a 64-code step a byte each, in
/// order.
fn vbmi_tables(bits: u32) -> &'static ([u8; 64], [u8; 64]) {
    const fn tables(b: usize) -> ([u8; 64], [u8; 64]) {
        let (mut idx, mut ctl) = ([0u8; 64], [0u8; 64]);
        let mut o = 0;
        while o < 64 {
            // Lane `w` holds the eight codes from `8w`.
            let (w, i) = (o / 8, o % 8);
            let start = 8 * w * b / 8;
            idx[o] = (start + i) as u8;
            ctl[o] = ((8 * w + i) * b - 8 * start) as u8;
            o += 1;
        }
        (idx, ctl)
    }
    static TABLES: [([u8; 64], [u8; 64]); 4] = [tables(2), tables(3), tables(5), tables(6)];
    match bits {
        2 => &TABLES[0],
        3 => &TABLES[1],
        5 => &TABLES[2],
        _ => &TABLES[3],
    }
}

/// Bytes ahead of the weight stream to prefetch: a couple of rows of a typical projection. The addresses are
/// formed with `wrapping_add`: past the last rows they leave the allocation, which a prefetch tolerates and
/// `add` must not.
const PREFETCH: usize = 4096;
/// Bytes ahead of a one-token pass's first row at which its rows' codes are fetched into L2 in address order
/// (see [`prefetch_pass`]).
const PASS_AHEAD: usize = 8192;
/// Columns per pass of the f32 several-token kernel over wide rows: six tokens' activations, 48 KB, fill L1
/// (7168 columns in one pass measured ~1.5x slower per code than 2048).
const F32_SPAN: usize = 2048;

/// Each register's lane sum. A loop, not `array::map`: its closure does not inherit `target_feature`, so it
/// was a call per register, with the registers passed through memory (12 % of a one-token f32 decode's samples).
#[inline]
#[target_feature(enable = "avx512f")]
fn hsums512<const N: usize>(acc: [__m512; N]) -> [f32; N] {
    let mut sums = [0f32; N];
    for (s, v) in sums.iter_mut().zip(acc) {
        *s = _mm512_reduce_add_ps(v);
    }
    sums
}

#[inline]
#[target_feature(enable = "avx2,fma")]
fn hsum256(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    _mm_cvtss_f32(s)
}

/// 32 bytes → (low nibbles, high nibbles), 32 codes each.
#[inline]
#[target_feature(enable = "avx2")]
fn split_nibbles(b: __m256i) -> (__m256i, __m256i) {
    let m = _mm256_set1_epi8(0x0f);
    (
        _mm256_and_si256(b, m),
        _mm256_and_si256(_mm256_srli_epi16(b, 4), m),
    )
}

/// 16 bytes of a 32-code chunk → one register [low nibbles | high nibbles].
#[inline]
#[target_feature(enable = "avx2")]
fn nibbles_of_16(b: __m128i) -> __m256i {
    let m = _mm_set1_epi8(0x0f);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m))
}

// ---- f32 activations ----

/// # Safety
/// Needs AVX-512F; see the module note on lengths.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn dot4_f32_avx512(packed: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    unsafe {
        match group {
            32 => dot4_f32_avx512_g32(packed, x, scales),
            64 => dot4_f32_zmm::<1>(packed, x, scales),
            _ => dot4_f32_zmm::<2>(packed, x, scales),
        }
    }
}

/// [`dot4_f32_avx512`] for groups of `64 · CHUNKS` codes. Each 16 packed bytes widen straight from memory
/// to 16 lanes; a lane's low nibble is an even code, its high nibble the next odd one, which land 32 apart
/// in the permuted activations. Two groups per step keep two accumulator chains.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot4_f32_zmm<const CHUNKS: usize>(packed: &[u8], x: &[f32], scales: &[f32]) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 2];
    let (p, xp) = (packed.as_ptr(), x.as_ptr());
    let group = 64 * CHUNKS;
    let lut = codes_lut();
    let one = |g: usize, acc: &mut __m512| unsafe {
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for k in 0..CHUNKS {
            let j = g * group + 64 * k;
            for h in 0..2 {
                let (lo, hi) = nibble_values16(p.add(j / 2 + 16 * h), lut);
                a0 = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp.add(j + 16 * h)), a0);
                a1 = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(j + 32 + 16 * h)), a1);
            }
        }
        *acc = _mm512_fmadd_ps(
            _mm512_add_ps(a0, a1),
            _mm512_set1_ps(*scales.get_unchecked(g)),
            *acc,
        );
    };
    two_chains(scales.len(), p, group / 2, &mut acc, one);
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// [`dot4_f32_avx512`] for groups of 32 (16 bytes of codes per group).
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot4_f32_avx512_g32(packed: &[u8], x: &[f32], scales: &[f32]) -> f32 {
    let mut acc = _mm512_setzero_ps();
    let (p, xp) = (packed.as_ptr(), x.as_ptr());
    let cvt = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    let m = _mm_set1_epi8(0x0f);
    for (g, &s) in scales.iter().enumerate() {
        let base = g * 32;
        let (a0, a1) = unsafe {
            let b = _mm_loadu_si128(p.add(base / 2) as *const __m128i);
            (
                _mm512_mul_ps(cvt(_mm_and_si128(b, m)), _mm512_loadu_ps(xp.add(base))),
                _mm512_mul_ps(
                    cvt(_mm_and_si128(_mm_srli_epi16(b, 4), m)),
                    _mm512_loadu_ps(xp.add(base + 16)),
                ),
            )
        };
        acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// Packed 4-bit rows × `N` tokens' permuted f32 activations: each eight codes are converted once for all
/// the tokens, and each token's sums are taken in the order one token alone takes them, so its result is the
/// same to the bit in a block of tokens or alone (prefill and decode agree).
///
/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_f32_xn_avx2<const N: usize>(
    packed: &[u8],
    x: [&[f32]; N],
    scales: &[f32],
    group: usize,
) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let p = packed.as_ptr();
    let xp: [*const f32; N] = std::array::from_fn(|t| x[t].as_ptr());
    // 32 codes in a register → per token four FMAs of 8 against its x[at..at + 32].
    let fma32 = |codes: __m256i, at: usize, a: &mut [__m256; N]| {
        let lo = _mm256_castsi256_si128(codes);
        let hi = _mm256_extracti128_si256(codes, 1);
        for (i, part) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
            for t in 0..N {
                // SAFETY: `at + 32` is within each token's row of activations.
                a[t] = _mm256_fmadd_ps(f, unsafe { _mm256_loadu_ps(xp[t].add(at + 8 * i)) }, a[t]);
            }
        }
    };
    for (g, &s) in scales.iter().enumerate() {
        let mut a = [_mm256_setzero_ps(); N];
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                fma32(
                    nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i)),
                    base,
                    &mut a,
                );
            } else {
                let mut j = base;
                while j < end {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(j / 2 + PREFETCH) as *const i8);
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    fma32(lo, j, &mut a);
                    fma32(hi, j + 32, &mut a);
                    j += 64;
                }
            }
        }
        for t in 0..N {
            acc[t] = _mm256_fmadd_ps(a[t], _mm256_set1_ps(s), acc[t]);
        }
    }
    acc.map(|a| hsum256(a))
}

/// `R` packed 4-bit rows × one token's permuted f32 activations, each row's sums in the order
/// [`dot4_f32_xn_avx2`] takes them (so a row's result is the same to the bit alone, beside others, or against
/// a block of tokens). Four rows (decode) give four independent chains of FMAs where one row alone waits on
/// each FMA's latency, and read the activations once for all.
///
/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths (every row holds `scales[r].len()` groups).
#[allow(clippy::needless_range_loop)] // `scales[r][g]`: group `g` of every row
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_f32_rows_avx2<const R: usize>(
    rows: [&[u8]; R],
    x: &[f32],
    scales: [&[f32]; R],
    group: usize,
) -> [f32; R] {
    let mut acc = [_mm256_setzero_ps(); R];
    let xp = x.as_ptr();
    // 32 codes of one row in a register → four FMAs of 8 against x[at..at + 32].
    let fma32 = |codes: __m256i, at: usize, a: &mut __m256| {
        let lo = _mm256_castsi256_si128(codes);
        let hi = _mm256_extracti128_si256(codes, 1);
        for (i, part) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
            // SAFETY: `at + 32` is within the row of activations.
            *a = _mm256_fmadd_ps(f, unsafe { _mm256_loadu_ps(xp.add(at + 8 * i)) }, *a);
        }
    };
    for g in 0..scales[0].len() {
        let mut a = [_mm256_setzero_ps(); R];
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                for r in 0..R {
                    let p = rows[r].as_ptr().add(base / 2);
                    fma32(
                        nibbles_of_16(_mm_loadu_si128(p as *const __m128i)),
                        base,
                        &mut a[r],
                    );
                }
            } else {
                let mut j = base;
                while j < end {
                    for r in 0..R {
                        let p = rows[r].as_ptr();
                        _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(j / 2 + PREFETCH) as *const i8);
                        let (lo, hi) =
                            split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                        fma32(lo, j, &mut a[r]);
                        fma32(hi, j + 32, &mut a[r]);
                    }
                    j += 64;
                }
            }
        }
        for r in 0..R {
            acc[r] = _mm256_fmadd_ps(a[r], _mm256_set1_ps(scales[r][g]), acc[r]);
        }
    }
    acc.map(|a| hsum256(a))
}

/// # Safety
/// Needs AVX-512F; see the module note on lengths.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn dot_f32_avx512(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let mut acc = _mm512_setzero_ps();
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut j = g * group;
        while j < (g + 1) * group {
            unsafe {
                let c = codes.as_ptr().add(j);
                _mm_prefetch::<_MM_HINT_T0>(c.wrapping_add(PREFETCH) as *const i8);
                let xp = x.as_ptr().add(j);
                let c0 =
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(c as *const __m128i)));
                let c1 = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(
                    c.add(16) as *const __m128i
                )));
                a0 = _mm512_fmadd_ps(c0, _mm512_loadu_ps(xp), a0);
                a1 = _mm512_fmadd_ps(c1, _mm512_loadu_ps(xp.add(16)), a1);
            }
            j += 32;
        }
        acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// Byte codes × `N` tokens' f32 activations: each sixteen codes are converted once for all the tokens, and
/// each token's sums are taken in the order one token alone takes them (its result is the same to the bit).
///
/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_xn_avx2<const N: usize>(
    codes: &[u8],
    x: [&[f32]; N],
    scales: &[f32],
    group: usize,
) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = ([_mm256_setzero_ps(); N], [_mm256_setzero_ps(); N]);
        let mut j = g * group;
        while j < (g + 1) * group {
            unsafe {
                let c = codes.as_ptr().add(j);
                let f0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(c as *const _)));
                let f1 =
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(c.add(8) as *const _)));
                for t in 0..N {
                    let xp = x[t].as_ptr().add(j);
                    a0[t] = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xp), a0[t]);
                    a1[t] = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xp.add(8)), a1[t]);
                }
            }
            j += 16;
        }
        for t in 0..N {
            acc[t] = _mm256_fmadd_ps(_mm256_add_ps(a0[t], a1[t]), _mm256_set1_ps(s), acc[t]);
        }
    }
    acc.map(|a| hsum256(a))
}

// ---- int8 activations ----

// The kernels multiply by `RESIDUAL` with a shift.
const _: () = assert!(super::RESIDUAL == 1 << 8 && super::EXACT_RESIDUAL == 1 << 7);

/// `RESIDUAL · q + r` per i32 lane.
#[inline]
#[target_feature(enable = "avx2")]
fn combine(q: __m256i, r: __m256i) -> __m256i {
    _mm256_add_epi32(_mm256_slli_epi32(q, 8), r)
}

/// 32 packed bytes (a 64-code chunk) → one register: the low nibbles (even codes) in bytes 0..32, the high
/// nibbles (odd codes) in bytes 32..64, the order of the permuted activations.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn nibbles_64(p: *const u8) -> __m512i {
    let b = _mm512_broadcast_i64x4(unsafe { _mm256_loadu_si256(p as *const __m256i) });
    _mm512_and_si512(
        _mm512_mask_srli_epi16(b, 0xffff_0000, b, 4),
        _mm512_set1_epi8(0x0f),
    )
}

/// The 64-code chunk at code `j` of a 4-bit row in [`nibbles_64`]'s order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn chunk64(p: *const u8, j: usize) -> __m512i {
    unsafe { nibbles_64(p.add(j / 2)) }
}

/// Runs `one(g, chain)` over `groups` groups on two accumulator chains (even groups on the first, odd ones on
/// the second, so consecutive groups do not wait on each other), prefetching `PREFETCH` bytes ahead of
/// `p + g · group_bytes` every two groups.
#[inline(always)]
fn two_chains<A>(
    groups: usize,
    p: *const u8,
    group_bytes: usize,
    acc: &mut [A; 2],
    mut one: impl FnMut(usize, &mut A),
) {
    let mut g = 0;
    while g + 2 <= groups {
        // SAFETY: SSE is part of x86-64; a prefetch never faults, whatever the address.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(g * group_bytes + PREFETCH) as *const i8)
        };
        let [a0, a1] = acc;
        one(g, a0);
        one(g + 1, a1);
        g += 2;
    }
    if g < groups {
        one(g, &mut acc[0]);
    }
}

/// Sixteen packed 4-bit bytes at `p` → `table[q]` for their low nibbles (even codes) and for their high nibbles
/// (odd codes), sixteen lanes each: the bytes widen straight from memory to lanes, and `vpermps` reads only
/// a lane's low four bits, so one permutation per half does the mask and the lookup.
///
/// # Safety
/// `p` must be readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn nibble_values16(p: *const u8, table: __m512) -> (__m512, __m512) {
    let v = _mm512_cvtepu8_epi32(unsafe { _mm_loadu_si128(p as *const __m128i) });
    (
        _mm512_permutexvar_ps(v, table),
        _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table),
    )
}

/// The floats 0..16: `vpermps` with it turns the low four bits of each lane into that code's value, one
/// instruction for the mask and the conversion.
#[inline]
#[target_feature(enable = "avx512f")]
fn codes_lut() -> __m512 {
    _mm512_setr_ps(
        0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
    )
}

/// # Safety
/// Needs AVX-512 F/BW/VL + VNNI; see the module note on lengths.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn dot4_i8_vnni(packed: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    unsafe {
        match group {
            32 => dot4_i8_vnni_g32(packed, xq, scales, dx),
            _ if !xq.s.is_empty() => dot4_i8_zmm_any::<true>(packed, xq, scales, dx, group),
            _ => dot4_i8_zmm_any::<false>(packed, xq, scales, dx, group),
        }
    }
}

/// [`dot4_i8_zmm`] for groups of 64 or 128; `EXACT`: the three slices ([`Q8::s`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_zmm_any<const EXACT: bool>(
    packed: &[u8],
    xq: Q8,
    scales: &[f32],
    dx: &[f32],
    group: usize,
) -> f32 {
    unsafe {
        match group {
            64 => dot4_i8_zmm::<1, EXACT>(packed, xq, scales, dx),
            _ => dot4_i8_zmm::<2, EXACT>(packed, xq, scales, dx),
        }
    }
}

/// [`dot4_i8_vnni`] for groups of `64 · CHUNKS` codes: per group, `RESIDUAL·Σq + Σr` in one register (the
/// coarse sums, shifted, then the residual ones); two groups per step keep two accumulator chains.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_zmm<const CHUNKS: usize, const EXACT: bool>(
    packed: &[u8],
    xq: Q8,
    scales: &[f32],
    dx: &[f32],
) -> f32 {
    let mut acc = [_mm512_setzero_ps(); 2];
    let (p, q, r, s) = (packed.as_ptr(), xq.q.as_ptr(), xq.r.as_ptr(), xq.s.as_ptr());
    let slices: &[*const i8] = if EXACT { &[r, s] } else { &[r] };
    let group = 64 * CHUNKS;
    let one = |g: usize, acc: &mut __m512| unsafe {
        let mut c = [_mm512_setzero_si512(); CHUNKS];
        let mut i = _mm512_setzero_si512();
        for (k, ck) in c.iter_mut().enumerate() {
            let j = g * group + 64 * k;
            *ck = chunk64(p, j);
            i = _mm512_dpbusd_epi32(i, *ck, _mm512_loadu_si512(q.add(j) as *const _));
        }
        for &x in slices {
            i = slices_shift::<EXACT>(i);
            for (k, &ck) in c.iter().enumerate() {
                let j = g * group + 64 * k;
                i = _mm512_dpbusd_epi32(i, ck, _mm512_loadu_si512(x.add(j) as *const _));
            }
        }
        let sd = _mm512_set1_ps(*scales.get_unchecked(g) * *dx.get_unchecked(g));
        *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sd, *acc);
    };
    two_chains(scales.len().min(dx.len()), p, group / 2, &mut acc, one);
    _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]))
}

/// [`dot4_i8_vnni`] for groups of 32 (16 bytes, one 256-bit register of codes per group).
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_vnni_g32(packed: &[u8], xq: Q8, scales: &[f32], dx: &[f32]) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (p, q, r) = (packed.as_ptr(), xq.q.as_ptr(), xq.r.as_ptr());
    let ld = |a: *const i8| unsafe { _mm256_loadu_si256(a as *const __m256i) };
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let base = g * 32;
        let (iq, ir) = unsafe {
            let c = nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i));
            (
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, ld(q.add(base))),
                _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, ld(r.add(base))),
            )
        };
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(combine(iq, ir)),
            _mm256_set1_ps(s * d),
            acc,
        );
    }
    hsum256(acc)
}

/// Packed 4-bit rows × `N` tokens' permuted int8 activations: each 64 codes are unpacked once for all the
/// tokens; each token's sums are those of one token alone (integer, then per group in the same order), so its
/// result is the same to the bit in a block of tokens or alone.
///
/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_i8_xn_avx2<const N: usize>(
    packed: &[u8],
    xq: [Q8; N],
    scales: &[f32],
    dx: [&[f32]; N],
    group: usize,
) -> [f32; N] {
    let ones = _mm256_set1_epi16(1);
    let mut acc = [_mm256_setzero_ps(); N];
    let p = packed.as_ptr();
    let ld = |a: *const i8| unsafe { _mm256_loadu_si256(a as *const __m256i) };
    // Codes ≤ 15: pairs of u8 × i8 products fit i16 without saturation.
    let dot = |c: __m256i, x: *const i8| _mm256_madd_epi16(_mm256_maddubs_epi16(c, ld(x)), ones);
    for (g, &s) in scales.iter().enumerate() {
        let (mut iq, mut ir) = ([_mm256_setzero_si256(); N], [_mm256_setzero_si256(); N]);
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                let c = nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i));
                for t in 0..N {
                    iq[t] = _mm256_add_epi32(iq[t], dot(c, xq[t].q.as_ptr().add(base)));
                    ir[t] = _mm256_add_epi32(ir[t], dot(c, xq[t].r.as_ptr().add(base)));
                }
            } else {
                let mut j = base;
                while j < end {
                    _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(j / 2 + PREFETCH) as *const i8);
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    for t in 0..N {
                        let (q, r) = (xq[t].q.as_ptr().add(j), xq[t].r.as_ptr().add(j));
                        iq[t] = _mm256_add_epi32(
                            iq[t],
                            _mm256_add_epi32(dot(lo, q), dot(hi, q.add(32))),
                        );
                        ir[t] = _mm256_add_epi32(
                            ir[t],
                            _mm256_add_epi32(dot(lo, r), dot(hi, r.add(32))),
                        );
                    }
                    j += 64;
                }
            }
        }
        for t in 0..N {
            acc[t] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(combine(iq[t], ir[t])),
                _mm256_set1_ps(s * dx[t][g]),
                acc[t],
            );
        }
    }
    acc.map(|a| hsum256(a))
}

/// # Safety
/// Needs AVX-512 VL + VNNI; see the module note on lengths.
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn dot_i8_vnni(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let ld = |a: *const i8| unsafe { _mm256_loadu_si256(a as *const __m256i) };
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let (mut iq, mut ir) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut j = g * group;
        while j < (g + 1) * group {
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(codes.as_ptr().wrapping_add(j + PREFETCH) as *const i8);
                let c = _mm256_loadu_si256(codes.as_ptr().add(j) as *const __m256i);
                iq = _mm256_dpbusd_epi32(iq, c, ld(xq.q.as_ptr().add(j)));
                ir = _mm256_dpbusd_epi32(ir, c, ld(xq.r.as_ptr().add(j)));
            }
            j += 32;
        }
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(combine(iq, ir)),
            _mm256_set1_ps(s * d),
            acc,
        );
    }
    hsum256(acc)
}

/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths. Codes may reach 255 (8-bit), where `maddubs` could
/// saturate, so both sides are widened to i16 first.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_i8_avx2(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let wide = |a: *const i8| unsafe { _mm256_cvtepi8_epi16(_mm_loadu_si128(a as *const __m128i)) };
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let (mut iq, mut ir) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut j = g * group;
        while j < (g + 1) * group {
            unsafe {
                let c =
                    _mm256_cvtepu8_epi16(_mm_loadu_si128(codes.as_ptr().add(j) as *const __m128i));
                iq = _mm256_add_epi32(iq, _mm256_madd_epi16(c, wide(xq.q.as_ptr().add(j))));
                ir = _mm256_add_epi32(ir, _mm256_madd_epi16(c, wide(xq.r.as_ptr().add(j))));
            }
            j += 16;
        }
        acc = _mm256_fmadd_ps(
            _mm256_cvtepi32_ps(combine(iq, ir)),
            _mm256_set1_ps(s * d),
            acc,
        );
    }
    hsum256(acc)
}

/// [`Dots::dot4_i8_x4`] for groups of 32.
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_vnni_xn_g32<const N: usize>(
    packed: &[u8],
    xq: [Q8; N],
    scales: &[f32],
    dx: [&[f32]; N],
) -> [f32; N] {
    let mut acc = [_mm256_setzero_ps(); N];
    let p = packed.as_ptr();
    let ld =
        |a: &[i8], at: usize| unsafe { _mm256_loadu_si256(a.as_ptr().add(at) as *const __m256i) };
    for (g, &s) in scales.iter().enumerate() {
        let base = g * 32;
        let c = nibbles_of_16(unsafe { _mm_loadu_si128(p.add(base / 2) as *const __m128i) });
        for k in 0..N {
            let iq = _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, ld(xq[k].q, base));
            let ir = _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, ld(xq[k].r, base));
            acc[k] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(combine(iq, ir)),
                _mm256_set1_ps(s * dx[k][g]),
                acc[k],
            );
        }
    }
    let mut sums = [0f32; N];
    for (s, v) in sums.iter_mut().zip(acc) {
        *s = hsum256(v);
    }
    sums
}

// ---- four tokens per pass, groups of 64 or 128 ----

/// [`dot4_i8_zmm`] for `N` tokens: each 64-code chunk of the row is unpacked once for all of them.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_xn_zmm<const CHUNKS: usize, const N: usize>(
    row: &[u8],
    xq: [Q8; N],
    scales: &[f32],
    dx: [&[f32]; N],
) -> [f32; N] {
    let mut acc = [_mm512_setzero_ps(); N];
    let p = row.as_ptr();
    let q = xq.map(|x| x.q.as_ptr());
    let r = xq.map(|x| x.r.as_ptr());
    let group = 64 * CHUNKS;
    for (g, &s) in scales.iter().enumerate() {
        if (g * group / 2).is_multiple_of(64) {
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(g * group / 2 + PREFETCH) as *const i8);
        }
        let mut c = [_mm512_setzero_si512(); CHUNKS];
        for (k, ck) in c.iter_mut().enumerate() {
            *ck = unsafe { chunk64(p, g * group + 64 * k) };
        }
        for t in 0..N {
            // `RESIDUAL·Σq + Σr` in one register: the coarse sums, shifted, then the residual ones.
            let mut i = _mm512_setzero_si512();
            for (k, &ck) in c.iter().enumerate() {
                let j = g * group + 64 * k;
                i = _mm512_dpbusd_epi32(i, ck, unsafe {
                    _mm512_loadu_si512(q[t].add(j) as *const _)
                });
            }
            i = _mm512_slli_epi32(i, 8);
            for (k, &ck) in c.iter().enumerate() {
                let j = g * group + 64 * k;
                i = _mm512_dpbusd_epi32(i, ck, unsafe {
                    _mm512_loadu_si512(r[t].add(j) as *const _)
                });
            }
            let sd = _mm512_set1_ps(s * unsafe { *dx[t].get_unchecked(g) });
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), sd, acc[t]);
        }
    }
    hsums512(acc)
}

/// The four 64-code chunks of unit `u` of a 4-bit row in [`super::transpose_units`] order: register `j`
/// holds block `j` (16 codes) of each chunk.
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn unit_blocks(p: *const u8, u: usize) -> [__m512i; 4] {
    // A chunk's 32 bytes: its low nibbles are blocks 0 (first 16 bytes) and 1, its high nibbles 2 and 3.
    // SAFETY: the caller's unit `u` lies within the row.
    let (a, b) = unsafe {
        (
            _mm512_loadu_si512(p.add(UNIT / 2 * u) as *const _),
            _mm512_loadu_si512(p.add(UNIT / 2 * u + 64) as *const _),
        )
    };
    let first = _mm512_shuffle_i64x2::<0x88>(a, b);
    let second = _mm512_shuffle_i64x2::<0xdd>(a, b);
    let m = _mm512_set1_epi8(0x0f);
    [
        _mm512_and_si512(first, m),
        _mm512_and_si512(second, m),
        _mm512_and_si512(_mm512_srli_epi16(first, 4), m),
        _mm512_and_si512(_mm512_srli_epi16(second, 4), m),
    ]
}

/// One row as the row kernels read it: the checkpoint's bytes (prefetched ahead), the codes in the kernels'
/// form, and the row's raw scales and biases.
#[derive(Clone, Copy)]
struct KernelRow<'a> {
    packed: &'a [u8],
    codes: *const u8,
    scales: *const u8,
    biases: *const u8,
}

/// The rows of a 4-bit-order matrix for the row kernels: 2- and 3-bit rows widened to 4 bits into one
/// buffer ([`Dots::widen`]).
struct RowReader<'a> {
    m: &'a AffineMatrix,
    widened: Vec<u8>,
    /// Bytes per row of codes and of scales (or biases): computed once, as a one-token pass of two rows
    /// asks for its rows every ~16 units of work.
    row_bytes: usize,
    scale_bytes: usize,
}

impl<'a> RowReader<'a> {
    fn new(m: &'a AffineMatrix) -> RowReader<'a> {
        let widened = if m.bits == 4 {
            Vec::new()
        } else {
            vec![0u8; m.cols]
        };
        RowReader {
            m,
            widened,
            row_bytes: m.row_bytes(),
            scale_bytes: m.groups_per_row() * m.scale_type.size(),
        }
    }

    #[inline(always)]
    fn row(&mut self, r: usize) -> KernelRow<'a> {
        self.row_cols(r, 0..self.m.cols)
    }

    /// Row `r` with only columns `cols` widened (a span of `f32_rows`, whose widened codes are 4-bit: they
    /// land at byte `cols.start / 2`, where the kernel reads them).
    #[inline(always)]
    fn row_cols(&mut self, r: usize, cols: std::ops::Range<usize>) -> KernelRow<'a> {
        let m = self.m;
        let (rb, at) = (self.row_bytes, r * self.scale_bytes);
        let packed = &m.packed[r * rb..(r + 1) * rb];
        let codes = if m.bits == 4 {
            packed.as_ptr()
        } else {
            let bits = m.bits as usize;
            let part = &packed[cols.start * bits / 8..cols.end * bits / 8];
            let out = &mut self.widened[cols.start / 2..];
            Avx512::widen(part, m.bits, out);
            self.widened.as_ptr()
        };
        KernelRow {
            packed,
            codes,
            scales: m.scales[at..].as_ptr(),
            biases: m.biases[at..].as_ptr(),
        }
    }
}

/// The lanes of sixteen that exist when `left` remain: groups of a row, or rows of a block.
#[inline(always)]
fn group_mask(left: usize) -> __mmask16 {
    if left >= 16 { 0xffff } else { (1 << left) - 1 }
}

/// Sixteen scales or biases of a row from group `g0` (`m` masks the groups that exist) as f32.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn scales16(raw: *const u8, st: ScaleType, g0: usize, m: __mmask16) -> __m512 {
    unsafe {
        match st {
            ScaleType::Bf16 => {
                let h = _mm256_maskz_loadu_epi16(m, raw.add(2 * g0) as *const _);
                _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
            }
            ScaleType::F16 => {
                _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, raw.add(2 * g0) as *const _))
            }
            ScaleType::F32 => _mm512_maskz_loadu_ps(m, raw.add(4 * g0) as *const f32),
        }
    }
}

/// [`units_rows`] for a block of 1 to 8 tokens; false for other counts.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn units_rows_n<const CHUNKS: usize>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) -> bool {
    if px.xs.is_empty() {
        unsafe { units_rows_by_count::<CHUNKS, false>(m, px, out, rows, tokens) }
    } else {
        unsafe { units_rows_by_count::<CHUNKS, true>(m, px, out, rows, tokens) }
    }
}

/// [`units_rows_n`] with the two slices of int8 activations or (`EXACT`) the three of f32 ones.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn units_rows_by_count<const CHUNKS: usize, const EXACT: bool>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) -> bool {
    let t0 = tokens.start;
    unsafe {
        match tokens.len() {
            1 => units_rows::<CHUNKS, 1, EXACT>(m, px, out, rows, t0),
            2 => units_rows::<CHUNKS, 2, EXACT>(m, px, out, rows, t0),
            3 => units_rows::<CHUNKS, 3, EXACT>(m, px, out, rows, t0),
            4 => units_rows::<CHUNKS, 4, EXACT>(m, px, out, rows, t0),
            5 => units_rows::<CHUNKS, 5, EXACT>(m, px, out, rows, t0),
            6 => units_rows::<CHUNKS, 6, EXACT>(m, px, out, rows, t0),
            7 => units_rows::<CHUNKS, 7, EXACT>(m, px, out, rows, t0),
            8 => units_rows::<CHUNKS, 8, EXACT>(m, px, out, rows, t0),
            _ => return false,
        }
    }
    true
}

/// Int8 tokens `t0..t0 + N` in [`super::transpose_units`] order against rows `rows` (4-bit, or 2/3-bit
/// widened to 4 bits row by row), groups of `64 · CHUNKS`, two rows per pass (see [`units_pass`]).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn units_rows<const CHUNKS: usize, const N: usize, const EXACT: bool>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
    t0: usize,
) {
    let x = UnitTokens::<N> {
        q: std::array::from_fn(|t| px.xq_of(t0 + t).q.as_ptr()),
        r: std::array::from_fn(|t| px.xq_of(t0 + t).r.as_ptr()),
        s: std::array::from_fn(|t| px.xq_of(t0 + t).s.as_ptr()),
        dx: std::array::from_fn(|t| px.dx_of(t0 + t).as_ptr()),
        xsum: std::array::from_fn(|t| px.xsum_of(t0 + t).as_ptr()),
    };
    let mut readers = [RowReader::new(m), RowReader::new(m)];
    let mut r = rows.start;
    while r + 2 <= rows.end {
        unsafe { units_pass::<CHUNKS, N, EXACT, 2>(m, &x, out, [r, r + 1], &mut readers, t0) };
        r += 2;
    }
    if r < rows.end {
        unsafe { units_pass::<CHUNKS, N, EXACT, 1>(m, &x, out, [r], &mut readers, t0) };
    }
}

/// A block of int8 tokens as [`units_pass`] reads them: coarse and residual codes (and the third slice of
/// f32 activations, [`Q8::s`]; dangling on the int8 path), steps and group sums.
struct UnitTokens<const N: usize> {
    q: [*const i8; N],
    r: [*const i8; N],
    s: [*const i8; N],
    dx: [*const f32; N],
    xsum: [*const f32; N],
}

/// `R` rows against the block's `N` tokens. Per unit of four chunks, token and row, eight `vpdpbusd` leave
/// each chunk's sums in four lanes, and one conversion, one permutation (each lane's `s·dx`) and one
/// multiply-add finish them; each activation load serves the `R` rows (loads, not multiplies, bound the
/// loop). Scales and biases are converted in registers as they are read; the sums are stored directly.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
#[allow(clippy::needless_range_loop)] // `w[k][j]`: a row's block `j` meets the token's block `j`
unsafe fn units_pass<const CHUNKS: usize, const N: usize, const EXACT: bool, const R: usize>(
    m: &AffineMatrix,
    x: &UnitTokens<N>,
    out: &Out,
    rows: [usize; R],
    readers: &mut [RowReader],
    t0: usize,
) {
    let gpr = m.groups_per_row();
    // Lane l of a unit's sums belongs to its chunk l / 4, i.e. group (l / 4) / CHUNKS of the unit's first.
    let first: [i32; 16] = std::array::from_fn(|l| (l / 4 / CHUNKS) as i32);
    let first = unsafe { _mm512_loadu_si512(first.as_ptr() as *const _) };
    let step = _mm512_set1_epi32((4 / CHUNKS) as i32);
    let unit_packed = UNIT * m.bits as usize / 8;
    // A loop, not `array::from_fn`: its closure was a call per pass (7 % of a decode's samples).
    let mut kr = [readers[0].row(rows[0]); R];
    for k in 1..R {
        kr[k] = readers[k].row(rows[k]);
    }
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut sd = [[_mm512_setzero_ps(); N]; R];
    let mut idx = first;
    for u in 0..gpr * CHUNKS / 4 {
        let g0 = u * 4 / CHUNKS;
        if g0.is_multiple_of(16) {
            let mask = group_mask(gpr - g0);
            for (k, row) in kr.iter().enumerate() {
                let sv = unsafe { scales16(row.scales, m.scale_type, g0, mask) };
                let bv = unsafe { scales16(row.biases, m.scale_type, g0, mask) };
                for t in 0..N {
                    let d = unsafe { _mm512_maskz_loadu_ps(mask, x.dx[t].add(g0)) };
                    sd[k][t] = _mm512_mul_ps(sv, d);
                    // The bias term of these groups, `bias · Σx`, joins the token's lanes.
                    let xs = unsafe { _mm512_maskz_loadu_ps(mask, x.xsum[t].add(g0)) };
                    acc[k][t] = _mm512_fmadd_ps(bv, xs, acc[k][t]);
                }
            }
            idx = first;
        }
        // Ahead in the checkpoint's row stream (a widened row is already in L1); for 4-bit rows, the matrix's
        // own one after another, also the pass's bytes further ahead into L2 in address order (as the
        // one-token passes of `dot4_i8_rows4_zmm`).
        for (k, row) in kr.iter().enumerate() {
            for line in (0..unit_packed).step_by(64) {
                _mm_prefetch::<_MM_HINT_T0>(
                    row.packed
                        .as_ptr()
                        .wrapping_add(u * unit_packed + line + PREFETCH)
                        as *const i8,
                );
                if m.bits == 4 {
                    prefetch_pass(
                        kr[0].packed.as_ptr(),
                        ((u * R + k) * unit_packed + line) / 64,
                    );
                }
            }
        }
        // A loop, not `array::from_fn`: a closure would not inherit `target_feature`, and `unit_blocks`
        // would become a call (3-bit prefill measured ~1.4x slower).
        let mut w = [[_mm512_setzero_si512(); 4]; R];
        for (k, row) in kr.iter().enumerate() {
            w[k] = unsafe { unit_blocks(row.codes, u) };
        }
        for t in 0..N {
            // `RESIDUAL·Σq + Σr` per lane (`EXACT`: `(EXACT_RESIDUAL·Σq + Σr)·EXACT_RESIDUAL + Σs`; a lane
            // sums 16 products of at most 15·127, so `EXACT` stays below 16·15·127·(128² + 128 + 1) < 2³¹).
            // Each slice sums in its own registers: one chain of all the slices' `vpdpbusd` was bound by their
            // latency (768×2048, two threads, 2 and 8 tokens: 8–15 % slower).
            let slices = if EXACT { 3 } else { 2 };
            let from = [x.q[t], x.r[t], x.s[t]];
            let mut part = [[_mm512_setzero_si512(); R]; 3];
            for (p, sums) in from.iter().zip(&mut part).take(slices) {
                for j in 0..4 {
                    let a = unsafe { _mm512_loadu_si512(p.add(UNIT * u + 64 * j) as *const _) };
                    for k in 0..R {
                        sums[k] = _mm512_dpbusd_epi32(sums[k], w[k][j], a);
                    }
                }
            }
            let mut i = part[0];
            for sums in &part[1..slices] {
                for k in 0..R {
                    i[k] = _mm512_add_epi32(slices_shift::<EXACT>(i[k]), sums[k]);
                }
            }
            for k in 0..R {
                let lane_sd = _mm512_permutexvar_ps(idx, sd[k][t]);
                acc[k][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[k]), lane_sd, acc[k][t]);
            }
        }
        idx = _mm512_add_epi32(idx, step);
    }
    // All the block's sums in one transposing tree (`R · N` is at most sixteen), token-major.
    let mut v = [_mm512_setzero_ps(); 16];
    for (k, row_acc) in acc.iter().enumerate() {
        for (t, a) in row_acc.iter().enumerate() {
            v[t * R + k] = *a;
        }
    }
    let mut sums = [0f32; 16];
    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), lane_sums16(&v)) };
    for t in 0..N {
        for (k, &r) in rows.iter().enumerate() {
            super::store(out, m.rows, r, t0 + t, sums[t * R + k]);
        }
    }
}

/// int8 tokens, or f32 ones as three int8 slices ([`Prepared::xl`]), against 4-bit rows `rows` in the MLX
/// layout, sixteen rows per register: each block of sixteen rows is unpacked once into a tile in the form the
/// 4-bit matrices are stored in at load (per pair of 4-code words, the sixteen rows' two words in nibbles),
/// with its scales and biases per group, and [`lanes_pass`] takes it as it takes those.
/// No shuffles, permutations or horizontal sums in the loop, and each output register is sixteen consecutive
/// outputs of a token.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn int8_lanes(m: &AffineMatrix, px: &Prepared, out: &Out, rows: std::ops::Range<usize>) {
    debug_assert_eq!(
        m.bits, 4,
        "2- and 3-bit rows reach `lanes_pass` stored in lanes, not through this tile"
    );
    let (cols, gpr, rb) = (m.cols, m.groups_per_row(), m.row_bytes());
    // The per-thread tile ([`take_tile`], every byte written before it is read), as bytes: the block in the
    // stored-lanes form (`super::lanes_codes`: per pair of words, 64 bytes; `8 · cols`), then its sixteen rows
    // a byte per code (`16 · cols`, on a 64-byte boundary as `cols` is a multiple of 64).
    let (mut buf, mut sums) = take_tile(6 * cols);
    // SAFETY: `buf` holds at least `6 · cols` f32, `24 · cols` bytes, and outlives both views.
    let (tile, codes) = unsafe {
        std::slice::from_raw_parts_mut(buf.as_mut_ptr() as *mut u8, 24 * cols)
            .split_at_mut(8 * cols)
    };
    // The rows' scales and biases as read, then `[group, 16]`: the sixteen rows' values of each group.
    sums.resize(4 * 16 * gpr, 0.0);
    let (sc, rest) = sums.split_at_mut(16 * gpr);
    let (bi, rest) = rest.split_at_mut(16 * gpr);
    let (sv, bv) = rest.split_at_mut(16 * gpr);
    let mut r = rows.start;
    while r < rows.end {
        let n = (rows.end - r).min(16);
        m.rows_scales(r..r + n, &mut sc[..n * gpr], &mut bi[..n * gpr]);
        for g in 0..gpr {
            for k in 0..16 {
                let (s, b) = if k < n {
                    (sc[k * gpr + g], bi[k * gpr + g])
                } else {
                    (0.0, 0.0)
                };
                sv[16 * g + k] = s;
                bv[16 * g + k] = b;
            }
        }
        for k in 0..16 {
            let dst = &mut codes[k * cols..(k + 1) * cols];
            if k < n {
                unsafe { unpack_nibbles(&m.packed[(r + k) * rb..(r + k + 1) * rb], dst) };
            } else {
                dst.fill(0);
            }
        }
        // Sixteen words of the sixteen rows at a time, one 16 × 16 transpose; each pair of words into one
        // vector, the second in the high nibbles (codes are at most 15).
        for c in 0..cols / 64 {
            let mut v = [_mm512_setzero_ps(); 16];
            for (k, v) in v.iter_mut().enumerate() {
                // SAFETY: bytes `64c..64c + 64` of row `k` of `codes`.
                *v =
                    unsafe { _mm512_loadu_ps(codes.as_ptr().add(k * cols + 64 * c) as *const f32) };
            }
            let w = transpose16(v);
            for i in 0..8 {
                let (lo, hi) = (
                    _mm512_castps_si512(w[2 * i]),
                    _mm512_castps_si512(w[2 * i + 1]),
                );
                let pair = _mm512_or_si512(lo, _mm512_slli_epi16(hi, 4));
                // SAFETY: pair `8c + i < cols / 8` of the tile.
                unsafe {
                    _mm512_storeu_si512(tile.as_mut_ptr().add(64 * (8 * c + i)) as *mut _, pair)
                };
            }
        }
        let l = LaneRows {
            codes: tile.as_ptr(),
            scales: sv.as_ptr() as *const u8,
            biases: bv.as_ptr() as *const u8,
            st: ScaleType::F32,
            bits: 4,
            stream: false,
            cols,
            group: m.group,
            rows: m.rows,
            r0: r,
            mask: group_mask(n),
        };
        unsafe { lanes_block(&l, px, None, out) };
        r += n;
    }
    TILE.with(|c| c.set((Some(buf), sums)));
}

/// Tokens (int8, or f32 as three int8 slices) against rows `rows` (from a block's first) of a matrix stored in
/// lanes ([`super::lanes_codes`]): [`int8_lanes`] without the tile to build, each pair of a block's 4-code
/// words unpacked in registers ([`PairCodes`]). `pick`: the call's tokens are `px`'s tokens `pick` (each
/// below `px.tokens`). Panics on 3-bit rows without VBMI.
///
/// # Safety
/// Needs AVX-512 F/BW/VL + VNNI; `px` holds every token's slices in nibble order ([`Prepared::xl`]), `rows`
/// starts at a whole block of sixteen, and `out` holds the call's tokens × `m.rows` outputs.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn lanes_stored(
    m: &AffineMatrix,
    px: &Prepared,
    pick: Option<&[u32]>,
    out: &Out,
    rows: std::ops::Range<usize>,
) {
    let cols = m.cols;
    assert!(
        !matches!(m.bits, 3 | 5 | 6) || has_vbmi(),
        "{}-bit rows stored in lanes need AVX-512 VBMI",
        m.bits
    );
    let block_bytes = 2 * m.bits as usize * cols;
    let block_scales = 16 * m.groups_per_row() * m.scale_type.size();
    let mut r = rows.start;
    while r < rows.end {
        let (b, n) = (r / 16, (rows.end - r).min(16));
        let l = LaneRows {
            codes: m.packed[b * block_bytes..(b + 1) * block_bytes].as_ptr(),
            scales: m.scales[b * block_scales..(b + 1) * block_scales].as_ptr(),
            biases: m.biases[b * block_scales..(b + 1) * block_scales].as_ptr(),
            st: m.scale_type,
            bits: m.bits,
            stream: true,
            cols,
            group: m.group,
            rows: m.rows,
            r0: r,
            mask: group_mask(n),
        };
        unsafe { lanes_block(&l, px, pick, out) };
        r += n;
    }
}

/// A block of sixteen rows as [`lanes_pass`] reads it: stored so at load ([`lanes_stored`]) or built per
/// call ([`int8_lanes`]).
struct LaneRows {
    /// `[cols / 8, 16 · bits]`: per pair of words, the sixteen rows' eight codes ([`super::lanes_codes`]).
    codes: *const u8,
    /// `[group, 16]` in `st`: the sixteen rows' scales and biases of each group (zero past the last row).
    scales: *const u8,
    biases: *const u8,
    st: ScaleType,
    /// 2 to 6 or 8 (3, 5 and 6 with VBMI only).
    bits: u32,
    /// The codes stream from memory (prefetched ahead), not from a tile in cache.
    stream: bool,
    cols: usize,
    group: usize,
    rows: usize,
    r0: usize,
    mask: __mmask16,
}

/// The block of rows `l` against every token (`pick`: the call's token `t` is `px`'s token `pick[t]`), in
/// balanced blocks of up to eight int8 tokens or six f32 ones (whose three slices' sums take three registers
/// a token).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn lanes_block(l: &LaneRows, px: &Prepared, pick: Option<&[u32]>, out: &Out) {
    // f32 activations carry a third slice, int8 ones none.
    let exact = px.xl_slices() == 3;
    let tokens = pick.map_or(px.tokens, <[u32]>::len);
    let blocks = tokens.div_ceil(if exact { 6 } else { 8 });
    for k in 0..blocks {
        let (t0, t1) = (tokens * k / blocks, tokens * (k + 1) / blocks);
        let (at, n) = (Picked { pick, t0 }, t1 - t0);
        // SAFETY: 3-, 5- and 6-bit rows reach here through `lanes_stored`, which checks VBMI.
        unsafe {
            match (exact, l.bits) {
                (true, 4) => lanes_tokens::<true, 4>(l, px, out, at, n),
                (false, 4) => lanes_tokens::<false, 4>(l, px, out, at, n),
                (true, 2) => lanes_tokens::<true, 2>(l, px, out, at, n),
                (false, 2) => lanes_tokens::<false, 2>(l, px, out, at, n),
                (true, 8) => lanes_tokens::<true, 8>(l, px, out, at, n),
                (false, 8) => lanes_tokens::<false, 8>(l, px, out, at, n),
                (true, 3) => lanes_tokens_vbmi::<true, 3>(l, px, out, at, n),
                (false, 3) => lanes_tokens_vbmi::<false, 3>(l, px, out, at, n),
                (true, 5) => lanes_tokens_vbmi::<true, 5>(l, px, out, at, n),
                (false, 5) => lanes_tokens_vbmi::<false, 5>(l, px, out, at, n),
                (true, _) => lanes_tokens_vbmi::<true, 6>(l, px, out, at, n),
                (false, _) => lanes_tokens_vbmi::<false, 6>(l, px, out, at, n),
            }
        }
    }
}

/// A block of a call's tokens from its `t0`: `px`'s tokens `pick[t0..]`, or `t0..` where none are picked.
#[derive(Clone, Copy)]
struct Picked<'a> {
    pick: Option<&'a [u32]>,
    t0: usize,
}

impl Picked<'_> {
    /// The preparation's token for the block's token `t`.
    #[inline(always)]
    fn source(&self, t: usize) -> usize {
        match self.pick {
            Some(p) => p[self.t0 + t] as usize,
            None => self.t0 + t,
        }
    }
}

/// [`lanes_pass`] for the `n` tokens of block `at`, 2-, 4- or 8-bit rows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn lanes_tokens<const EXACT: bool, const BITS: u32>(
    l: &LaneRows,
    px: &Prepared,
    out: &Out,
    at: Picked,
    n: usize,
) {
    unsafe { lanes_tokens_of::<EXACT, BITS>(l, px, out, at, n) }
}

/// [`lanes_tokens`] for 3-, 5- and 6-bit rows, whose words [`PairCodes`] unpacks with VBMI.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx2,fma")]
unsafe fn lanes_tokens_vbmi<const EXACT: bool, const BITS: u32>(
    l: &LaneRows,
    px: &Prepared,
    out: &Out,
    at: Picked,
    n: usize,
) {
    debug_assert!(has_vbmi());
    unsafe { lanes_tokens_of::<EXACT, BITS>(l, px, out, at, n) }
}

#[inline(always)]
unsafe fn lanes_tokens_of<const EXACT: bool, const BITS: u32>(
    l: &LaneRows,
    px: &Prepared,
    out: &Out,
    at: Picked,
    n: usize,
) {
    unsafe {
        match n {
            8 => lanes_pass::<8, EXACT, 1, BITS>(l, px, out, at),
            7 => lanes_pass::<7, EXACT, 1, BITS>(l, px, out, at),
            6 => lanes_pass::<6, EXACT, 1, BITS>(l, px, out, at),
            5 => lanes_pass::<5, EXACT, 1, BITS>(l, px, out, at),
            4 => lanes_pass::<4, EXACT, 1, BITS>(l, px, out, at),
            3 => lanes_pass::<3, EXACT, 1, BITS>(l, px, out, at),
            2 => lanes_pass::<2, EXACT, 1, BITS>(l, px, out, at),
            _ => lanes_pass::<1, EXACT, 2, BITS>(l, px, out, at),
        }
    }
}

/// How [`lanes_pass`] unpacks a pair of 4-code words of sixteen `BITS`-bit rows stored in lanes
/// ([`super::lanes_codes`]) into the two words' codes, a byte each, row `k`'s in bytes `4k..4k + 4`: 4-bit,
/// one load, one AND, one shift and one AND; 2-bit, the same from the pair's half of 64 bytes (one shift
/// more for the second half); 8-bit, two loads; 3-bit, a masked load of the pair's 48 bytes, one `vpermb`
/// that gives each row its own 32-bit lane, and per word one `vpmultishiftqb` and one AND; 5- and 6-bit, per
/// word a masked load of its `8·BITS` bytes, one `vpermb`, one `vpmultishiftqb` and one AND.
struct PairCodes<const BITS: u32> {
    idx: __m512i,
    ctl: [__m512i; 2],
    mask: __m512i,
}

/// [`PairCodes`]' `vpermb` and `vpmultishiftqb` tables for `bits` (3, 5 or 6): byte `o` of the permuted
/// vector is byte `j = o % 4` of row `k = o / 4`'s lane, whose value starts at bit `32·(k % 2)` of its
/// 64-bit lane. 3 bits: a pair's row is bytes `3k..3k + 3` and its code `i` at bit `3i`; 5 and 6 bits: a
/// word's row starts at bit `4·bits·k` and its code `j` `bits·j` after that.
const fn unpack_tables(bits: usize) -> [[u8; 64]; 3] {
    let mut t = [[0u8; 64]; 3];
    let mut o = 0;
    while o < 64 {
        let (k, j) = (o / 4, o % 4);
        let lane = 32 * (k % 2);
        if bits == 3 {
            t[0][o] = (3 * k + j) as u8;
            t[1][o] = (lane + 3 * j) as u8;
            t[2][o] = (lane + 3 * (4 + j)) as u8;
        } else {
            t[0][o] = (4 * bits * k / 8 + j) as u8;
            t[1][o] = (lane + 4 * bits * k % 8 + bits * j) as u8;
        }
        o += 1;
    }
    t
}

impl<const BITS: u32> PairCodes<BITS> {
    const TABLES: [[u8; 64]; 3] = unpack_tables(BITS as usize);

    /// # Safety
    /// Needs AVX-512 F.
    #[inline(always)]
    unsafe fn new() -> Self {
        // Only 3-, 5- and 6-bit words read the tables.
        let load = |i: usize| unsafe {
            if matches!(BITS, 3 | 5 | 6) {
                _mm512_loadu_si512(Self::TABLES[i].as_ptr() as *const _)
            } else {
                _mm512_setzero_si512()
            }
        };
        PairCodes {
            idx: load(0),
            ctl: [load(1), load(2)],
            mask: unsafe { _mm512_set1_epi8(((1u32 << BITS) - 1) as i8) },
        }
    }

    /// The two words of pair `p` of the block of codes at `codes`; `odd`: `p` is odd.
    ///
    /// # Safety
    /// Needs AVX-512 F/BW, and VBMI for 3, 5 and 6 bits; pair `p` is in the block.
    #[inline(always)]
    unsafe fn words(&self, codes: *const u8, p: usize, odd: bool) -> [__m512i; 2] {
        unsafe {
            match BITS {
                4 => {
                    let v = _mm512_loadu_si512(codes.add(64 * p) as *const _);
                    [
                        _mm512_and_si512(v, self.mask),
                        _mm512_and_si512(_mm512_srli_epi16(v, 4), self.mask),
                    ]
                }
                2 => {
                    let v = _mm512_loadu_si512(codes.add(64 * (p / 2)) as *const _);
                    let v = if odd { _mm512_srli_epi16(v, 4) } else { v };
                    [
                        _mm512_and_si512(v, self.mask),
                        _mm512_and_si512(_mm512_srli_epi16(v, 2), self.mask),
                    ]
                }
                8 => [
                    _mm512_loadu_si512(codes.add(128 * p) as *const _),
                    _mm512_loadu_si512(codes.add(128 * p + 64) as *const _),
                ],
                3 => {
                    let v = _mm512_maskz_loadu_epi8(!0 >> 16, codes.add(48 * p) as *const i8);
                    let v = _mm512_permutexvar_epi8(self.idx, v);
                    [
                        _mm512_and_si512(_mm512_multishift_epi64_epi8(self.ctl[0], v), self.mask),
                        _mm512_and_si512(_mm512_multishift_epi64_epi8(self.ctl[1], v), self.mask),
                    ]
                }
                _ => {
                    // (A loop, not a closure: closures do not inherit `target_feature`.)
                    let mut w = [_mm512_setzero_si512(); 2];
                    for (h, w) in w.iter_mut().enumerate() {
                        let at = codes.add(8 * BITS as usize * (2 * p + h));
                        let v = _mm512_maskz_loadu_epi8(!0 >> (64 - 8 * BITS), at as *const i8);
                        let v = _mm512_permutexvar_epi8(self.idx, v);
                        *w = _mm512_and_si512(
                            _mm512_multishift_epi64_epi8(self.ctl[0], v),
                            self.mask,
                        );
                    }
                    w
                }
            }
        }
    }
}

/// The block of rows `l` against the `T` tokens of block `at`: per pair of words its two words unpacked
/// ([`PairCodes`]); per word and token one `vpdpbusd` takes the token's four coarse codes as a
/// broadcast memory operand, another its residual ones (`EXACT`, f32 activations: a third its finest ones,
/// [`super::Q8::s`]). The sums are converted once per group and token (`EXACT`, or codes over 15: once per
/// 64 codes, below which a lane of `(128·Σq + Σr)·128 + Σs` stays under 64·15·127·(128² + 128 + 1) < 2³¹ for
/// 4-bit codes, and `Σq` and `128·Σr + Σs` apart under 64·255·127·129 for wider ones), scaled by the rows'
/// scales and the token's step, and the bias term joins them once per group. `H` sets of sums take the
/// words in turn: one token's two or three chains of `vpdpbusd` are otherwise bound by its latency.
///
/// # Safety
/// As [`lanes_stored`]'s, and the callers' target features ([`PairCodes::words`]).
#[inline(always)]
unsafe fn lanes_pass<const T: usize, const EXACT: bool, const H: usize, const BITS: u32>(
    l: &LaneRows,
    px: &Prepared,
    out: &Out,
    at: Picked,
) {
    // SAFETY: as the callers' (their target features; the block's pairs, scales and tokens in bounds).
    unsafe {
        let (pairs, gpr) = (l.group / 8, l.cols / l.group);
        let slices = if EXACT { 3 } else { 2 };
        // Token `t`'s coarse codes as 4-code words; its finer slices follow, each `xl_stride / 4` words on.
        let stride = super::xl_stride(l.cols);
        let src: [usize; T] = std::array::from_fn(|t| at.source(t));
        let x: [*const i32; T] =
            std::array::from_fn(|t| px.xl[slices * src[t] * stride..].as_ptr() as *const i32);
        let rw = stride / 4;
        // Each token's steps and sums per group.
        let dx: [&[f32]; T] = std::array::from_fn(|t| px.dx_of(src[t]));
        let xsum: [&[f32]; T] = std::array::from_fn(|t| px.xsum_of(src[t]));
        // Integer sums over at most 64 codes where they could otherwise pass 2³¹ (f32 slices; int8 ones of
        // wide codes in large groups).
        let span = if EXACT || BITS > 4 { 8 } else { pairs };
        let codes = PairCodes::<BITS>::new();
        let mut acc = [_mm512_setzero_ps(); T];
        for g in 0..gpr {
            // Group `g` of the block's sixteen rows.
            let s = scales16(l.scales, l.st, 16 * g, 0xffff);
            for p0 in (g * pairs..(g + 1) * pairs).step_by(span) {
                let mut sq = [[_mm512_setzero_si512(); T]; H];
                let (mut sr, mut ss) = (sq, sq);
                // Pairs in twos (spans are even): whether a pair is its two's second is then known where
                // the unrolled loop unpacks it (2-bit pairs share 64 bytes).
                for two in (p0..p0 + span).step_by(2) {
                    for (p, odd) in [(two, false), (two + 1, true)] {
                        let at = l.codes.wrapping_add(16 * BITS as usize * p);
                        if l.stream {
                            // The block's bytes ahead into L1, and further on (the next blocks) into L2: a
                            // line for each 64 bytes of the pair (two for wide codes).
                            for b in (0..16 * BITS as usize).step_by(64) {
                                let at = at.wrapping_add(b);
                                _mm_prefetch::<_MM_HINT_T0>(at.wrapping_add(PREFETCH) as *const i8);
                                _mm_prefetch::<_MM_HINT_T1>(
                                    at.wrapping_add(PASS_AHEAD) as *const i8
                                );
                            }
                        }
                        // Pair `p < cols / 8` of the block.
                        let words = codes.words(l.codes, p, odd);
                        for (h, c) in words.iter().enumerate() {
                            let (w, k) = (2 * p + h, h % H);
                            for t in 0..T {
                                // Word `w < cols / 4` of each of token `t0 + t`'s slices.
                                let (q, r) = (*x[t].add(w), *x[t].add(rw + w));
                                sq[k][t] = _mm512_dpbusd_epi32(sq[k][t], *c, _mm512_set1_epi32(q));
                                sr[k][t] = _mm512_dpbusd_epi32(sr[k][t], *c, _mm512_set1_epi32(r));
                                if EXACT {
                                    let f = *x[t].add(2 * rw + w);
                                    ss[k][t] =
                                        _mm512_dpbusd_epi32(ss[k][t], *c, _mm512_set1_epi32(f));
                                }
                            }
                        }
                    }
                }
                // The second set's sums into the first (a loop, not a closure: see `units_pass`).
                for k in 1..H {
                    for t in 0..T {
                        sq[0][t] = _mm512_add_epi32(sq[0][t], sq[k][t]);
                        sr[0][t] = _mm512_add_epi32(sr[0][t], sr[k][t]);
                        ss[0][t] = _mm512_add_epi32(ss[0][t], ss[k][t]);
                    }
                }
                let (sq, sr, ss) = (sq[0], sr[0], ss[0]);
                for t in 0..T {
                    let v = if EXACT && BITS > 4 {
                        // Codes over 15: the three slices folded could pass 2³¹ (64·63·127·(128² + 128 + 1)
                        // at 6 bits), so the coarse sum converts on its own and joins in one FMA.
                        let fine = _mm512_add_epi32(slices_shift::<EXACT>(sr[t]), ss[t]);
                        let step = (super::EXACT_RESIDUAL * super::EXACT_RESIDUAL) as f32;
                        _mm512_fmadd_ps(
                            _mm512_cvtepi32_ps(sq[t]),
                            _mm512_set1_ps(step),
                            _mm512_cvtepi32_ps(fine),
                        )
                    } else {
                        let mut i = _mm512_add_epi32(slices_shift::<EXACT>(sq[t]), sr[t]);
                        if EXACT {
                            i = _mm512_add_epi32(slices_shift::<EXACT>(i), ss[t]);
                        }
                        _mm512_cvtepi32_ps(i)
                    };
                    let v = _mm512_mul_ps(v, s);
                    acc[t] = _mm512_fmadd_ps(v, _mm512_set1_ps(dx[t][g]), acc[t]);
                }
            }
            let b = scales16(l.biases, l.st, 16 * g, 0xffff);
            for (t, a) in acc.iter_mut().enumerate() {
                *a = _mm512_fmadd_ps(b, _mm512_set1_ps(xsum[t][g]), *a);
            }
        }
        for (t, a) in acc.iter().enumerate() {
            let i = (at.t0 + t) * l.rows + l.r0;
            debug_assert!(i + l.mask.count_ones() as usize <= out.len);
            // Outputs `(t0 + t, r0..r0 + n)` are in bounds, and these rows belong to this task alone.
            _mm512_mask_storeu_ps(out.ptr.add(i), l.mask, *a);
        }
    }
}

/// A packed 4-bit row to a byte per code in the order the int8 activations are prepared in (per 64 codes,
/// the 32 low nibbles, then the 32 high ones).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn unpack_nibbles(packed: &[u8], out: &mut [u8]) {
    assert!(packed.len().is_multiple_of(32) && out.len() >= 2 * packed.len());
    let m = _mm256_set1_epi8(0x0f);
    for (i, c) in packed.chunks_exact(32).enumerate() {
        let v = unsafe { _mm256_loadu_si256(c.as_ptr() as *const _) };
        let (lo, hi) = (
            _mm256_and_si256(v, m),
            _mm256_and_si256(_mm256_srli_epi16(v, 4), m),
        );
        // SAFETY: `64 · i + 64 <= 2 · packed.len() <= out.len()`.
        unsafe {
            _mm256_storeu_si256(out.as_mut_ptr().add(64 * i) as *mut _, lo);
            _mm256_storeu_si256(out.as_mut_ptr().add(64 * i + 32) as *mut _, hi);
        }
    }
}

/// Element `i` of the result: the sum of the sixteen lanes of `v[i]`. A transposing tree of 45 instructions
/// instead of sixteen reductions of eight; every vector's lanes are added in the same order wherever it sits
/// in `v`, so a row's result does not depend on the rows and tokens beside it.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn lane_sums16(v: &[__m512; 16]) -> __m512 {
    // Pairs (a, b): per 128-bit lane [a0+a2, b0+b2, a1+a3, b1+b3].
    let mut p = [_mm512_setzero_ps(); 8];
    for (i, p) in p.iter_mut().enumerate() {
        let (a, b) = (v[2 * i], v[2 * i + 1]);
        *p = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    // Quads (a, b, c, d): per 128-bit lane each vector's sum over that lane.
    let mut q = [_mm512_setzero_ps(); 4];
    for (i, q) in q.iter_mut().enumerate() {
        let (x, y) = (_mm512_castps_pd(p[2 * i]), _mm512_castps_pd(p[2 * i + 1]));
        *q = _mm512_add_ps(
            _mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
            _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)),
        );
    }
    // The four 128-bit lanes of each quad: lanes 0 + 1 and 2 + 3, then those two, quad m in lane m.
    let (u01, u23) = (lane_pairs(q[0], q[1]), lane_pairs(q[2], q[3]));
    lane_pairs(u01, u23)
}

/// `[x0 + x1, x2 + x3, y0 + y1, y2 + y3]` over 128-bit lanes.
#[inline]
#[target_feature(enable = "avx512f")]
fn lane_pairs(x: __m512, y: __m512) -> __m512 {
    _mm512_add_ps(
        _mm512_shuffle_f32x4::<0b10_00_10_00>(x, y),
        _mm512_shuffle_f32x4::<0b11_01_11_01>(x, y),
    )
}

/// Sixteen floats on a 64-byte boundary (one vector's store).
#[repr(align(64))]
struct Aligned16([f32; 16]);

/// [`f32_rows`] for a block of 2 to 8 tokens (see `affine_rows`); false for other counts.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn f32_rows_n<const CHUNKS: usize>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
    tokens: std::ops::Range<usize>,
) -> bool {
    let t0 = tokens.start;
    unsafe {
        match tokens.len() {
            2 => f32_rows::<CHUNKS, 2>(m, px, out, rows, t0),
            3 => f32_rows::<CHUNKS, 3>(m, px, out, rows, t0),
            4 => f32_rows::<CHUNKS, 4>(m, px, out, rows, t0),
            5 => f32_rows::<CHUNKS, 5>(m, px, out, rows, t0),
            6 => f32_rows::<CHUNKS, 6>(m, px, out, rows, t0),
            7 => f32_rows::<CHUNKS, 7>(m, px, out, rows, t0),
            8 => f32_rows::<CHUNKS, 8>(m, px, out, rows, t0),
            _ => return false,
        }
    }
    true
}

/// f32 tokens `t0..t0 + N` (permuted to the nibble order) against rows `rows` (4-bit, or 2/3-bit widened to
/// 4 bits row by row), groups of `64 · CHUNKS`. Each 16 codes become their `s·q` (the dequantized weight less
/// its bias) with one permutation of the group's sixteen `s·q` values, then meet every token with one FMA; the bias
/// term `bias · Σx` joins the lanes with one FMA per sixteen groups, and the sums are stored directly.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn f32_rows<const CHUNKS: usize, const N: usize>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
    t0: usize,
) {
    let gpr = m.groups_per_row();
    let mut reader = RowReader::new(m);
    let x: [*const f32; N] = std::array::from_fn(|t| px.xf_of(t0 + t).as_ptr());
    let xsum: [*const f32; N] = std::array::from_fn(|t| px.xsum_of(t0 + t).as_ptr());
    let lut = codes_lut();
    let group = 64 * CHUNKS;
    // Wide rows go in spans of `F32_SPAN` columns (whole blocks of sixteen groups), each across all the
    // task's rows: the block's activations for a span stay in L1.
    let span = (F32_SPAN / group).next_multiple_of(16);
    let ahead = if gpr > span { m.row_bytes() } else { PREFETCH };
    for g0 in (0..gpr).step_by(span) {
        for row in rows.clone() {
            let KernelRow {
                packed,
                codes: p,
                scales: sr,
                biases: br,
            } = reader.row_cols(row, g0 * group..(g0 + span).min(gpr) * group);
            // Two accumulators per token (low and high nibbles) keep 2·N FMA chains in flight.
            let mut a = [_mm512_setzero_ps(); N];
            let mut b = [_mm512_setzero_ps(); N];
            // The block's scales as f32 in memory: each group's broadcast is then a load, not a permutation
            // (shuffles compete with the unpacking below for one port).
            let mut s16 = Aligned16([0.0; 16]);
            let end = (g0 + span).min(gpr);
            // Blocks of sixteen groups: their scales and bias term first, then a loop over the groups with no
            // branches in it (a branch per group cost ~6 % in a copy of this loop).
            for b0 in (g0..end).step_by(16) {
                let mask = group_mask(gpr - b0);
                let sv = unsafe { scales16(sr, m.scale_type, b0, mask) };
                unsafe { _mm512_store_ps(s16.0.as_mut_ptr(), sv) };
                let bv = unsafe { scales16(br, m.scale_type, b0, mask) };
                for t in 0..N {
                    let xs = unsafe { _mm512_maskz_loadu_ps(mask, xsum[t].add(b0)) };
                    a[t] = _mm512_fmadd_ps(bv, xs, a[t]);
                }
                for g in b0..(b0 + 16).min(end) {
                    // `s·q` for each code value q: the permutations below then give scaled weights directly.
                    let lut_s = _mm512_mul_ps(lut, _mm512_set1_ps(s16.0[g - b0]));
                    // Ahead in the checkpoint's row stream (a widened row is already in L1); across spans, the
                    // next row's part of this one.
                    let at = g * group * m.bits as usize / 8;
                    _mm_prefetch::<_MM_HINT_T0>(
                        packed.as_ptr().wrapping_add(at + ahead) as *const i8
                    );
                    for k in 0..CHUNKS {
                        let j = g * group + 64 * k;
                        for h in 0..2 {
                            unsafe {
                                let (lo, hi) = nibble_values16(p.add(j / 2 + 16 * h), lut_s);
                                for t in 0..N {
                                    a[t] = _mm512_fmadd_ps(
                                        lo,
                                        _mm512_loadu_ps(x[t].add(j + 16 * h)),
                                        a[t],
                                    );
                                    b[t] = _mm512_fmadd_ps(
                                        hi,
                                        _mm512_loadu_ps(x[t].add(j + 32 + 16 * h)),
                                        b[t],
                                    );
                                }
                            }
                        }
                    }
                }
            }
            for t in 0..N {
                let sum = _mm512_reduce_add_ps(_mm512_add_ps(a[t], b[t]));
                if g0 == 0 {
                    super::store(out, m.rows, row, t0 + t, sum);
                } else {
                    super::add(out, m.rows, row, t0 + t, sum);
                }
            }
        }
    }
}

/// Columns per dequantized tile in [`f32_tiles`]: the tile (14 rows, 7 KB) and a span of 32 tokens'
/// transposed activations (16 KB) share L1. Spans of 256 and 512 measured 4 % and 10 % slower (2048 × 2048,
/// 64 tokens, one thread): the activations streaming past evicted the tile before it was written again.
const TILE_SPAN: usize = 128;
/// Rows dequantized together in [`f32_tiles`]: against a block of 32 tokens (two registers) they take 28 of
/// the 32 vector registers as accumulators.
const TILE_ROWS: usize = 14;
/// Columns and rows of [`f32_dot_tiles`]' tiles (32 KB; its four tokens' activations take 8 KB).
const DOT_TILE_SPAN: usize = 512;
const DOT_TILE_ROWS: usize = 16;

thread_local! {
    /// Per-thread buffers of the tiles: the dequantized rows of one span, and [`f32_tiles`]' sums so far
    /// (`[TILE_ROWS, tokens]`).
    static TILE: std::cell::Cell<(Option<Aligned<f32>>, Vec<f32>)> = const { std::cell::Cell::new((None, Vec::new())) };
}

/// The per-thread tile, at least `len` values on a 64-byte boundary (the tiles are read and written 64 bytes
/// at a time), and the sums buffer.
fn take_tile(len: usize) -> (Aligned<f32>, Vec<f32>) {
    match TILE.with(|c| c.take()) {
        (Some(t), sums) if t.len() >= len => (t, sums),
        (_, sums) => (Aligned::zeroed(len), sums),
    }
}

/// Rows `rows` of `m` (4-bit, or 2/3-bit widened to 4 bits, groups of `64 · CHUNKS`), groups `g0..g1`, as f32
/// weights `s·q + b` in the activations' permuted order: row `r` at `tile[(r - rows.start) · stride..]`.
/// Each row's next span is prefetched: it is read after all the tokens met this one, and rows a row apart
/// are not a stream the hardware follows.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn dequantize_tile<const CHUNKS: usize>(
    reader: &mut RowReader,
    rows: std::ops::Range<usize>,
    (g0, g1): (usize, usize),
    tile: &mut [f32],
    stride: usize,
) {
    let m = reader.m;
    let (group, gpr) = (64 * CHUNKS, m.groups_per_row());
    let (c0, width) = (g0 * group, (g1 - g0) * group);
    assert!(g1 - g0 <= 16 && width <= stride && tile.len() >= rows.len() * stride);
    let lut = codes_lut();
    for r in rows.clone() {
        let KernelRow {
            packed,
            codes: p,
            scales: sr,
            biases: br,
        } = reader.row_cols(r, c0..c0 + width);
        _mm_prefetch::<_MM_HINT_T0>(
            packed
                .as_ptr()
                .wrapping_add((c0 + width) * m.bits as usize / 8) as *const i8,
        );
        let dst = tile[(r - rows.start) * stride..].as_mut_ptr();
        // The span's scales and biases (sixteen groups from its first, those past the row masked) as f32,
        // for the multiplies below to take as broadcast operands.
        let (mut sc, mut bi) = ([0f32; 16], [0f32; 16]);
        unsafe {
            let mask = group_mask(gpr - g0);
            _mm512_storeu_ps(sc.as_mut_ptr(), scales16(sr, m.scale_type, g0, mask));
            _mm512_storeu_ps(bi.as_mut_ptr(), scales16(br, m.scale_type, g0, mask));
        }
        for g in g0..g1 {
            // `s·q + b` for each code value q: the permutations give the weights.
            let (s, b) = (sc[g - g0], bi[g - g0]);
            let lut_sb = _mm512_fmadd_ps(lut, _mm512_set1_ps(s), _mm512_set1_ps(b));
            for k in 0..CHUNKS {
                let j = g * group + 64 * k;
                for h in 0..2 {
                    // SAFETY: `j - c0 + 64 <= width <= stride`: inside the row's place in the tile.
                    unsafe {
                        let (lo, hi) = nibble_values16(p.add(j / 2 + 16 * h), lut_sb);
                        let d = dst.add(j - c0 + 16 * h);
                        _mm512_storeu_ps(d, lo);
                        _mm512_storeu_ps(d.add(32), hi);
                    }
                }
            }
        }
    }
}

/// f32 activations of many tokens (a prefill's dense matrices, [`Prepared::xt`]'s whole sixteens) against rows
/// `rows` (4-bit, or 2/3-bit widened to 4 bits), groups of `64 · CHUNKS`. Each span of `TILE_ROWS` rows is
/// dequantized once into a per-thread tile; then, column by column, each row's weight is broadcast and
/// meets sixteen tokens per register of the transposed activations: FMAs only, no horizontal sums. Each
/// output is one sum in column order, whichever block its row and token are in. Rows past the task's last
/// one in a tile hold stale values and are not stored.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn f32_tiles<const CHUNKS: usize>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
) {
    let (group, gpr) = (64 * CHUNKS, m.groups_per_row());
    let span = (TILE_SPAN / group).clamp(1, 16);
    let mut reader = RowReader::new(m);
    // Rows `TILE_SPAN` apart: each row's broadcast below is then a constant offset from one pointer.
    let (mut tile, mut sums) = take_tile(TILE_ROWS * TILE_SPAN);
    let tokens = px.tiled();
    sums.resize(TILE_ROWS * tokens, 0.0);
    for r0 in rows.clone().step_by(TILE_ROWS) {
        let r1 = (r0 + TILE_ROWS).min(rows.end);
        for g0 in (0..gpr).step_by(span) {
            let g1 = (g0 + span).min(gpr);
            let (c0, width) = (g0 * group, (g1 - g0) * group);
            unsafe {
                dequantize_tile::<CHUNKS>(&mut reader, r0..r1, (g0, g1), &mut tile, TILE_SPAN)
            };
            for b in 0..tokens.div_ceil(super::XT_BLOCK) {
                let (t0, tw, xt) = px.xt_block(b);
                let (x, s) = (xt[c0 * tw..].as_ptr(), sums[t0..].as_mut_ptr());
                unsafe {
                    match tw {
                        32 => tile_block::<2>(&tile, width, x, s, tokens, g0 == 0),
                        _ => tile_block::<1>(&tile, width, x, s, tokens, g0 == 0),
                    }
                }
            }
        }
        // Token by token: each token's rows are adjacent in `out`.
        for t in 0..tokens {
            for r in r0..r1 {
                super::store(out, m.rows, r, t, sums[(r - r0) * tokens + t]);
            }
        }
    }
    TILE.with(|c| c.set((Some(tile), sums)));
}

/// `TILE_ROWS` rows of `tile` (`TILE_SPAN` apart, `width` columns used) against `16 · V` tokens of transposed
/// activations `x` (`[width, 16 · V]`): `sums[r · sw + t]` (started from 0 when `first`) plus each column in
/// order.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn tile_block<const V: usize>(
    tile: &[f32],
    width: usize,
    x: *const f32,
    sums: *mut f32,
    sw: usize,
    first: bool,
) {
    debug_assert!(width <= TILE_SPAN && tile.len() >= TILE_ROWS * TILE_SPAN);
    let mut acc = [[_mm512_setzero_ps(); V]; TILE_ROWS];
    if !first {
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, a) in a.iter_mut().enumerate() {
                *a = unsafe { _mm512_loadu_ps(sums.add(r * sw + 16 * v)) };
            }
        }
    }
    for c in 0..width {
        let xv: [__m512; V] =
            std::array::from_fn(|v| unsafe { _mm512_loadu_ps(x.add(c * 16 * V + 16 * v)) });
        for (r, a) in acc.iter_mut().enumerate() {
            // SAFETY: `r < TILE_ROWS` and `c < width <= TILE_SPAN`.
            let w = _mm512_set1_ps(unsafe { *tile.as_ptr().add(r * TILE_SPAN + c) });
            for (a, x) in a.iter_mut().zip(&xv) {
                *a = _mm512_fmadd_ps(w, *x, *a);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (v, a) in a.iter().enumerate() {
            unsafe { _mm512_storeu_ps(sums.add(r * sw + 16 * v), *a) };
        }
    }
}

/// [`f32_tiles`] for fewer tokens (12 to `LANE_TILE_TOKENS`): f32 activations against rows `rows` (4-bit, or
/// 2/3-bit widened to 4 bits), groups of `64 · CHUNKS`. Each span of `DOT_TILE_ROWS` rows is dequantized once
/// into a per-thread tile; then blocks of four tokens meet blocks of four rows with sixteen FMA chains and no
/// unpacking, and each row-token pair's sixteen lanes are summed per span. A row's sums go in the same order
/// wherever it sits in a block ([`lane_sums16`]); the blocks past the last row or token repeat it and are not
/// stored.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn f32_dot_tiles<const CHUNKS: usize>(
    m: &AffineMatrix,
    px: &Prepared,
    out: &Out,
    rows: std::ops::Range<usize>,
) {
    let (group, gpr, tokens) = (64 * CHUNKS, m.groups_per_row(), px.tokens);
    // At most sixteen groups per span: one load of scales and biases each.
    let span = (DOT_TILE_SPAN / group).clamp(1, 16);
    let mut reader = RowReader::new(m);
    let (mut tile, kept) = take_tile(DOT_TILE_ROWS * span * group);
    for r0 in rows.clone().step_by(DOT_TILE_ROWS) {
        let r1 = (r0 + DOT_TILE_ROWS).min(rows.end);
        for g0 in (0..gpr).step_by(span) {
            let g1 = (g0 + span).min(gpr);
            let (c0, width) = (g0 * group, (g1 - g0) * group);
            unsafe { dequantize_tile::<CHUNKS>(&mut reader, r0..r1, (g0, g1), &mut tile, width) };
            for t0 in (0..tokens).step_by(4) {
                let mut x = [std::ptr::null::<f32>(); 4];
                for (t, x) in x.iter_mut().enumerate() {
                    *x = px.xf_of((t0 + t).min(tokens - 1))[c0..].as_ptr();
                }
                for rb in (r0..r1).step_by(4) {
                    let mut w = [std::ptr::null::<f32>(); 4];
                    for (i, w) in w.iter_mut().enumerate() {
                        *w = tile[((rb + i).min(r1 - 1) - r0) * width..].as_ptr();
                    }
                    // acc[4·i + t]: row rb + i, token t0 + t.
                    let mut acc = [_mm512_setzero_ps(); 16];
                    for c in (0..width).step_by(16) {
                        let mut xv = [_mm512_setzero_ps(); 4];
                        for t in 0..4 {
                            xv[t] = unsafe { _mm512_loadu_ps(x[t].add(c)) };
                        }
                        for i in 0..4 {
                            let wv = unsafe { _mm512_loadu_ps(w[i].add(c)) };
                            for t in 0..4 {
                                acc[4 * i + t] = _mm512_fmadd_ps(wv, xv[t], acc[4 * i + t]);
                            }
                        }
                    }
                    let mut sums = [0f32; 16];
                    unsafe { _mm512_storeu_ps(sums.as_mut_ptr(), lane_sums16(&acc)) };
                    for i in 0..(r1 - rb).min(4) {
                        for t in 0..(tokens - t0).min(4) {
                            let v = sums[4 * i + t];
                            if g0 == 0 {
                                super::store(out, m.rows, rb + i, t0 + t, v);
                            } else {
                                super::add(out, m.rows, rb + i, t0 + t, v);
                            }
                        }
                    }
                }
            }
        }
    }
    TILE.with(|c| c.set((Some(tile), kept)));
}

// ---- four rows per pass (one token) ----

/// [`dot4_i8_rows4_zmm`] for groups of 64 or 128.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_rows4_any<const EXACT: bool>(
    rows: [&[u8]; 4],
    xq: Q8,
    scales: [&[f32]; 4],
    dx: &[f32],
    group: usize,
    stream: bool,
) -> [f32; 4] {
    unsafe {
        match group {
            64 => dot4_i8_rows4_zmm::<1, EXACT>(rows, xq, scales, dx, stream),
            _ => dot4_i8_rows4_zmm::<2, EXACT>(rows, xq, scales, dx, stream),
        }
    }
}

/// [`dot4_i8_zmm`] over four rows: each 64-code chunk of activations is loaded once for all four.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
unsafe fn dot4_i8_rows4_zmm<const CHUNKS: usize, const EXACT: bool>(
    rows: [&[u8]; 4],
    xq: Q8,
    scales: [&[f32]; 4],
    dx: &[f32],
    stream: bool,
) -> [f32; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let p = rows.map(|r| r.as_ptr());
    let (q, r, s) = (xq.q.as_ptr(), xq.r.as_ptr(), xq.s.as_ptr());
    let group = 64 * CHUNKS;
    for g in 0..dx.len().min(scales[0].len()) {
        let mut c = [[_mm512_setzero_si512(); 4]; CHUNKS];
        let mut i = [_mm512_setzero_si512(); 4];
        // `RESIDUAL·Σq + Σr` per row in one register: the coarse sums, shifted, then the residual ones.
        for (k, ck) in c.iter_mut().enumerate() {
            let j = g * group + 64 * k;
            let vq = unsafe { _mm512_loadu_si512(q.add(j) as *const _) };
            for row in 0..4 {
                unsafe {
                    if j.is_multiple_of(128) {
                        if stream {
                            prefetch_pass(p[0], j / 128 * 4 + row);
                        }
                        _mm_prefetch::<_MM_HINT_T0>(
                            p[row].wrapping_add(j / 2 + PREFETCH) as *const i8
                        );
                    }
                    ck[row] = chunk64(p[row], j);
                }
                i[row] = _mm512_dpbusd_epi32(i[row], ck[row], vq);
            }
        }
        // Then the finer slices, each after a shift by the ratio of the steps.
        let slices: &[*const i8] = if EXACT { &[r, s] } else { &[r] };
        for &x in slices {
            for v in &mut i {
                *v = slices_shift::<EXACT>(*v);
            }
            for (k, ck) in c.iter().enumerate() {
                let vx = unsafe { _mm512_loadu_si512(x.add(g * group + 64 * k) as *const _) };
                for row in 0..4 {
                    i[row] = _mm512_dpbusd_epi32(i[row], ck[row], vx);
                }
            }
        }
        let d = unsafe { *dx.get_unchecked(g) };
        for row in 0..4 {
            let sd = _mm512_set1_ps(unsafe { *scales[row].get_unchecked(g) } * d);
            acc[row] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i[row]), sd, acc[row]);
        }
    }
    hsums512(acc)
}

/// An accumulator of the coarser slices' sums shifted to the next slice's steps: by [`super::RESIDUAL`]
/// (int8 path) or [`super::EXACT_RESIDUAL`] (the three slices of f32 activations).
#[inline]
#[target_feature(enable = "avx512f")]
fn slices_shift<const EXACT: bool>(v: __m512i) -> __m512i {
    if EXACT {
        _mm512_slli_epi32(v, 7)
    } else {
        _mm512_slli_epi32(v, 8)
    }
}

/// Line `k` of the bytes [`PASS_AHEAD`] past `first` (a one-token pass's first row; the 4-bit rows of a
/// matrix follow each other; not for widened rows, copies in a buffer: 3-bit decode lost 4 % to such hints). A pass calls it once per 64 bytes it reads, so the codes a few passes
/// ahead arrive in address order, one stream where the rows' own prefetches (into L1, capped by its few
/// line-fill buffers) make four. 1000 768×2048 experts, eight per call, two threads, one token: 20.0–21.0 →
/// 21.4–22.1 GB/s (f32, six alternations in one process); 2048×768 +0–5 %. A probe that loads four rows
/// side by side with similar work per 64 bytes: 22.3 GB/s with the rows' prefetches, 26.4 in address order.
#[inline(always)]
fn prefetch_pass(first: *const u8, k: usize) {
    // SAFETY: a prefetch only hints; at any address it never faults.
    unsafe { _mm_prefetch::<_MM_HINT_T1>(first.wrapping_add(PASS_AHEAD + 64 * k) as *const i8) };
}

/// [`dot4_f32_zmm`] over four rows: each 16 activations are loaded once for all four.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot4_f32_rows4_zmm<const CHUNKS: usize>(
    rows: [&[u8]; 4],
    x: &[f32],
    scales: [&[f32]; 4],
    stream: bool,
) -> [f32; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let p = rows.map(|r| r.as_ptr());
    let xp = x.as_ptr();
    let group = 64 * CHUNKS;
    let lut = codes_lut();
    for g in 0..scales[0].len() {
        let mut a = [_mm512_setzero_ps(); 4];
        for k in 0..CHUNKS {
            let j = g * group + 64 * k;
            for h in 0..2 {
                unsafe {
                    let (xl, xh) = (
                        _mm512_loadu_ps(xp.add(j + 16 * h)),
                        _mm512_loadu_ps(xp.add(j + 32 + 16 * h)),
                    );
                    for i in 0..4 {
                        if h == 0 && j.is_multiple_of(128) {
                            if stream {
                                prefetch_pass(p[0], j / 128 * 4 + i);
                            }
                            _mm_prefetch::<_MM_HINT_T0>(
                                p[i].wrapping_add(j / 2 + PREFETCH) as *const i8
                            );
                        }
                        let (lo, hi) = nibble_values16(p[i].add(j / 2 + 16 * h), lut);
                        a[i] = _mm512_fmadd_ps(hi, xh, _mm512_fmadd_ps(lo, xl, a[i]));
                    }
                }
            }
        }
        for i in 0..4 {
            let s = _mm512_set1_ps(unsafe { *scales[i].get_unchecked(g) });
            acc[i] = _mm512_fmadd_ps(a[i], s, acc[i]);
        }
    }
    hsums512(acc)
}

// ---- bf16 weights ----

/// bf16 row (little-endian bytes) × `N` tokens of f32 activations: eight weights widened once meet every token
/// with one FMA.
///
/// # Safety
/// Needs AVX2 + FMA; `row.len() == 2 · x[t].len()` for every token.
#[inline]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_bf16_xn_avx2<const N: usize>(row: &[u8], x: [&[f32]; N]) -> [f32; N] {
    let n = row.len() / 2 / 8 * 8;
    let mut acc = [_mm256_setzero_ps(); N];
    let mut i = 0;
    while i < n {
        unsafe {
            let w =
                _mm256_cvtepu16_epi32(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i));
            let w = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            for t in 0..N {
                acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x[t].as_ptr().add(i)), acc[t]);
            }
        }
        i += 8;
    }
    // A loop, not `array::from_fn`: a closure would not inherit `target_feature`.
    let mut sums = [0f32; N];
    for t in 0..N {
        sums[t] = hsum256(acc[t]) + super::scalar::dot_bf16(&row[2 * n..], &x[t][n..]);
    }
    sums
}

/// [`dot_bf16_xn_avx2`] with 512-bit registers for `R` rows of the same length, prefetching ahead in each:
/// each 16 activations of a token are loaded once for the `R` rows, and every (row, token) sum is added in
/// the same order whatever `R` is.
///
/// # Safety
/// Needs AVX-512F; `rows[r].len() == 2 · x[t].len()` for every row and token.
#[inline]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot_bf16_rows_xn_avx512<const R: usize, const N: usize>(
    rows: [&[u8]; R],
    x: [&[f32]; N],
) -> [[f32; N]; R] {
    let cols = rows[0].len() / 2;
    debug_assert!(rows.iter().all(|r| r.len() == 2 * cols));
    let n = cols / 16 * 16;
    let mut acc = [[_mm512_setzero_ps(); N]; R];
    let mut i = 0;
    while i < n {
        // Loops written out, not `array::map`: a closure would not inherit `target_feature`.
        let mut w = [_mm512_setzero_ps(); R];
        for (r, row) in rows.iter().enumerate() {
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(
                    row.as_ptr().wrapping_add(2 * i + PREFETCH) as *const i8
                );
                let v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                    row.as_ptr().add(2 * i) as *const __m256i
                ));
                w[r] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
            }
        }
        for t in 0..N {
            // SAFETY: `i + 16 <= n <= x[t].len()`.
            let xv = unsafe { _mm512_loadu_ps(x[t].as_ptr().add(i)) };
            for r in 0..R {
                acc[r][t] = _mm512_fmadd_ps(w[r], xv, acc[r][t]);
            }
        }
        i += 16;
    }
    let mut sums = [[0f32; N]; R];
    for r in 0..R {
        for t in 0..N {
            sums[r][t] = _mm512_reduce_add_ps(acc[r][t])
                + super::scalar::dot_bf16(&rows[r][2 * n..], &x[t][n..]);
        }
    }
    sums
}

// ---- four tokens per pass, groups of 32 ----

/// [`Dots::dot4_f32_x4`] for groups of 32.
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn dot4_f32_avx512_xn_g32<const N: usize>(
    packed: &[u8],
    x: [&[f32]; N],
    scales: &[f32],
) -> [f32; N] {
    let mut acc = [_mm512_setzero_ps(); N];
    let p = packed.as_ptr();
    let cvt = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    let m = _mm_set1_epi8(0x0f);
    for (g, &s) in scales.iter().enumerate() {
        let base = g * 32;
        let b = unsafe { _mm_loadu_si128(p.add(base / 2) as *const __m128i) };
        let f = [
            cvt(_mm_and_si128(b, m)),
            cvt(_mm_and_si128(_mm_srli_epi16(b, 4), m)),
        ];
        let sv = _mm512_set1_ps(s);
        for k in 0..N {
            let (lo, hi) = unsafe {
                let xp = x[k].as_ptr().add(base);
                (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)))
            };
            let a = _mm512_fmadd_ps(f[1], hi, _mm512_mul_ps(f[0], lo));
            acc[k] = _mm512_fmadd_ps(a, sv, acc[k]);
        }
    }
    hsums512(acc)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// AVX2 widening writes the scalar widening's bytes: 2- and 3-bit rows in steps of 64 codes, 5- and 6-bit
    /// ones of 32, tails (and 5-bit steps whose 16-byte loads would pass the row's end) done by the scalar
    /// widening, and nothing past the row's widened bytes.
    #[test]
    fn avx2_widening_equals_the_scalar_one() {
        if !has_avx2() {
            return;
        }
        let mut seed = 0x9e37_79b9u32;
        for bits in [2u32, 3, 5, 6] {
            for codes in [32usize, 64, 96, 128, 2048, 2080] {
                let bytes: Vec<u8> = (0..codes * bits as usize / 8)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        (seed >> 24) as u8
                    })
                    .collect();
                let len = crate::quant::affine::widened_len(codes, bits);
                let mut want = vec![0u8; len];
                crate::quant::affine::widen(&bytes, bits, &mut want);
                let mut got = vec![0xaau8; len + 8];
                let n = widen_x86(&bytes, bits, &mut got);
                assert_eq!(n, len);
                assert_eq!(got[..n], want[..], "{bits}-bit, {codes} codes");
                assert!(got[n..].iter().all(|&b| b == 0xaa));
            }
        }
    }

    /// Token `t`, column `c` lands in column `c` of its block of 32 tokens (16 when 16 are left), at the
    /// token's place in the block.
    #[test]
    fn transposed_tokens_go_in_blocks_of_32_then_16() {
        if !has_avx512() {
            return;
        }
        let cols = 48;
        for tokens in [16, 32, 48, 64] {
            let xf: Vec<f32> = (0..tokens * cols).map(|i| i as f32).collect();
            let xt = unsafe { transpose_tokens(&xf, tokens, cols) };
            assert_eq!(xt.len(), xf.len());
            for t in 0..tokens {
                let b0 = t / 32 * 32;
                let width = if tokens - b0 > 16 { 32 } else { 16 };
                for c in 0..cols {
                    assert_eq!(
                        xt[b0 * cols + c * width + t - b0],
                        xf[t * cols + c],
                        "{tokens} tokens"
                    );
                }
            }
        }
    }

    /// Each vector's sum lands in its own element, is the same wherever the vector sits, and is its lanes' sum.
    #[test]
    fn lane_sums16_are_each_vectors_sum_wherever_it_sits() {
        if !has_avx512() {
            return;
        }
        let values: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|l| ((i * 37 + l * 11) % 29) as f32 * 0.37 - 4.1))
            .collect();
        // SAFETY (all): AVX-512F is present (checked above).
        let load = |a: &[f32; 16]| unsafe { _mm512_loadu_ps(a.as_ptr()) };
        let sums = |v: &[__m512; 16]| {
            let mut s = [0f32; 16];
            unsafe { _mm512_storeu_ps(s.as_mut_ptr(), lane_sums16(v)) };
            s
        };
        let v: [__m512; 16] = std::array::from_fn(|i| load(&values[i]));
        let got = sums(&v);
        for (i, lanes) in values.iter().enumerate() {
            let want: f32 = lanes.iter().sum();
            assert!(
                (got[i] - want).abs() < 1e-4,
                "vector {i}: {} vs {want}",
                got[i]
            );
            // Vector i alone at every other position, zeros elsewhere: bit for bit the same sum.
            for at in 0..16 {
                let mut alone = [unsafe { _mm512_setzero_ps() }; 16];
                alone[at] = v[i];
                assert_eq!(
                    sums(&alone)[at].to_bits(),
                    got[i].to_bits(),
                    "vector {i} at {at}"
                );
            }
        }
    }
}
