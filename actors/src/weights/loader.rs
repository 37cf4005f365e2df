//! Resolves a module path (`model.layers.3.self_attn.q_b_proj`) to a [`Linear`], whatever the format of its
//! tensors, and checks every shape against the config. Stacked tensors (`switch_mlp` `[experts, out, in]`,
//! `embed_q` `[heads, out, in]`) are addressed by index so a caller loads only the slices it owns.

use crate::config::{AffineParams, ModelConfig, Quantization, SUPPORTED_BITS, SUPPORTED_GROUPS};
use crate::error::Result;
use crate::model::linear::Linear;
use crate::quant::affine::{AffineMatrix, ScaleType};
use crate::quant::bf16::Bf16Matrix;
use crate::quant::fp8;
use crate::quant::kernels::{self, Activations};
use crate::weights::checkpoint::{
    Checkpoint, MappedBytes, TensorView, floats_from_bytes, to_f32_vec,
};
use crate::weights::{Arena, Buf};
use safetensors::tensor::Dtype;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

pub struct Weights {
    pub config: ModelConfig,
    pub ckpt: Checkpoint,
    pub options: LoadOptions,
    /// Where the quantized and bf16 matrices are copied (unless `options.map_weights`).
    arena: Arena,
    /// Weight bytes made resident so far, and the tensors they came from (for progress reports).
    loaded: AtomicU64,
    tensors: AtomicU64,
}

/// How to hold what is loaded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The activation path of MLX affine matmuls (and of anything quantized at load).
    pub activations: Activations,
    /// Quantize dense (bf16/f16/f32/FP8) matrices at load into MLX affine, group 64 (router gates stay exact).
    pub quantize: Option<QuantizeTo>,
    /// Read MLX affine and bf16 matrices from the mapped checkpoint files in place, instead of copying them
    /// into huge-page memory ([`Arena`]): no copy at load, but slower matmuls (4 KB pages).
    pub map_weights: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantizeTo {
    Q8,
    Q4,
}

impl QuantizeTo {
    pub fn bits(self) -> u32 {
        match self {
            QuantizeTo::Q8 => 8,
            QuantizeTo::Q4 => 4,
        }
    }
}

/// Which matrix of a tensor: the whole 2-D tensor, or slice `index` of a stack of `count`.
#[derive(Clone, Copy)]
struct Slot {
    index: usize,
    count: Option<usize>,
}

impl Weights {
    pub fn open(dir: &Path) -> Result<Weights> {
        Weights::open_with(dir, LoadOptions::default())
    }

    pub fn open_with(dir: &Path, options: LoadOptions) -> Result<Weights> {
        let config = ModelConfig::load(dir)?;
        let ckpt = Checkpoint::open(dir)?;
        Ok(Weights {
            config,
            ckpt,
            options,
            arena: Arena::default(),
            loaded: AtomicU64::new(0),
            tensors: AtomicU64::new(0),
        })
    }

    /// Weight bytes made resident so far.
    pub fn loaded_bytes(&self) -> u64 {
        self.loaded.load(Ordering::Relaxed)
    }

    /// Matrices and vectors loaded so far.
    pub fn loaded_tensors(&self) -> u64 {
        self.tensors.load(Ordering::Relaxed)
    }

    /// A matrix that `--quantize` leaves exact (router gates: routing decisions stay those of the checkpoint).
    pub fn exact_matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Linear> {
        self.load_as(
            module,
            Slot {
                index: 0,
                count: None,
            },
            rows,
            cols,
            false,
        )
    }

    pub fn has(&self, name: &str) -> bool {
        self.ckpt.contains(name)
    }

    /// The 2-D matrix `{module}.weight`, `[rows, cols]` once dequantized.
    pub fn matrix(&self, module: &str, rows: usize, cols: usize) -> Result<Linear> {
        self.load(
            module,
            Slot {
                index: 0,
                count: None,
            },
            rows,
            cols,
        )
    }

    /// Matrix `index` of the stacked `{module}.weight` `[count, rows, cols]`.
    pub fn stacked(
        &self,
        module: &str,
        index: usize,
        count: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Linear> {
        self.load(
            module,
            Slot {
                index,
                count: Some(count),
            },
            rows,
            cols,
        )
    }

    /// A 1-D float tensor of `len` values (norm weights, the router's correction bias).
    pub fn vector(&self, name: &str, len: usize) -> Result<Vec<f32>> {
        let t = self.ckpt.get(name)?;
        if t.shape != [len] {
            return Err(t.err(format!(
                "shape {:?} disagrees with the config (expected [{len}])",
                t.shape
            )));
        }
        to_f32_vec(&t)
    }

    fn load(&self, module: &str, slot: Slot, rows: usize, cols: usize) -> Result<Linear> {
        self.load_as(module, slot, rows, cols, true)
    }

    fn load_as(
        &self,
        module: &str,
        slot: Slot,
        rows: usize,
        cols: usize,
        may_quantize: bool,
    ) -> Result<Linear> {
        let linear = match (self.read(module, slot, rows, cols)?, self.options.quantize) {
            (l @ (Linear::Dense(_) | Linear::Bf16(_)), Some(q))
                if may_quantize && cols.is_multiple_of(64) =>
            {
                let f: Vec<f32> = l.to_f32()?;
                let mut m = AffineMatrix::quantize(&f, rows, cols, q.bits(), 64);
                m.activations = self.options.activations;
                Linear::Affine(self.in_lanes(module, &m)?.unwrap_or(m))
            }
            (l, _) => l,
        };
        self.loaded
            .fetch_add(linear.weight_bytes() as u64, Ordering::Relaxed);
        self.tensors.fetch_add(1, Ordering::Relaxed);
        Ok(linear)
    }

    fn read(&self, module: &str, slot: Slot, rows: usize, cols: usize) -> Result<Linear> {
        let w = self.ckpt.get(&format!("{module}.weight"))?;
        match w.dtype {
            Dtype::U32 => self
                .affine(module, &w, slot, rows, cols)
                .map(Linear::Affine),
            Dtype::F8_E4M3 => self.fp8(module, &w, slot, rows, cols),
            Dtype::BF16 => {
                check_shape(&w, slot, &[rows, cols])?;
                let n = rows * cols * 2;
                let data = self.keep(w.bytes.slice(slot.index * n..(slot.index + 1) * n))?;
                Ok(Linear::Bf16(Bf16Matrix { rows, cols, data }))
            }
            Dtype::F16 | Dtype::F32 => {
                check_shape(&w, slot, &[rows, cols])?;
                let n = rows * cols * w.dtype.bitsize() / 8;
                let bytes = &w.bytes[slot.index * n..(slot.index + 1) * n];
                Linear::dense(floats_from_bytes(w.dtype, bytes), rows, cols)
            }
            other => Err(w.err(format!("dtype {other:?} is not a supported weight format"))),
        }
    }

    fn affine(
        &self,
        module: &str,
        w: &TensorView,
        slot: Slot,
        rows: usize,
        cols: usize,
    ) -> Result<AffineMatrix> {
        let scales = self.ckpt.get(&format!("{module}.scales"))?;
        let biases = self.ckpt.get(&format!("{module}.biases"))?;
        let inferred = infer_affine(w, &scales, cols)?;
        let configured = match &self.config.quantization {
            Quantization::Affine(a) => a.for_module(module),
            _ => None,
        };
        let params = match configured {
            Some(Some(p)) => p,
            Some(None) => {
                return Err(w.err(
                    "the config lists this module as unquantized but the tensor is U32-packed",
                ));
            }
            None => inferred,
        };
        if params != inferred {
            return Err(w.err(format!(
                "shapes {:?} / scales {:?} imply {}-bit group {} for {cols} columns, but the config says {}-bit group {}",
                w.shape, scales.shape, inferred.bits, inferred.group_size, params.bits, params.group_size
            )));
        }
        let packed_cols = cols * params.bits as usize / 32;
        let groups = cols / params.group_size;
        check_shape(w, slot, &[rows, packed_cols])?;
        check_shape(&scales, slot, &[rows, groups])?;
        check_shape(&biases, slot, &[rows, groups])?;
        let st = scale_type(&scales)?;
        if scale_type(&biases)? != st {
            return Err(biases.err("biases and scales have different dtypes"));
        }
        let sb = rows * groups * st.size();
        let pb = rows * packed_cols * 4;
        let i = slot.index;
        let (packed, scales, biases) = (
            w.bytes.slice(i * pb..(i + 1) * pb),
            scales.bytes.slice(i * sb..(i + 1) * sb),
            biases.bytes.slice(i * sb..(i + 1) * sb),
        );
        let m = AffineMatrix {
            rows,
            cols,
            bits: params.bits,
            group: params.group_size,
            packed: Buf::Mapped(packed.clone()),
            scales: Buf::Mapped(scales.clone()),
            biases: Buf::Mapped(biases.clone()),
            scale_type: st,
            activations: self.options.activations,
            lanes: false,
        };
        if let Some(m) = self.in_lanes(module, &m)? {
            return Ok(m);
        }
        Ok(AffineMatrix {
            packed: self.keep(packed)?,
            scales: self.keep(scales)?,
            biases: self.keep(biases)?,
            ..m
        })
    }

    /// The matrices the kernels apply whole — the MLPs' (experts, shared experts, dense
    /// layers), the attention's projections but `kv_b_proj` (cut per head and dequantized), `lm_head` — stored
    /// in the order of the kernel with rows in lanes, where this CPU has it ([`kernels::lanes_apply`]); `None`
    /// for the others. Readers that dequantize or read rows still read such a matrix right, only slower.
    ///
    /// The attention's projections and `lm_head` too (bench model, f32, EPYC, ten interleaved rounds, medians):
    /// decode 90.3 → 100.7 tok/s, a 64-token prefill 265.9 → 273.5; per call at 64 tokens, q_a + kv_a
    /// 1055 → 870 µs, o_proj 2470 → 2240.
    fn in_lanes(&self, module: &str, m: &AffineMatrix) -> Result<Option<AffineMatrix>> {
        const ATTENTION: [&str; 5] = [
            "q_proj",
            "q_a_proj",
            "q_b_proj",
            "kv_a_proj_with_mqa",
            "o_proj",
        ];
        let attention = module
            .rsplit_once(".self_attn.")
            .is_some_and(|(_, p)| ATTENTION.contains(&p));
        let whole = module.contains(".mlp.") || attention || module == "lm_head";
        if !(whole && kernels::lanes_apply(m)) {
            return Ok(None);
        }
        let (codes, scales) = kernels::lanes_sizes(m);
        Ok(Some(AffineMatrix {
            packed: self.made(codes, |d| kernels::lanes_codes(m, d))?,
            scales: self.made(scales, |d| kernels::lanes_scales(m, &m.scales, d))?,
            biases: self.made(scales, |d| kernels::lanes_scales(m, &m.biases, d))?,
            lanes: true,
            ..m.clone()
        }))
    }

    /// `n` bytes the loader makes, written by `f`: resident, on huge pages, unless weights are served from the
    /// mapped files.
    fn made(&self, n: usize, f: impl FnOnce(&mut [u8])) -> Result<Buf> {
        if self.options.map_weights {
            let mut v = vec![0; n];
            f(&mut v);
            return Ok(Buf::owned(v));
        }
        Ok(Buf::Resident(self.arena.fill(n, f)?))
    }

    /// Weight bytes as the matmuls will read them: a resident copy, or (`map_weights`) the mapped range,
    /// paged in now so the first tokens do not pay for disk reads.
    fn keep(&self, bytes: MappedBytes) -> Result<Buf> {
        if self.options.map_weights {
            touch_pages(&bytes);
            return Ok(Buf::Mapped(bytes));
        }
        Ok(Buf::Resident(self.arena.copy(&bytes)?))
    }

    fn fp8(
        &self,
        module: &str,
        w: &TensorView,
        slot: Slot,
        rows: usize,
        cols: usize,
    ) -> Result<Linear> {
        let block = match self.config.quantization {
            Quantization::Fp8 { block } => block,
            _ => [128, 128],
        };
        let s = self.ckpt.get(&format!("{module}.weight_scale_inv"))?;
        let (br, bc) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
        check_shape(w, slot, &[rows, cols])?;
        check_shape(&s, slot, &[br, bc])?;
        if s.dtype != Dtype::F32 {
            return Err(s.err(format!("dtype {:?}, expected F32 block scales", s.dtype)));
        }
        let scale_all = to_f32_vec(&s)?;
        let i = slot.index;
        let scale = &scale_all[i * br * bc..(i + 1) * br * bc];
        let codes = &w.bytes[i * rows * cols..(i + 1) * rows * cols];
        // The dequantized values are bf16-exact (see `fp8::dequantize_blocks`).
        let w = fp8::dequantize_blocks(codes, rows, cols, scale, block);
        Ok(Linear::Bf16(Bf16Matrix::from_f32(&w, rows, cols)))
    }
}

/// Bits and group size implied by the packed width and the number of scale groups.
fn infer_affine(w: &TensorView, scales: &TensorView, cols: usize) -> Result<AffineParams> {
    let (Some(&packed), Some(&groups)) = (w.shape.last(), scales.shape.last()) else {
        return Err(w.err("a packed weight needs at least one dimension"));
    };
    let bits = packed * 32 / cols.max(1);
    let ok_bits = packed * 32 == bits * cols && SUPPORTED_BITS.contains(&(bits as u32));
    if !ok_bits {
        return Err(w.err(format!(
            "{packed} u32 words per row do not pack {cols} columns at 2, 3, 4, 5, 6 or 8 bits"
        )));
    }
    let group = cols.checked_div(groups).unwrap_or(0);
    if groups == 0 || group * groups != cols || !SUPPORTED_GROUPS.contains(&group) {
        return Err(scales.err(format!(
            "{groups} scale groups per row do not split {cols} columns into 32, 64 or 128"
        )));
    }
    Ok(AffineParams {
        bits: bits as u32,
        group_size: group,
    })
}

fn scale_type(t: &TensorView) -> Result<ScaleType> {
    match t.dtype {
        Dtype::BF16 => Ok(ScaleType::Bf16),
        Dtype::F16 => Ok(ScaleType::F16),
        Dtype::F32 => Ok(ScaleType::F32),
        other => Err(t.err(format!("dtype {other:?}, expected bf16, f16 or f32 scales"))),
    }
}

fn check_shape(t: &TensorView, slot: Slot, tail: &[usize]) -> Result<()> {
    let mut want: Vec<usize> = slot.count.into_iter().collect();
    want.extend_from_slice(tail);
    if t.shape != want.as_slice() {
        return Err(t.err(format!(
            "shape {:?} disagrees with the config (expected {want:?})",
            t.shape
        )));
    }
    if slot.index >= slot.count.unwrap_or(1) {
        return Err(t.err(format!("index {} out of range", slot.index)));
    }
    Ok(())
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Weights({})", self.ckpt.dir().display())
    }
}

/// Reads one byte per page so a mapped range becomes resident.
fn touch_pages(bytes: &[u8]) {
    let mut acc = 0u8;
    for i in (0..bytes.len()).step_by(4096) {
        acc ^= bytes[i];
    }
    std::hint::black_box(acc);
}
