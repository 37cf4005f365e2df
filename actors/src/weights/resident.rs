//! Resident weights: anonymous memory advised for transparent huge pages, into which the loader copies the
//! bytes this node owns (only those: a node of an expert-split cluster holds a fraction of each file).
//!
//! Served from the mapped checkpoint instead, every 4 KB of a weight stream is a new page: a TLB miss, and
//! the L2 streamer, which stops at page boundaries, starts over. On the bench model (2 vCPU, Linux, THP in
//! `madvise` mode) copying raised decode from ~50 to ~62 tokens/s.

use crate::error::{Error, Result};
use memmap2::MmapMut;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ops::{Deref, Range};
use std::sync::{Arc, Mutex};

/// Where the arena's chunks start: a huge page.
const HUGE_PAGE: usize = 2 << 20;
/// A chunk holds many matrices; one larger than a quarter of this gets a chunk of its own.
const CHUNK: usize = 64 << 20;

/// Hands out copies of weight bytes from huge-page chunks, filled front to back: one chunk at a time per
/// stream ([`in_stream`]), so the matrices one loader thread writes lie in the order it loads them.
#[derive(Default)]
pub struct Arena {
    /// Per stream, the chunk being filled and its fill mark.
    current: Mutex<BTreeMap<usize, (Arc<Chunk>, usize)>>,
}

thread_local! {
    static STREAM: Cell<usize> = const { Cell::new(0) };
}

/// Runs `f` with this thread's arena fills in stream `stream` (0 unless set). Loader threads that share an
/// arena each take their own stream: interleaving their matrices in one chunk measured slower (decode of the
/// bench model, three runs each: 79.6–81.3 tok/s in load order, 77.4–77.7 interleaved).
pub fn in_stream<T>(stream: usize, f: impl FnOnce() -> T) -> T {
    let before = STREAM.replace(stream);
    let out = f();
    STREAM.set(before);
    out
}

/// One anonymous mapping (untouched pages cost no memory); bytes below the fill mark are handed out and
/// never written again.
struct Chunk {
    _map: MmapMut,
    /// The first byte on a huge-page boundary, and the bytes usable from it.
    base: *mut u8,
    len: usize,
}

// SAFETY: `Chunk` is written only through `Arena::fill`, each range by the one call that reserved it under
// the arena's lock (above the fill mark); the ranges handed out are read-only from then on.
unsafe impl Sync for Chunk {}
unsafe impl Send for Chunk {}

impl Chunk {
    fn new(len: usize) -> Result<Chunk> {
        let mut map = MmapMut::map_anon(len + HUGE_PAGE)
            .map_err(|e| Error::Invalid(format!("allocating {len} bytes of weight memory: {e}")))?;
        // Only a hint: without transparent huge pages the copy still works, on 4 KB pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let start = map.as_mut_ptr().align_offset(HUGE_PAGE).min(HUGE_PAGE);
        // SAFETY: `start + len` is within the `len + HUGE_PAGE` bytes mapped.
        let base = unsafe { map.as_mut_ptr().add(start) };
        Ok(Chunk {
            _map: map,
            base,
            len,
        })
    }

    fn bytes(&self, r: Range<usize>) -> &[u8] {
        assert!(r.start <= r.end && r.end <= self.len);
        // SAFETY: in bounds (above); the bytes were written before this range was handed out.
        unsafe { std::slice::from_raw_parts(self.base.add(r.start), r.len()) }
    }
}

impl Arena {
    /// A resident copy of `bytes`, 64-byte aligned.
    pub fn copy(&self, bytes: &[u8]) -> Result<ResidentBytes> {
        self.fill(bytes.len(), |dst| dst.copy_from_slice(bytes))
    }

    /// `n` resident bytes, 64-byte aligned, written by `f`. The range is reserved under the lock and written
    /// outside it, so loader threads fill their ranges at the same time.
    pub fn fill(&self, n: usize, f: impl FnOnce(&mut [u8])) -> Result<ResidentBytes> {
        let (chunk, at) = if n > CHUNK / 4 {
            (Arc::new(Chunk::new(n)?), 0)
        } else {
            let mut current = self
                .current
                .lock()
                .map_err(|_| Error::Invalid("the weight arena's lock was poisoned".into()))?;
            let fits = |c: &(Arc<Chunk>, usize)| c.1.next_multiple_of(64) + n <= c.0.len;
            let stream = STREAM.get();
            if !current.get(&stream).is_some_and(fits) {
                current.insert(stream, (Arc::new(Chunk::new(CHUNK)?), 0));
            }
            let Some((chunk, used)) = current.get_mut(&stream) else {
                return Err(Error::Invalid("the weight arena has no chunk".into()));
            };
            let at = used.next_multiple_of(64);
            *used = at + n;
            (chunk.clone(), at)
        };
        // SAFETY: `at..at + n` lies inside the mapping and was reserved above for this call alone (a fill mark
        // only grows, under the lock, or the chunk is new): no other writer touches it, and no reader has it
        // until it is handed out below.
        f(unsafe { std::slice::from_raw_parts_mut(chunk.base.add(at), n) });
        Ok(ResidentBytes {
            chunk,
            range: at..at + n,
        })
    }
}

/// A range of an arena's chunk that keeps the chunk alive; derefs to the bytes.
#[derive(Clone)]
pub struct ResidentBytes {
    chunk: Arc<Chunk>,
    range: Range<usize>,
}

impl ResidentBytes {
    /// A sub-range, relative to this one.
    pub fn slice(&self, r: Range<usize>) -> ResidentBytes {
        debug_assert!(r.end <= self.range.len());
        ResidentBytes {
            chunk: self.chunk.clone(),
            range: self.range.start + r.start..self.range.start + r.end,
        }
    }
}

impl Deref for ResidentBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.chunk.bytes(self.range.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_their_bytes_across_chunks() {
        let arena = Arena::default();
        let small: Vec<u8> = (0..1000u32).map(|i| (i % 251) as u8).collect();
        let big = vec![7u8; CHUNK + 1];
        let a = arena.copy(&small).unwrap();
        let b = arena.copy(&big).unwrap();
        let c = arena.copy(&small[..3]).unwrap();
        assert_eq!(&a[..], &small[..]);
        assert_eq!((b.len(), b[0], b[CHUNK]), (CHUNK + 1, 7, 7));
        assert_eq!(&c[..], &small[..3]);
        assert_eq!(&a.slice(10..20)[..], &small[10..20]);
        for r in [&a, &b, &c] {
            assert_eq!(r.as_ptr() as usize % 64, 0);
        }
    }

    /// Each stream fills its own chunk in order, whatever the other streams fill between; threads in
    /// different streams fill at the same time and every copy keeps its bytes.
    #[test]
    fn streams_fill_their_own_chunks_in_order() {
        let arena = Arena::default();
        let a = in_stream(1, || arena.copy(&[1; 100])).unwrap();
        let b = arena.copy(&[2; 100]).unwrap();
        let c = in_stream(1, || arena.copy(&[3; 100])).unwrap();
        assert_eq!(c.as_ptr() as usize, a.as_ptr() as usize + 128);
        assert_eq!((a[99], b[99], c[99]), (1, 2, 3));

        let copies: Vec<Vec<ResidentBytes>> = std::thread::scope(|s| {
            let arena = &arena;
            let handles: Vec<_> = (0..4u8)
                .map(|k| {
                    s.spawn(move || {
                        in_stream(k as usize, || {
                            (0..200)
                                .map(|i| arena.copy(&[k ^ i as u8; 1000]).unwrap())
                                .collect()
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (k, copies) in copies.iter().enumerate() {
            for (i, r) in copies.iter().enumerate() {
                assert!(
                    r.iter().all(|&v| v == k as u8 ^ i as u8),
                    "stream {k}, copy {i}"
                );
            }
        }
    }
}
