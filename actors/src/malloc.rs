//! The C allocator's settings for the engine's working memory. A prefill allocates and frees tens of MB of
//! activations, prepared inputs and outputs per layer; glibc's defaults hand much of it back to the kernel as
//! soon as it is freed (trimming the heap top, shrinking thread arenas) and serve blocks over 128 KB by fresh
//! `mmap`s, so the next layer faults the same memory in again, a zeroed page at a time: ~6,500 page faults
//! per 64-token prefill of the bench model. Keeping 16 MB of freed memory per arena, and serving blocks of up
//! to 32 MB from the heap, leaves ~1,900.

/// Applies the settings, unless the user set glibc's own (`MALLOC_*_` variables or `GLIBC_TUNABLES`). Call it
/// first thing in `main`. Other allocators (macOS, musl) are left as they are.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let user_set = std::env::vars_os().any(|(k, _)| {
            k.to_str().is_some_and(|k| {
                k == "GLIBC_TUNABLES" || (k.starts_with("MALLOC_") && k.ends_with('_'))
            })
        });
        if !user_set {
            apply();
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() {
    // SAFETY: `mallopt` only changes the allocator's parameters; both values are in range.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TOP_PAD, 16 << 20);
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// Minor page faults of the calling thread so far.
    fn thread_faults() -> libc::c_long {
        // SAFETY: `getrusage` fills the struct it is given.
        unsafe {
            let mut r: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut r);
            r.ru_minflt
        }
    }

    /// A layer's worth of working buffers, as a prefill's: allocated, written, freed.
    fn layer() {
        let sizes = [4 << 20, 1 << 20, 1 << 20, 600 << 10, 200 << 10, 2 << 20];
        let bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![1u8; n]).collect();
        std::hint::black_box(&bufs);
    }

    #[test]
    fn a_layer_s_buffers_do_not_fault_in_again() {
        // The settings themselves, whatever `MALLOC_*_` variables the test's environment holds.
        super::apply();
        // A fresh thread: its own arena, as the kernels' pool workers have.
        let faults = std::thread::spawn(|| {
            layer();
            let before = thread_faults();
            for _ in 0..4 {
                layer();
            }
            thread_faults() - before
        })
        .join()
        .unwrap();
        // Without the settings every round faults all of its 8.8 MB in again (~2,200 pages).
        assert!(faults < 200, "{faults} page faults over four rounds");
    }
}
