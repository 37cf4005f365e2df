//! The kimi-actors engine: a DeepSeek-V3 / Kimi-K2 forward pass over memory-mapped checkpoints
//! (bf16, FP8 blocks, MLX affine), the tokenizer and chat template, sampling, and the actors that own
//! the model's units across machines.

pub mod bench;
pub mod cluster;
pub mod config;
pub mod error;
pub mod generate;
pub mod malloc;
pub mod model;
pub mod placement;
pub mod quant;
pub mod synth;
pub mod tokenizer;
pub mod weights;

pub use config::ModelConfig;
pub use error::{Error, Result};
