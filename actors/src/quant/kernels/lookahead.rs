//! Which weights the next call will read. A decode step makes the same calls in the same order every token
//! (the routed experts aside), and between two calls the pool's workers wait while the calling thread does
//! sequential work (norms, rotary embeddings, attention over the cache, routing). Each call is remembered as
//! the successor of the call before it; when a call ends, the pool is told the first bytes its successor read
//! last time, and an idle worker prefetches them into its cache while the calling thread works alone.

use super::Weight;
use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

/// Bytes of a successor's weights prefetched: a few gaps' worth of one core's reading.
const HEAD_BYTES: usize = 512 << 10;

/// A call, by the address of its first matrix's weights.
type Key = usize;

#[derive(Default)]
struct Successors {
    last: Key,
    /// Per call, the byte ranges its successor started with.
    next: HashMap<Key, Vec<(usize, usize)>>,
}

impl Successors {
    /// Records the call `calls` as the successor of the previous call, and returns what the call after it
    /// read first last time, if known.
    fn record(&mut self, calls: &[Weight]) -> Option<Vec<(usize, usize)>> {
        let key = calls.first().map(|w| address(*w))?;
        let mut ranges = Vec::new();
        let mut left = HEAD_BYTES;
        for w in calls {
            if left == 0 {
                break;
            }
            head_ranges(*w, &mut left, &mut ranges);
        }
        let last = std::mem::replace(&mut self.last, key);
        self.next.insert(last, ranges);
        self.next.get(&key).cloned()
    }
}

/// The process's calls (one sequence of calls: concurrent callers only make the guesses worse).
static SUCCESSORS: LazyLock<Mutex<Successors>> = LazyLock::new(Mutex::default);

/// [`Successors::record`] on the process's calls.
pub(super) fn record(calls: &[Weight]) -> Option<Vec<(usize, usize)>> {
    SUCCESSORS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .record(calls)
}

fn address(w: Weight) -> Key {
    match w {
        Weight::Affine(m) => m.packed.as_ptr() as usize,
        Weight::Bf16(m) => m.data.as_ptr() as usize,
    }
}

/// The first rows of `w`, up to `left` bytes of codes, with their share of scales and biases.
fn head_ranges(w: Weight, left: &mut usize, out: &mut Vec<(usize, usize)>) {
    match w {
        Weight::Affine(m) => {
            let take = m.packed.len().min(*left);
            out.push((m.packed.as_ptr() as usize, take));
            for b in [&m.scales, &m.biases] {
                let share =
                    (b.len() as u128 * take as u128 / m.packed.len().max(1) as u128) as usize;
                out.push((b.as_ptr() as usize, share));
            }
            *left -= take;
        }
        Weight::Bf16(m) => {
            let take = m.data.len().min(*left);
            out.push((m.data.as_ptr() as usize, take));
            *left -= take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::affine::AffineMatrix;

    #[test]
    fn a_call_predicts_the_head_of_the_call_that_followed_it() {
        let m = |rows: usize, seed: usize| {
            let w: Vec<f32> = (0..rows * 256)
                .map(|i| ((i * 7 + seed) % 13) as f32 - 6.0)
                .collect();
            AffineMatrix::quantize(&w, rows, 256, 4, 64)
        };
        // `c` is bigger than the head that is prefetched.
        let (a, b, c) = (m(8, 1), m(16, 2), m(8192, 3));
        let job = |w: &AffineMatrix| -> Vec<(usize, usize)> {
            let mut s = Successors::default();
            let _ = s.record(&[Weight::Affine(w)]);
            s.next.remove(&0).unwrap_or_default()
        };
        let (head_a, head_b, head_c) = (job(&a), job(&b), job(&c));
        assert_eq!(head_b[0], (b.packed.as_ptr() as usize, b.packed.len()));
        assert_eq!(head_c[0], (c.packed.as_ptr() as usize, HEAD_BYTES));
        assert_eq!(head_c[1].1, c.scales.len() * HEAD_BYTES / c.packed.len());

        let mut s = Successors::default();
        let mut call = |w: &AffineMatrix| s.record(&[Weight::Affine(w)]);
        assert_eq!(call(&a), None);
        assert_eq!(call(&b), None);
        assert_eq!(call(&c), None);
        assert_eq!(call(&a), Some(head_b.clone()));
        assert_eq!(call(&c), Some(head_a), "c was followed by a");
        assert_eq!(call(&a), Some(head_c), "a's successor is now c");
    }
}
