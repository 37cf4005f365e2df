//! AArch64 NEON kernels (NEON is part of the base ARMv8-A architecture). Same contracts as the x86 ones:
//! `group` a multiple of 32, slice lengths multiples of `group`.

use super::{Dots, Out, Prepared, Q8, RESIDUAL, Weight, rows};
use std::arch::aarch64::*;

struct Neon;

// SAFETY (all methods): NEON is part of the base AArch64 architecture.
impl Dots for Neon {
    #[inline(always)]
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot4_f32(row, x, scales, group) }
    }
    #[inline(always)]
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot4_i8(row, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot_f32(codes, x, scales, group) }
    }
    #[inline(always)]
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot_i8(codes, xq, scales, dx, group) }
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

/// 8 byte codes → two f32 vectors, fused into the accumulators against `x[0..8]`.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn fma8(c: uint8x8_t, x: *const f32, a0: &mut float32x4_t, a1: &mut float32x4_t) {
    let w = vmovl_u8(c);
    unsafe {
        *a0 = vfmaq_f32(*a0, vcvtq_f32_u32(vmovl_u16(vget_low_u16(w))), vld1q_f32(x));
        *a1 = vfmaq_f32(
            *a1,
            vcvtq_f32_u32(vmovl_u16(vget_high_u16(w))),
            vld1q_f32(x.add(4)),
        );
    }
}

/// 8 byte codes × 8 int8 activations, accumulated into i32 lanes (codes up to 255 fit i16).
#[inline]
#[target_feature(enable = "neon")]
fn mla8(c: uint8x8_t, q: int8x8_t, isum: int32x4_t) -> int32x4_t {
    let c = vreinterpretq_s16_u16(vmovl_u8(c));
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

/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot4_f32(packed: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let chunk = group.min(64);
    let mut acc = vdupq_n_f32(0.0);
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for j in (g * group..(g + 1) * group).step_by(chunk) {
            unsafe {
                chunk_codes(packed.as_ptr().add(j / 2), chunk, |c, off| {
                    fma8(vget_low_u8(c), x.as_ptr().add(j + off), &mut a0, &mut a1);
                    fma8(
                        vget_high_u8(c),
                        x.as_ptr().add(j + off + 8),
                        &mut a0,
                        &mut a1,
                    );
                });
            }
        }
        acc = vfmaq_n_f32(acc, vaddq_f32(a0, a1), s);
    }
    vaddvq_f32(acc)
}

/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot4_i8(packed: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let chunk = group.min(64);
    let mut acc = vdupq_n_f32(0.0);
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let (mut iq, mut ir) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for j in (g * group..(g + 1) * group).step_by(chunk) {
            unsafe {
                chunk_codes(packed.as_ptr().add(j / 2), chunk, |c, off| {
                    let at = j + off;
                    iq = mla8(vget_low_u8(c), vld1_s8(xq.q.as_ptr().add(at)), iq);
                    iq = mla8(vget_high_u8(c), vld1_s8(xq.q.as_ptr().add(at + 8)), iq);
                    ir = mla8(vget_low_u8(c), vld1_s8(xq.r.as_ptr().add(at)), ir);
                    ir = mla8(vget_high_u8(c), vld1_s8(xq.r.as_ptr().add(at + 8)), ir);
                });
            }
        }
        let isum = vmlaq_n_s32(ir, iq, RESIDUAL);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), s * d);
    }
    vaddvq_f32(acc)
}

/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
        for j in (g * group..(g + 1) * group).step_by(8) {
            unsafe {
                fma8(
                    vld1_u8(codes.as_ptr().add(j)),
                    x.as_ptr().add(j),
                    &mut a0,
                    &mut a1,
                )
            };
        }
        acc = vfmaq_n_f32(acc, vaddq_f32(a0, a1), s);
    }
    vaddvq_f32(acc)
}

/// # Safety
/// See the module note on lengths.
#[target_feature(enable = "neon")]
pub unsafe fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let mut acc = vdupq_n_f32(0.0);
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let (mut iq, mut ir) = (vdupq_n_s32(0), vdupq_n_s32(0));
        for j in (g * group..(g + 1) * group).step_by(8) {
            unsafe {
                let c = vld1_u8(codes.as_ptr().add(j));
                iq = mla8(c, vld1_s8(xq.q.as_ptr().add(j)), iq);
                ir = mla8(c, vld1_s8(xq.r.as_ptr().add(j)), ir);
            }
        }
        let isum = vmlaq_n_s32(ir, iq, RESIDUAL);
        acc = vfmaq_n_f32(acc, vcvtq_f32_s32(isum), s * d);
    }
    vaddvq_f32(acc)
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
