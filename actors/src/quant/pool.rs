//! The kernels' thread pool. A decode step is a chain of short parallel regions (one per projection stage,
//! ~50 per token) separated by short sequential work; workers that went to sleep in between would be woken
//! at the start of every region and miss much of it. Here workers spin (yielding) for a while after a region
//! before they park, and the calling thread takes tasks too; it never waits for a worker that did not join.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps looking for the next region before it parks, by default.
const SPIN: Duration = Duration::from_millis(3);

/// The current spin time in µs: `KIMI_SPIN_US`, [`set_spin`], or [`SPIN`].
static SPIN_US: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets how long idle workers spin before parking. Processes sharing cores (several nodes of a placement
/// on one machine) should not spin: a spinning worker takes a core another process needs.
pub fn set_spin(d: Duration) {
    SPIN_US.store(d.as_micros() as usize, Ordering::Relaxed);
}

fn spin_time() -> Duration {
    let us = SPIN_US.load(Ordering::Relaxed);
    if us != usize::MAX {
        return Duration::from_micros(us as u64);
    }
    match std::env::var("KIMI_SPIN_US")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        Some(v) => {
            SPIN_US.store(v as usize, Ordering::Relaxed);
            Duration::from_micros(v)
        }
        None => SPIN,
    }
}

const CLOSED: usize = 1 << (usize::BITS - 1);

/// The work of one region: `run(i)` for each task index `i < tasks`.
type Work = *const (dyn Fn(usize) + Sync);

struct Shared {
    /// Bumped for each region; workers watch it.
    generation: AtomicUsize,
    next: AtomicUsize,
    tasks: AtomicUsize,
    /// Workers inside the current region, plus [`CLOSED`] once the caller has run out of tasks: a worker that
    /// arrives after that stays out, so the caller never waits for a worker that was asleep.
    active: AtomicUsize,
    work: Mutex<Option<SendWork>>,
    /// A task panicked on a worker; the caller re-raises it.
    panicked: std::sync::atomic::AtomicBool,
    parked: Mutex<usize>,
    wake: Condvar,
    /// Byte ranges the next region will read ([`Pool::prefetch`]), new when `hint_gen` moves.
    hint: Mutex<Vec<(usize, usize)>>,
    hint_gen: AtomicUsize,
}

#[derive(Clone, Copy)]
struct SendWork(Work);
// SAFETY: the pointee is `Sync` and outlives every use: `run` waits for all workers before returning.
unsafe impl Send for SendWork {}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    /// One region at a time (several actors in one process may call in concurrently).
    region: Mutex<()>,
}

impl Pool {
    /// The process-wide pool: one worker per core besides the caller (`KIMI_THREADS` overrides the total).
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| {
            let threads = std::env::var("KIMI_THREADS")
                .ok()
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
            Pool::new(threads.max(1) - 1)
        })
    }

    fn new(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            generation: AtomicUsize::new(0),
            next: AtomicUsize::new(0),
            tasks: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            work: Mutex::new(None),
            panicked: std::sync::atomic::AtomicBool::new(false),
            parked: Mutex::new(0),
            wake: Condvar::new(),
            hint: Mutex::new(Vec::new()),
            hint_gen: AtomicUsize::new(0),
        });
        for i in 0..workers {
            let s = shared.clone();
            // A worker that cannot start only means fewer threads; the caller still runs every task.
            let _ = std::thread::Builder::new()
                .name(format!("kimi-kernel-{i}"))
                .spawn(move || worker(&s));
        }
        Pool {
            shared,
            workers,
            region: Mutex::new(()),
        }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` for every `i < tasks` on the workers and the calling thread; returns when all are done.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.workers == 0 || tasks <= 1 {
            (0..tasks).for_each(f);
            return;
        }
        let _region = self.region.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        // SAFETY: erases the borrow's lifetime; the pointer is cleared before this function returns, after every
        // worker counted in `active` has left, and no worker enters once the region is closed.
        let work: Work = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), Work>(f) };
        *s.work.lock().unwrap_or_else(|e| e.into_inner()) = Some(SendWork(work));
        s.tasks.store(tasks, Ordering::Relaxed);
        s.next.store(0, Ordering::Relaxed);
        // Open the region (a late worker of the last one may still be backing out: keep its count).
        s.active.fetch_and(!CLOSED, Ordering::SeqCst);
        s.generation.fetch_add(1, Ordering::Release);
        if *s.parked.lock().unwrap_or_else(|e| e.into_inner()) > 0 {
            s.wake.notify_all();
        }
        take_tasks(s, f);
        s.active.fetch_or(CLOSED, Ordering::SeqCst);
        while s.active.load(Ordering::Acquire) & !CLOSED != 0 {
            std::hint::spin_loop();
        }
        *s.work.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a kernel task panicked on a worker thread");
        }
    }

    /// Memory the next region will read, as `(address, bytes)`: a worker waiting for that region prefetches
    /// it into its cache, and stops as soon as the region starts. Any address will do (a prefetch never
    /// faults); only x86-64 prefetches.
    pub fn prefetch(&self, ranges: Vec<(usize, usize)>) {
        if self.workers == 0 || !cfg!(target_arch = "x86_64") {
            return;
        }
        *self.shared.hint.lock().unwrap_or_else(|e| e.into_inner()) = ranges;
        self.shared.hint_gen.fetch_add(1, Ordering::Release);
    }

    /// `f(i)` for every `i < n`, run as [`Pool::run`] tasks, in order.
    pub fn map<T: Send + Sync>(&self, n: usize, f: &(dyn Fn(usize) -> T + Sync)) -> Vec<T> {
        let cells: Vec<OnceLock<T>> = (0..n).map(|_| OnceLock::new()).collect();
        self.run(n, &|i| {
            let _ = cells[i].set(f(i));
        });
        // Every task ran (`run` returns after all of them, or panics); a cell left empty is computed here.
        cells
            .into_iter()
            .enumerate()
            .map(|(i, c)| c.into_inner().unwrap_or_else(|| f(i)))
            .collect()
    }
}

fn take_tasks(s: &Shared, f: &(dyn Fn(usize) + Sync)) {
    let n = s.tasks.load(Ordering::Relaxed);
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

/// Prefetches the hinted ranges into this core's L2, a kilobyte at a time, until region `seen` is over.
fn prefetch_hint(s: &Shared, seen: usize) {
    let ranges = std::mem::take(&mut *s.hint.lock().unwrap_or_else(|e| e.into_inner()));
    for (start, len) in ranges {
        let end = start.saturating_add(len);
        for kb in (start..end).step_by(1024) {
            if s.generation.load(Ordering::Acquire) != seen {
                return;
            }
            for line in (kb..kb.saturating_add(1024).min(end)).step_by(64) {
                #[cfg(target_arch = "x86_64")]
                // SAFETY: SSE is part of x86-64; a prefetch never faults, whatever the address.
                unsafe {
                    use std::arch::x86_64::{_MM_HINT_T1, _mm_prefetch};
                    _mm_prefetch::<_MM_HINT_T1>(line as *const i8)
                };
                #[cfg(not(target_arch = "x86_64"))]
                let _ = line;
            }
        }
    }
}

fn worker(s: &Shared) {
    let (mut seen, mut seen_hint) = (0, 0);
    loop {
        // Spin, then park, until a new region starts.
        let start = Instant::now();
        let spin = spin_time();
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == seen {
            let hint = s.hint_gen.load(Ordering::Acquire);
            if hint != seen_hint {
                seen_hint = hint;
                prefetch_hint(s, seen);
                continue;
            }
            spins += 1;
            if spins.is_multiple_of(64) {
                if start.elapsed() > spin {
                    let mut parked = s.parked.lock().unwrap_or_else(|e| e.into_inner());
                    *parked += 1;
                    while s.generation.load(Ordering::Acquire) == seen {
                        parked = s.wake.wait(parked).unwrap_or_else(|e| e.into_inner());
                    }
                    *parked -= 1;
                    break;
                }
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
        seen = s.generation.load(Ordering::Acquire);
        if s.active.fetch_add(1, Ordering::SeqCst) & CLOSED != 0 {
            // The caller already ran every task.
            s.active.fetch_sub(1, Ordering::Release);
            continue;
        }
        let work = *s.work.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(SendWork(w)) = work {
            // SAFETY: see `Pool::run`; counted in `active`, this worker is waited for before the closure drops.
            let f = unsafe { &*w };
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| take_tasks(s, f))).is_err()
            {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.active.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn every_task_runs_once_across_many_regions() {
        let pool = Pool::new(3);
        for region in 0..200u64 {
            let hits: Vec<AtomicU64> = (0..37).map(|_| AtomicU64::new(0)).collect();
            pool.run(37, &|i| {
                hits[i].fetch_add(region + 1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == region + 1));
            if region % 50 == 0 {
                // Let the workers park, so the next region has to wake them.
                std::thread::sleep(SPIN * 2);
            }
        }
    }

    #[test]
    fn prefetch_hints_of_any_address_leave_regions_whole() {
        let pool = Pool::new(1);
        let data = vec![1u8; 1 << 20];
        for region in 0..100u64 {
            // Real memory, nothing, and addresses that are not mapped or run off the end of the address space.
            pool.prefetch(vec![
                (data.as_ptr() as usize, data.len()),
                (0, 0),
                (64, 1 << 16),
                (usize::MAX - 100, 4096),
            ]);
            if region % 10 == 0 {
                // Time for the worker to go through the hint before the region starts.
                std::thread::sleep(Duration::from_millis(1));
            }
            let hits: Vec<AtomicU64> = (0..23).map(|_| AtomicU64::new(0)).collect();
            pool.run(23, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        // The worker is still there (a panic while prefetching would have ended its thread, and the caller
        // would have run every task alone): tasks long enough for it to join take some on another thread.
        let caller = std::thread::current().id();
        let elsewhere = AtomicU64::new(0);
        pool.run(16, &|_| {
            std::thread::sleep(Duration::from_millis(5));
            if std::thread::current().id() != caller {
                elsewhere.fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(elsewhere.load(Ordering::Relaxed) > 0);
    }

    #[test]
    fn concurrent_callers_take_turns() {
        let pool = Arc::new(Pool::new(1));
        let total = Arc::new(AtomicU64::new(0));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (pool, total) = (pool.clone(), total.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        pool.run(10, &|_| {
                            total.fetch_add(1, Ordering::Relaxed);
                        });
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 10);
    }
}
