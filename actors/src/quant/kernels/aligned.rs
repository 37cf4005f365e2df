//! Activation buffers that start on a 64-byte boundary: the kernels load activations 64 bytes at a time, and
//! a load that straddles two cache lines costs two.

use std::ops::{Deref, DerefMut};

/// `len` values of `T` from a 64-byte boundary, inside a slightly larger vector.
pub(super) struct Aligned<T> {
    buf: Vec<T>,
    at: usize,
    len: usize,
}

impl<T: Copy + Default> Aligned<T> {
    /// `len` default values (zeros for numbers).
    pub(super) fn zeroed(len: usize) -> Aligned<T> {
        let pad = 64 / size_of::<T>().max(1);
        let buf = vec![T::default(); len + pad];
        // `align_offset` is below `pad` for the kernels' types; it may be `usize::MAX` in general, and then
        // the values are merely unaligned.
        let at = buf.as_ptr().align_offset(64).min(pad);
        Aligned { buf, at, len }
    }

    pub(super) fn from_slice(v: &[T]) -> Aligned<T> {
        let mut a = Aligned::zeroed(v.len());
        a.copy_from_slice(v);
        a
    }
}

impl<T> Deref for Aligned<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.buf[self.at..self.at + self.len]
    }
}

impl<T> DerefMut for Aligned<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.buf[self.at..self.at + self.len]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_start_on_64_bytes_and_keep_their_length() {
        for len in [0, 1, 17, 4096] {
            let a = Aligned::<f32>::from_slice(&vec![1.5; len]);
            assert_eq!(a.len(), len);
            assert!(a.iter().all(|&v| v == 1.5));
            assert_eq!(a.as_ptr() as usize % 64, 0);
            let b = Aligned::<i8>::zeroed(len);
            assert_eq!((b.len(), b.as_ptr() as usize % 64), (len, 0));
        }
    }
}
