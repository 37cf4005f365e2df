//! Quantized weight formats and the kernels that read them.

pub mod affine;
pub mod bf16;
pub mod fp8;
pub mod kernels;
pub mod pool;
