//! The MLA cache of one sequence in one layer: per token only the normalized latent (`kv_lora_rank`) and the
//! rotated key (`qk_rope_head_dim`), stored as one row `[latent | k_pe]` — 576 floats per token per layer
//! for Kimi-K2 instead of 2 × 64 heads × 128 for a plain multi-head cache.

use crate::error::Result;
use candle_core::{DType, Device, Tensor};

/// Rows the buffer grows by; growth doubles past this.
const MIN_CAPACITY: usize = 64;

#[derive(Clone)]
pub struct LatentCache {
    buf: Tensor,
    len: usize,
    width: usize,
}

impl LatentCache {
    pub fn new(width: usize) -> Result<LatentCache> {
        Ok(LatentCache {
            buf: Tensor::zeros((MIN_CAPACITY, width), DType::F32, &Device::Cpu)?,
            len: 0,
            width,
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes held (capacity, not length).
    pub fn bytes(&self) -> usize {
        self.buf.elem_count() * 4
    }

    /// Appends `rows: [n, width]`.
    pub fn append(&mut self, rows: &Tensor) -> Result<()> {
        let n = rows.dims()[0];
        let cap = self.buf.dims()[0];
        if self.len + n > cap {
            let new_cap = (self.len + n).max(cap * 2);
            let grown = Tensor::zeros((new_cap, self.width), DType::F32, &Device::Cpu)?;
            grown.slice_set(&self.view()?, 0, 0)?;
            self.buf = grown;
        }
        self.buf.slice_set(&rows.contiguous()?, 0, self.len)?;
        self.len += n;
        Ok(())
    }

    /// The cached rows `[len, width]` (a view, no copy).
    pub fn view(&self) -> Result<Tensor> {
        Ok(self.buf.narrow(0, 0, self.len)?)
    }

    /// A new cache holding a copy of the first `len` tokens (clones of a tensor share its storage, and
    /// appends write in place, so a shared prefix must be copied).
    pub fn prefix(&self, len: usize) -> Result<LatentCache> {
        let mut c = LatentCache::new(self.width)?;
        let len = len.min(self.len);
        if len > 0 {
            c.append(&self.buf.narrow(0, 0, len)?.copy()?)?;
        }
        Ok(c)
    }
}

/// The caches of one sequence, one per layer.
#[derive(Clone)]
pub struct SequenceCache {
    pub layers: Vec<LatentCache>,
}

impl SequenceCache {
    pub fn new(layers: usize, width: usize) -> Result<SequenceCache> {
        Ok(SequenceCache {
            layers: (0..layers)
                .map(|_| LatentCache::new(width))
                .collect::<Result<_>>()?,
        })
    }

    /// Tokens cached (every layer holds the same number).
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_grows_and_keeps_rows() {
        let mut c = LatentCache::new(3).unwrap();
        for i in 0..100 {
            let row = Tensor::from_vec(vec![i as f32; 3], (1, 3), &Device::Cpu).unwrap();
            c.append(&row).unwrap();
        }
        let block = Tensor::from_vec(
            (0..30).map(|v| v as f32).collect::<Vec<_>>(),
            (10, 3),
            &Device::Cpu,
        )
        .unwrap();
        c.append(&block).unwrap();
        assert_eq!(c.len(), 110);
        let v = c.view().unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(v[99], vec![99.0; 3]);
        assert_eq!(v[100], vec![0.0, 1.0, 2.0]);
        let mut p = c.prefix(50).unwrap();
        assert_eq!(p.view().unwrap().dims(), &[50, 3]);
        // Appending to the copy leaves the original alone.
        p.append(&Tensor::from_vec(vec![-1f32; 3], (1, 3), &Device::Cpu).unwrap())
            .unwrap();
        assert_eq!(
            c.view().unwrap().to_vec2::<f32>().unwrap()[50],
            vec![50.0; 3]
        );
    }
}
