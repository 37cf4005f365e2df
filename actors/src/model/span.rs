//! One span of a decode step's attention with AVX-512: a few queries against a span of the cached latents,
//! read in place, each key once from memory (in blocks that stay in L2 from their scores to their values).
//! candle's gemm packs the span (its keys transposed, its values) on every call.

use super::attention::Span;
use crate::model::exp::exp;
use crate::quant::kernels::{Isa, lane_sums16};
use std::arch::x86_64::*;
use std::ops::Range;

/// Queries per block: each key (or value) loaded serves this many.
const R: usize = 4;
/// Keys per block of the scores: each query chunk loaded serves this many.
const K: usize = 4;
/// Floats of the values per block of the weighted sums (four registers).
const V: usize = 64;
/// Keys ahead of a block of the scores to prefetch: the hardware does not fetch four interleaved rows far
/// enough ahead. One span of 1024 bench-model keys from memory in a probe: 570 µs → 390–480 µs (8 keys
/// ahead: 450, 32: 460–500).
const AHEAD: usize = 16;
/// Keys per block: 64 of Kimi-K2's 576 floats are 147 KB.
const KEYS_IN_L2: usize = 64;

/// Whether [`span`] runs here.
pub fn available() -> bool {
    matches!(Isa::detect(), Isa::Avx512 | Isa::Amx)
}

/// Queries `query: [rows, d]` against keys `keys` of the cache `kv: [n, d]`, whose first `r` floats are
/// each key's value: per row the weights `exp(scale·score - largest)` of the keys it sees (the span's first
/// `visible(row)`; the rest weigh 0) and the values they weigh. Needs [`available`].
pub fn span(
    query: &[f32],
    kv: &[f32],
    (d, r): (usize, usize),
    keys: Range<usize>,
    visible: impl Fn(usize) -> usize,
    scale: f32,
) -> Span {
    assert!(available(), "the span kernels need AVX-512");
    let rows = query.len() / d;
    let nk = keys.len();
    let q: Vec<&[f32]> = query.chunks_exact(d).collect();
    let k: Vec<&[f32]> = kv[keys.start * d..keys.end * d].chunks_exact(d).collect();
    let (mut largest, mut sums) = (vec![f32::NEG_INFINITY; rows], vec![0f32; rows]);
    let mut weighted = vec![0f32; rows * r];
    let mut scores = vec![0f32; rows * KEYS_IN_L2.min(nk)];
    // Keys in blocks that stay in L2 from their scores to their values, so each is read from memory once. A
    // row's weights in a block are taken against the block's largest score, then brought to the largest so
    // far (rescaling the sums before them where the block's is larger).
    for b0 in (0..nk).step_by(KEYS_IN_L2) {
        let kb = &k[b0..(b0 + KEYS_IN_L2).min(nk)];
        let nb = kb.len();
        // Keys outermost: each serves every block of queries from L1.
        for j0 in (0..nb).step_by(K) {
            for i0 in (0..rows).step_by(R) {
                if i0 + R <= rows && j0 + K <= nb {
                    // SAFETY: AVX-512 F was detected.
                    let s = unsafe { dots(&q[i0..i0 + R], &kb[j0..j0 + K], i0 == 0) };
                    for (i, s) in s.chunks_exact(K).enumerate() {
                        scores[(i0 + i) * nb + j0..][..K].copy_from_slice(s);
                    }
                    continue;
                }
                for i in i0..(i0 + R).min(rows) {
                    for j in j0..(j0 + K).min(nb) {
                        scores[i * nb + j] = q[i].iter().zip(kb[j]).map(|(a, b)| a * b).sum();
                    }
                }
            }
        }
        for (row, s) in scores[..rows * nb].chunks_exact_mut(nb).enumerate() {
            let (seen, hidden) = s.split_at_mut(visible(row).saturating_sub(b0).min(nb));
            let (block_largest, mut sum) = super::attention::exp_from_largest(seen, scale);
            hidden.fill(0.0);
            if block_largest == f32::NEG_INFINITY {
                continue; // the row sees none of this block
            }
            if block_largest > largest[row] {
                let f = exp(largest[row] - block_largest);
                weighted[row * r..(row + 1) * r]
                    .iter_mut()
                    .for_each(|w| *w *= f);
                sums[row] *= f;
                largest[row] = block_largest;
            } else {
                let f = exp(block_largest - largest[row]);
                seen.iter_mut().for_each(|p| *p *= f);
                sum *= f;
            }
            sums[row] += sum;
        }
        let p: Vec<&[f32]> = scores[..rows * nb].chunks_exact(nb).collect();
        for i0 in (0..rows).step_by(R) {
            for c0 in (0..r).step_by(V) {
                if i0 + R <= rows && c0 + V <= r {
                    // SAFETY: AVX-512 F was detected.
                    unsafe { weigh(&p[i0..i0 + R], kb, c0, &mut weighted[i0 * r..], r) };
                    continue;
                }
                let width = (r - c0).min(V);
                for i in i0..(i0 + R).min(rows) {
                    let out = &mut weighted[i * r + c0..][..width];
                    for (pj, key) in p[i].iter().zip(kb) {
                        for (o, v) in out.iter_mut().zip(&key[c0..c0 + width]) {
                            *o += pj * v;
                        }
                    }
                }
            }
        }
    }
    Span {
        weighted,
        largest,
        sums,
    }
}

/// The `R × K` dot products of queries `q` and keys `k` (row-major): per pair sixteen lanes over the
/// whole sixteens of floats, the lanes summed together, then the remainder. `ahead`: prefetch the keys
/// [`AHEAD`] on.
#[target_feature(enable = "avx512f")]
fn dots(q: &[&[f32]], k: &[&[f32]], ahead: bool) -> [f32; R * K] {
    let d = q[0].len();
    let whole = d / 16 * 16;
    let mut acc = [_mm512_setzero_ps(); R * K];
    for c in (0..whole).step_by(16) {
        let mut kc = [_mm512_setzero_ps(); K];
        for j in 0..K {
            // SAFETY: `c + 16 <= d`, the length of every query and key.
            kc[j] = unsafe { _mm512_loadu_ps(k[j][c..c + 16].as_ptr()) };
        }
        if ahead {
            for key in k {
                // Keys `AHEAD` on follow these in the cache: a prefetch leaves their slices, which a
                // prefetch tolerates and `add` must not.
                _mm_prefetch::<_MM_HINT_T0>(key.as_ptr().wrapping_add(AHEAD * d + c) as *const i8);
            }
        }
        for i in 0..R {
            // SAFETY: as above.
            let qc = unsafe { _mm512_loadu_ps(q[i][c..c + 16].as_ptr()) };
            for j in 0..K {
                acc[i * K + j] = _mm512_fmadd_ps(qc, kc[j], acc[i * K + j]);
            }
        }
    }
    let mut out = [0f32; R * K];
    // SAFETY: sixteen floats.
    unsafe { _mm512_storeu_ps(out.as_mut_ptr(), lane_sums16(&acc)) };
    for i in 0..R {
        for j in 0..K {
            out[i * K + j] += q[i][whole..]
                .iter()
                .zip(&k[j][whole..])
                .map(|(a, b)| a * b)
                .sum::<f32>();
        }
    }
    out
}

/// Adds floats `c0..c0 + V` of `Σ_j p[i][j] · k[j]` to rows `i < R` of `out` (`[R, r]`).
#[target_feature(enable = "avx512f")]
fn weigh(p: &[&[f32]], k: &[&[f32]], c0: usize, out: &mut [f32], r: usize) {
    let mut acc = [_mm512_setzero_ps(); R * V / 16];
    for i in 0..R {
        for c in 0..V / 16 {
            // SAFETY: row `i < R` of `out` holds floats `c0..c0 + V`.
            acc[i * V / 16 + c] =
                unsafe { _mm512_loadu_ps(out[i * r + c0 + 16 * c..][..16].as_ptr()) };
        }
    }
    for (j, key) in k.iter().enumerate() {
        let v = &key[c0..c0 + V];
        let mut vc = [_mm512_setzero_ps(); V / 16];
        for c in 0..V / 16 {
            // SAFETY: `v` holds `V` floats.
            vc[c] = unsafe { _mm512_loadu_ps(v[16 * c..16 * c + 16].as_ptr()) };
        }
        for i in 0..R {
            let pj = _mm512_set1_ps(p[i][j]);
            for c in 0..V / 16 {
                acc[i * V / 16 + c] = _mm512_fmadd_ps(pj, vc[c], acc[i * V / 16 + c]);
            }
        }
    }
    for i in 0..R {
        for c in 0..V / 16 {
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_ps(
                    out[i * r + c0 + 16 * c..][..16].as_mut_ptr(),
                    acc[i * V / 16 + c],
                )
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain loop: blocks of queries, keys and values and their remainders (rows 9 = 2·4 + 1,
    /// spans of 2 to 150 keys: up to three blocks of [`KEYS_IN_L2`], the last partial; value width 2·64 + 24,
    /// key width 16·11 + 8), rows that see the first keys only, and a row that sees none of the span.
    #[test]
    fn span_matches_a_plain_loop() {
        if !available() {
            return;
        }
        let (rows, r, e, n) = (9, 152, 32, 150);
        let d = r + e;
        let val = |i: usize, m: usize| ((i * 7919 % m) as f32 / m as f32) - 0.5;
        let query: Vec<f32> = (0..rows * d).map(|i| val(i, 613)).collect();
        let kv: Vec<f32> = (0..n * d).map(|i| val(i, 827)).collect();
        let scale = 0.3;
        for keys in [0..n, 7..140, 12..14, 60..75] {
            let nk = keys.len();
            let visible = |row: usize| if row == 4 { 0 } else { (row * 19 + 1).min(nk) };
            let got = span(&query, &kv, (d, r), keys.clone(), visible, scale);
            for row in 0..rows {
                let seen = visible(row);
                let q = &query[row * d..(row + 1) * d];
                let scores: Vec<f32> = (0..seen)
                    .map(|j| {
                        let k = &kv[(keys.start + j) * d..][..d];
                        scale * q.iter().zip(k).map(|(a, b)| a * b).sum::<f32>()
                    })
                    .collect();
                let largest = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                let weights: Vec<f32> = scores.iter().map(|s| (s - largest).exp()).collect();
                let what = format!("keys {keys:?}, row {row}");
                assert_eq!(got.largest[row] == f32::NEG_INFINITY, seen == 0, "{what}");
                if seen > 0 {
                    assert!((got.largest[row] - largest).abs() < 1e-5, "{what}");
                }
                let sum: f32 = weights.iter().sum();
                assert!((got.sums[row] - sum).abs() < 1e-5 * sum.max(1.0), "{what}");
                for c in 0..r {
                    let want: f32 = (0..seen)
                        .map(|j| weights[j] * kv[(keys.start + j) * d + c])
                        .sum();
                    let g = got.weighted[row * r + c];
                    assert!(
                        (g - want).abs() < 1e-5,
                        "{what}, value {c}: {g} against {want}"
                    );
                }
            }
        }
    }
}
