//! Checkpoint files and the loader that turns tensors into the engine's matrices, whatever the layout
//! (HF or MLX names) and format (bf16/f16/f32, FP8 blocks, MLX affine).

mod checkpoint;
mod loader;
mod resident;

pub use checkpoint::{Checkpoint, MappedBytes, TensorView};
pub use loader::{LoadOptions, QuantizeTo, Weights};
pub use resident::{Arena, ResidentBytes, in_stream};

use std::ops::Deref;
use std::sync::Arc;

/// Weight bytes: a range of a mapped checkpoint file, a resident copy of one, or bytes the engine made
/// (quantized at load, synthesized).
#[derive(Clone)]
pub enum Buf {
    Mapped(MappedBytes),
    Resident(ResidentBytes),
    Owned(Arc<[u8]>),
}

impl Buf {
    pub fn owned(v: Vec<u8>) -> Buf {
        Buf::Owned(v.into())
    }

    /// A sub-range, relative to this buffer.
    pub fn slice(&self, r: std::ops::Range<usize>) -> Buf {
        match self {
            Buf::Mapped(m) => Buf::Mapped(m.slice(r)),
            Buf::Resident(m) => Buf::Resident(m.slice(r)),
            Buf::Owned(v) => Buf::owned(v[r].to_vec()),
        }
    }
}

impl Deref for Buf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Buf::Mapped(m) => m,
            Buf::Resident(m) => m,
            Buf::Owned(v) => v,
        }
    }
}
