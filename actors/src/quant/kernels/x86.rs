//! x86-64 kernels: AVX2 + FMA, and AVX-512 (F, BW, VL) with VNNI. Callers check the features at run time.
//! All take `group` a multiple of 32 and slices whose lengths are a multiple of `group` (codes: bytes, or
//! half as many bytes for packed 4-bit rows).

use super::{Activations, Dots, Out, Prepared, Q8, Weight, rows};
use std::arch::x86_64::*;

/// AVX2 + FMA kernels (the `Dots` impls are only reached through the `target_feature` entry points).
struct Avx2;
/// AVX-512 F/BW/VL + VNNI kernels.
struct Avx512;

// SAFETY (all impls below): only called from the entry points, whose features include the kernels'.
impl Dots for Avx2 {
    #[inline(always)]
    fn dot4_f32(row: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot4_f32_avx2(row, x, scales, group) }
    }
    #[inline(always)]
    fn dot4_i8(row: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot4_i8_avx2(row, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_f32(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
        unsafe { dot_f32_avx2(codes, x, scales, group) }
    }
    #[inline(always)]
    fn dot_i8(codes: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
        unsafe { dot_i8_avx2(codes, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot_bf16(row: &[u8], x: &[f32]) -> f32 {
        unsafe { dot_bf16_avx2(row, x) }
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
        unsafe { dot_bf16_avx512(row, x) }
    }
    #[inline(always)]
    fn dot4_i8_x4(
        row: &[u8],
        xq: [Q8; 4],
        scales: &[f32],
        dx: [&[f32]; 4],
        group: usize,
    ) -> [f32; 4] {
        unsafe { dot4_i8_vnni_x4(row, xq, scales, dx, group) }
    }
    #[inline(always)]
    fn dot4_f32_x4(row: &[u8], x: [&[f32]; 4], scales: &[f32], group: usize) -> [f32; 4] {
        unsafe { dot4_f32_avx512_x4(row, x, scales, group) }
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
) -> Prepared {
    Prepared::new(x, cols, key)
}

/// # Safety
/// Needs AVX-512 F/BW/VL + VNNI.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma")]
pub(super) unsafe fn run_rows_avx512(w: Weight, px: &Prepared, out: &Out, r0: usize, r1: usize) {
    rows::<Avx512>(w, px, out, r0, r1)
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

/// Bytes ahead of the weight stream to prefetch: a couple of rows of a typical projection.
const PREFETCH: usize = 4096;

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
    let mut acc = _mm512_setzero_ps();
    let (p, xp) = (packed.as_ptr(), x.as_ptr());
    let cvt = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                let b = _mm_loadu_si128(p.add(base / 2) as *const __m128i);
                let m = _mm_set1_epi8(0x0f);
                a0 = _mm512_fmadd_ps(cvt(_mm_and_si128(b, m)), _mm512_loadu_ps(xp.add(base)), a0);
                a1 = _mm512_fmadd_ps(
                    cvt(_mm_and_si128(_mm_srli_epi16(b, 4), m)),
                    _mm512_loadu_ps(xp.add(base + 16)),
                    a1,
                );
            } else {
                let mut j = base;
                while j < end {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(j / 2 + PREFETCH) as *const i8);
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    a0 = _mm512_fmadd_ps(
                        cvt(_mm256_castsi256_si128(lo)),
                        _mm512_loadu_ps(xp.add(j)),
                        a0,
                    );
                    a1 = _mm512_fmadd_ps(
                        cvt(_mm256_extracti128_si256(lo, 1)),
                        _mm512_loadu_ps(xp.add(j + 16)),
                        a1,
                    );
                    a0 = _mm512_fmadd_ps(
                        cvt(_mm256_castsi256_si128(hi)),
                        _mm512_loadu_ps(xp.add(j + 32)),
                        a0,
                    );
                    a1 = _mm512_fmadd_ps(
                        cvt(_mm256_extracti128_si256(hi, 1)),
                        _mm512_loadu_ps(xp.add(j + 48)),
                        a1,
                    );
                    j += 64;
                }
            }
        }
        acc = _mm512_fmadd_ps(_mm512_add_ps(a0, a1), _mm512_set1_ps(s), acc);
    }
    _mm512_reduce_add_ps(acc)
}

/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_f32_avx2(packed: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (p, xp) = (packed.as_ptr(), x.as_ptr());
    // 32 codes in a register → four FMAs of 8 against x[0..32].
    let fma32 = |codes: __m256i, x: *const f32, mut a: __m256| -> __m256 {
        let lo = _mm256_castsi256_si128(codes);
        let hi = _mm256_extracti128_si256(codes, 1);
        for (i, part) in [lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)]
            .into_iter()
            .enumerate()
        {
            let f = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(part));
            a = _mm256_fmadd_ps(f, unsafe { _mm256_loadu_ps(x.add(8 * i)) }, a);
        }
        a
    };
    for (g, &s) in scales.iter().enumerate() {
        let mut a = _mm256_setzero_ps();
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                a = fma32(
                    nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i)),
                    xp.add(base),
                    a,
                );
            } else {
                let mut j = base;
                while j < end {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(j / 2 + PREFETCH) as *const i8);
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    a = fma32(lo, xp.add(j), a);
                    a = fma32(hi, xp.add(j + 32), a);
                    j += 64;
                }
            }
        }
        acc = _mm256_fmadd_ps(a, _mm256_set1_ps(s), acc);
    }
    hsum256(acc)
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
                _mm_prefetch::<_MM_HINT_T0>(c.add(PREFETCH) as *const i8);
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

/// # Safety
/// Needs AVX2 + FMA; see the module note on lengths.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_f32_avx2(codes: &[u8], x: &[f32], scales: &[f32], group: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    for (g, &s) in scales.iter().enumerate() {
        let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut j = g * group;
        while j < (g + 1) * group {
            unsafe {
                let c = codes.as_ptr().add(j);
                let xp = x.as_ptr().add(j);
                let c0 =
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(c as *const __m128i)));
                let c1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                    c.add(8) as *const __m128i
                )));
                a0 = _mm256_fmadd_ps(c0, _mm256_loadu_ps(xp), a0);
                a1 = _mm256_fmadd_ps(c1, _mm256_loadu_ps(xp.add(8)), a1);
            }
            j += 16;
        }
        acc = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s), acc);
    }
    hsum256(acc)
}

// ---- int8 activations ----

// `combine` multiplies by 254 with shifts.
const _: () = assert!(super::RESIDUAL == 254);

/// `RESIDUAL · q + r` per i32 lane (254 = 256 − 2).
#[inline]
#[target_feature(enable = "avx2")]
fn combine(q: __m256i, r: __m256i) -> __m256i {
    _mm256_add_epi32(
        _mm256_sub_epi32(_mm256_slli_epi32(q, 8), _mm256_slli_epi32(q, 1)),
        r,
    )
}

/// # Safety
/// Needs AVX-512 VL + VNNI; see the module note on lengths.
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn dot4_i8_vnni(packed: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let mut acc = _mm256_setzero_ps();
    let (p, q, r) = (packed.as_ptr(), xq.q.as_ptr(), xq.r.as_ptr());
    let ld = |a: *const i8| unsafe { _mm256_loadu_si256(a as *const __m256i) };
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let (mut iq, mut ir) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                let c = nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i));
                iq = _mm256_dpbusd_epi32(iq, c, ld(q.add(base)));
                ir = _mm256_dpbusd_epi32(ir, c, ld(r.add(base)));
            } else {
                let mut j = base;
                while j < end {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(j / 2 + PREFETCH) as *const i8);
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    // u8 codes × i8 activations, four products summed into each i32 lane.
                    iq = _mm256_dpbusd_epi32(iq, lo, ld(q.add(j)));
                    iq = _mm256_dpbusd_epi32(iq, hi, ld(q.add(j + 32)));
                    ir = _mm256_dpbusd_epi32(ir, lo, ld(r.add(j)));
                    ir = _mm256_dpbusd_epi32(ir, hi, ld(r.add(j + 32)));
                    j += 64;
                }
            }
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
/// Needs AVX2 + FMA; see the module note on lengths.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot4_i8_avx2(packed: &[u8], xq: Q8, scales: &[f32], dx: &[f32], group: usize) -> f32 {
    let ones = _mm256_set1_epi16(1);
    let mut acc = _mm256_setzero_ps();
    let (p, q, r) = (packed.as_ptr(), xq.q.as_ptr(), xq.r.as_ptr());
    let ld = |a: *const i8| unsafe { _mm256_loadu_si256(a as *const __m256i) };
    // Codes ≤ 15: pairs of u8 × i8 products fit i16 without saturation.
    let dot = |c: __m256i, x: __m256i| _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones);
    for (g, (&s, &d)) in scales.iter().zip(dx).enumerate() {
        let (mut iq, mut ir) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                let c = nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i));
                iq = _mm256_add_epi32(iq, dot(c, ld(q.add(base))));
                ir = _mm256_add_epi32(ir, dot(c, ld(r.add(base))));
            } else {
                let mut j = base;
                while j < end {
                    _mm_prefetch::<_MM_HINT_T0>(p.add(j / 2 + PREFETCH) as *const i8);
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    iq = _mm256_add_epi32(
                        iq,
                        _mm256_add_epi32(dot(lo, ld(q.add(j))), dot(hi, ld(q.add(j + 32)))),
                    );
                    ir = _mm256_add_epi32(
                        ir,
                        _mm256_add_epi32(dot(lo, ld(r.add(j))), dot(hi, ld(r.add(j + 32)))),
                    );
                    j += 64;
                }
            }
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
                _mm_prefetch::<_MM_HINT_T0>(codes.as_ptr().add(j + PREFETCH) as *const i8);
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

/// # Safety
/// Needs AVX-512 VL + VNNI; see the module note on lengths (for every token's slices).
#[target_feature(enable = "avx512f,avx512vl,avx512vnni,avx2,fma")]
pub unsafe fn dot4_i8_vnni_x4(
    packed: &[u8],
    xq: [Q8; 4],
    scales: &[f32],
    dx: [&[f32]; 4],
    group: usize,
) -> [f32; 4] {
    let mut acc = [_mm256_setzero_ps(); 4];
    let p = packed.as_ptr();
    let ld =
        |a: &[i8], at: usize| unsafe { _mm256_loadu_si256(a.as_ptr().add(at) as *const __m256i) };
    for (g, &s) in scales.iter().enumerate() {
        let mut iq = [_mm256_setzero_si256(); 4];
        let mut ir = [_mm256_setzero_si256(); 4];
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                let c = nibbles_of_16(_mm_loadu_si128(p.add(base / 2) as *const __m128i));
                for k in 0..4 {
                    iq[k] = _mm256_dpbusd_epi32(iq[k], c, ld(xq[k].q, base));
                    ir[k] = _mm256_dpbusd_epi32(ir[k], c, ld(xq[k].r, base));
                }
            } else {
                let mut j = base;
                while j < end {
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    for k in 0..4 {
                        iq[k] = _mm256_dpbusd_epi32(iq[k], lo, ld(xq[k].q, j));
                        iq[k] = _mm256_dpbusd_epi32(iq[k], hi, ld(xq[k].q, j + 32));
                        ir[k] = _mm256_dpbusd_epi32(ir[k], lo, ld(xq[k].r, j));
                        ir[k] = _mm256_dpbusd_epi32(ir[k], hi, ld(xq[k].r, j + 32));
                    }
                    j += 64;
                }
            }
        }
        for k in 0..4 {
            acc[k] = _mm256_fmadd_ps(
                _mm256_cvtepi32_ps(combine(iq[k], ir[k])),
                _mm256_set1_ps(s * dx[k][g]),
                acc[k],
            );
        }
    }
    [
        hsum256(acc[0]),
        hsum256(acc[1]),
        hsum256(acc[2]),
        hsum256(acc[3]),
    ]
}

// ---- bf16 weights ----

/// # Safety
/// Needs AVX2 + FMA; `row.len() == 2 · x.len()`.
#[target_feature(enable = "avx2,fma")]
pub unsafe fn dot_bf16_avx2(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    let mut i = 0;
    while i < n {
        unsafe {
            let w =
                _mm256_cvtepu16_epi32(_mm_loadu_si128(row.as_ptr().add(2 * i) as *const __m128i));
            let w = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
            acc = _mm256_fmadd_ps(w, _mm256_loadu_ps(x.as_ptr().add(i)), acc);
        }
        i += 8;
    }
    hsum256(acc) + super::scalar::dot_bf16(&row[2 * n..], &x[n..])
}

/// # Safety
/// Needs AVX-512F; `row.len() == 2 · x.len()`.
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn dot_bf16_avx512(row: &[u8], x: &[f32]) -> f32 {
    let n = x.len() / 16 * 16;
    let mut acc = _mm512_setzero_ps();
    let mut i = 0;
    while i < n {
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(row.as_ptr().add(2 * i + PREFETCH) as *const i8);
            let w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(
                row.as_ptr().add(2 * i) as *const __m256i
            ));
            let w = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x.as_ptr().add(i)), acc);
        }
        i += 16;
    }
    _mm512_reduce_add_ps(acc) + super::scalar::dot_bf16(&row[2 * n..], &x[n..])
}

// ---- four tokens per pass ----

/// # Safety
/// Needs AVX-512F; see the module note on lengths (for every token's slices).
#[target_feature(enable = "avx512f,avx2,fma")]
pub unsafe fn dot4_f32_avx512_x4(
    packed: &[u8],
    x: [&[f32]; 4],
    scales: &[f32],
    group: usize,
) -> [f32; 4] {
    let mut acc = [_mm512_setzero_ps(); 4];
    let p = packed.as_ptr();
    let cvt = |v: __m128i| _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
    for (g, &s) in scales.iter().enumerate() {
        let mut a = [_mm512_setzero_ps(); 4];
        let (base, end) = (g * group, (g + 1) * group);
        unsafe {
            if group == 32 {
                let b = _mm_loadu_si128(p.add(base / 2) as *const __m128i);
                let m = _mm_set1_epi8(0x0f);
                let f = [
                    cvt(_mm_and_si128(b, m)),
                    cvt(_mm_and_si128(_mm_srli_epi16(b, 4), m)),
                ];
                for k in 0..4 {
                    let xp = x[k].as_ptr().add(base);
                    a[k] = _mm512_fmadd_ps(f[0], _mm512_loadu_ps(xp), a[k]);
                    a[k] = _mm512_fmadd_ps(f[1], _mm512_loadu_ps(xp.add(16)), a[k]);
                }
            } else {
                let mut j = base;
                while j < end {
                    let (lo, hi) =
                        split_nibbles(_mm256_loadu_si256(p.add(j / 2) as *const __m256i));
                    let f = [
                        cvt(_mm256_castsi256_si128(lo)),
                        cvt(_mm256_extracti128_si256(lo, 1)),
                        cvt(_mm256_castsi256_si128(hi)),
                        cvt(_mm256_extracti128_si256(hi, 1)),
                    ];
                    for k in 0..4 {
                        let xp = x[k].as_ptr().add(j);
                        for (q, fq) in f.iter().enumerate() {
                            a[k] = _mm512_fmadd_ps(*fq, _mm512_loadu_ps(xp.add(16 * q)), a[k]);
                        }
                    }
                    j += 64;
                }
            }
        }
        for k in 0..4 {
            acc[k] = _mm512_fmadd_ps(a[k], _mm512_set1_ps(s), acc[k]);
        }
    }
    [0, 1, 2, 3].map(|k| _mm512_reduce_add_ps(acc[k]))
}
