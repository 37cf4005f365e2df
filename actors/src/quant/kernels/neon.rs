//! AArch64 NEON kernels (NEON is part of the base ARMv8-A architecture). Same contracts as the x86 ones:
//! `group` a multiple of 32, slice lengths multiples of `group`.

use super::{Dots, Out, Prepared, Q8, RESIDUAL, Weight, rows};
use std::arch::aarch64::*;

struct Neon;

// SAFETY (all methods): NEON is part of the base AArch64 architecture.
impl Dots for Neon {
    #[inline(always)]
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot4_f32_xn(row, [x], scales, group)[0] }
    }
    #[inline(always)]
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot4_i8_xn(row, [xq], scales, [dx], group)[0] }
    }
    #[inline(always)]
    fn dot4_f32_xn<const N: usize>(
        row: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot4_f32_xn(row, x, scales, group) }
    }
    #[inline(always)]
    fn dot4_i8_xn<const N: usize>(
        row: &[u8],
        xq: [Q8; N],
        scales: &[f32],
        dx: [&[f32]; N],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot4_i8_xn(row, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot_f32_xn(codes, [x], scales, group)[0] }
    }
    #[inline(always)]
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot_i8_xn(codes, [xq], scales, [dx], group)[0] }
    }
    #[inline(always)]
    fn dot_f32_xn<const N: usize>(
        codes: &[u8],
        x: [&[f32]; N],
        scales: &[f32],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot_f32_xn(codes, x, scales, group) }
    }
    #[inline(always)]
    fn dot_i8_xn<const N: usize>(
        codes: &[u8],
        xq: [Q8; N],
        scales: &[f32],
        dx: [&[f32]; N],
        group: usize,
    ) -> [f32; N] {
        unsafe { dot_i8_xn(codes, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        unsafe { dot_bf16(row, x) }
    }
}

/// # Safety
/// NEON only (always present on AArch64).
#[target_feature(enable = "neon")]
pub(super) unsafe fn run_rows_neon(w: Weight, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    rows::<Neon>(w, px, out, r0, r1)
}

/// 8 byte codes → two f32 vectors.
#[inline]
#[target_feature(enable = "neon")]
fn codes_f32(c: uint8x8_t) -> [float32x4_t; 2] {
    let w = vmovl_u8(c);
    [
        vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))),
        vcvtq_f32_u32(vmovl_u16(vget_high_u16(w))),
    ]
}

/// Eight codes from [`codes_f32`] against `x[0..8]`, fused into the two accumulators.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma8(f: [float32x4_t; 2], x: *const f32, a0: &mut float32x4_t, a1: &mut float32x4_t) {
    unsafe {
        *a0 = vfmaq_f32(*a0, f[0], vld1q_f32(x));
        *a1 = vfmaq_f32(*a1, f[1], vld1q_f32(x.add(4)));
    }
}

/// 8 byte codes as i16 lanes, for [`mla8`].
#[inline]
#[target_feature(enable = "neon")]
fn widen8(c: uint8x8_t) -> int16x8_t {
    vreinterpretq_s16_u16(vmovl_u8(c))
}

/// 8 codes widened by [`widen8`] × 8 int8 activations, accumulated into i32 lanes (codes up to 255 fit
/// i16).
#[inline]
#[target_feature(enable = "neon")]
fn mla8(c: int16x8_t, q: int8x8_t, isum: int32x4_t) -> int32x4_t {
    let q = vmovl_s8(q);
    let isum = vmlal_s16(isum, vget_low_s16(c), vget_low_s16(q));
    vmlal_s16(isum, vget_high_s16(c), vget_high_s16(q))
}

/// The codes of a 4-bit chunk (`min(group, 64)` codes) in permuted order, 16 at a time.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn chunk_codes(p: *const u8, chunk: usize, mut f: impl FnMut(uint8x16_t, usize)) {
    let mask = vdupq_n_u8(0x0f);
    let half = chunk / 2;
    for k in (0..half).step_by(16) {
        let b = unsafe { vld1q_u8(p.add(k)) };
        f(vandq_u8(b, mask), k);
        f(vshrq_n_u8(b, 4), half + k);
    }
}

/// Packed 4-bit rows × `N` tokens' permuted f32 activations: each eight codes are converted once for all
/// the tokens, and each token's sums are taken in the order one token alone takes them, so its result is the
/// same to the bit in a block of tokens or alone (prefill and decode agree).
///
/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot4_f32_xn<const N: usize>(
    packed: &[u8],
    x: [&[f32]; N],
    scales: &[f32],
    group: usize,
) -> [f32; N] {
    let chunk = group.min(64);
    let mut acc = [vdupq_n_f32(0.0); N];
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
        for j in (g * group..(g + 1) * group).step_by(chunk) {
            unsafe {
                chunk_codes(packed.as_ptr().add(j / 2), chunk, |c, off| {
                    for (half, c) in [vget_low_u8(c), vget_high_u8(c)].into_iter().enumerate() {
                        // Eight codes against each token's x[at..at + 8].
                        let (f, at) = (codes_f32(c), j + off + 8 * half);
                        for t in 0..N {
                            fma8(f, x[t].as_ptr().add(at), &mut a0[t], &mut a1[t]);
                        }
                    }
                });
            }
        }
        for t in 0..N {
            acc[t] = vfmaq_n_f32(acc[t], vaddq_f32(a0[t], a1[t]), s);
        }
    }
    acc.map(|a| vaddvq_f32(a))
}

/// Packed 4-bit rows × `N` tokens' permuted int8 activations: each eight codes are widened once for all
/// the tokens; each token's sums are those of one token alone (integer, then per group in the same order),
/// so its result is the same to the bit in a block of tokens or alone.
///
/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot4_i8_xn<const N: usize>(
    packed: &[u8],
    xq: [Q8; N],
    scales: &[f32],
    dx: [&[f32]; N],
    group: usize,
) -> [f32; N] {
    let chunk = group.min(64);
    let mut acc = [vdupq_n_f32(0.0); N];
    for (g, &s) in scales.iter().enumerate() {
        let (mut iq, mut ir) = ([vdupq_n_s32(0); N], [vdupq_n_s32(0); N]);
        for j in (g * group..(g + 1) * group).step_by(chunk) {
            unsafe {
                chunk_codes(packed.as_ptr().add(j / 2), chunk, |c, off| {
                    for (half, c) in [vget_low_u8(c), vget_high_u8(c)].into_iter().enumerate() {
                        let (c, at) = (widen8(c), j + off + 8 * half);
                        for t in 0..N {
                            iq[t] = mla8(c, vld1_s8(xq[t].q.as_ptr().add(at)), iq[t]);
                            ir[t] = mla8(c, vld1_s8(xq[t].r.as_ptr().add(at)), ir[t]);
                        }
                    }
                });
            }
        }
        for t in 0..N {
            let isum = vmlaq_n_s32(ir[t], iq[t], RESIDUAL);
            acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(isum), s * dx[t][g]);
        }
    }
    acc.map(|a| vaddvq_f32(a))
}

/// Byte codes × `N` tokens' f32 activations: each eight codes are converted once for all the tokens, and
/// each token's sums are taken in the order one token alone takes them (its result is the same to the bit).
///
/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32_xn<const N: usize>(
    codes: &[u8],
    x: [&[f32]; N],
    scales: &[f32],
    group: usize,
) -> [f32; N] {
    let mut acc = [vdupq_n_f32(0.0); N];
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = ([vdupq_n_f32(0.0); N], [vdupq_n_f32(0.0); N]);
        for j in (g * group..(g + 1) * group).step_by(8) {
            unsafe {
                let f = codes_f32(vld1_u8(codes.as_ptr().add(j)));
                for t in 0..N {
                    fma8(f, x[t].as_ptr().add(j), &mut a0[t], &mut a1[t]);
                }
            }
        }
        for t in 0..N {
            acc[t] = vfmaq_n_f32(acc[t], vaddq_f32(a0[t], a1[t]), s);
        }
    }
    acc.map(|a| vaddvq_f32(a))
}

/// Byte codes × `N` tokens' int8 activations: each eight codes are widened once for all the tokens; each
/// token's sums are those of one token alone (its result is the same to the bit).
///
/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot_i8_xn<const N: usize>(
    codes: &[u8],
    xq: [Q8; N],
    scales: &[f32],
    dx: [&[f32]; N],
    group: usize,
) -> [f32; N] {
    let mut acc = [vdupq_n_f32(0.0); N];
    for (g, &s) in scales.iter().enumerate() {
        let (mut iq, mut ir) = ([vdupq_n_s32(0); N], [vdupq_n_s32(0); N]);
        for j in (g * group..(g + 1) * group).step_by(8) {
            unsafe {
                let c = widen8(vld1_u8(codes.as_ptr().add(j)));
                for t in 0..N {
                    iq[t] = mla8(c, vld1_s8(xq[t].q.as_ptr().add(j)), iq[t]);
                    ir[t] = mla8(c, vld1_s8(xq[t].r.as_ptr().add(j)), ir[t]);
                }
            }
        }
        for t in 0..N {
            let isum = vmlaq_n_s32(ir[t], iq[t], RESIDUAL);
            acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(isum), s * dx[t][g]);
        }
    }
    acc.map(|a| vaddvq_f32(a))
}

/// # Safety
/// `row.len() == 2 · x.len()`.
#[target_feature(enable = "neon")]
pub unsafe fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len() / 4 * 4;
    let mut acc = vdupq_n_f32(0.0);
    for i in (0..n).step_by(4) {
        unsafe {
            // bf16 → f32: the 16 bits become the high half of the f32.
            let w = vreinterpretq_f32_u32(vshll_n_u16(
                vld1_u16(row.as_ptr().add(2 * i) as *const u16),
                16,
            ));
            acc = vfmaq_f32(acc, w, vld1q_f32(x.as_ptr().add(i)));
        }
    }
    vaddvq_f32(acc) + super::scalar::dot_bf16(&row[2 * n..], &x[n..])
}
