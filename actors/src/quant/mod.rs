//! Quantized weight formats and the kernels that read them.

pub mod affine;
pub mod fp8;
pub mod kernels;
