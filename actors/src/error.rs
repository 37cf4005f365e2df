//! Typed errors of the engine. Every variant names what it is about (a file, a field, a tensor, a peer),
//! so the binary can print it as-is.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    #[error("{path}: field `{field}`: {message}")]
    Config {
        path: PathBuf,
        field: String,
        message: String,
    },

    #[error("{file}: safetensors header does not parse: {message}")]
    Header { file: PathBuf, message: String },

    #[error("{file}: tensor `{tensor}`: {message}")]
    Tensor {
        file: PathBuf,
        tensor: String,
        message: String,
    },

    #[error("tensor `{tensor}` not found in the checkpoint at {dir}")]
    MissingTensor { dir: PathBuf, tensor: String },

    #[error("tokenizer {path}: {message}")]
    Tokenizer { path: PathBuf, message: String },

    #[error("chat template: {0}")]
    Template(String),

    #[error("invalid request: {0}")]
    Invalid(String),

    /// A node, link or actor of the cluster.
    #[error("{0}")]
    Cluster(String),

    #[error("tensor math: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub fn tensor(file: impl Into<PathBuf>, tensor: &str, message: impl Into<String>) -> Self {
        Error::Tensor {
            file: file.into(),
            tensor: tensor.to_string(),
            message: message.into(),
        }
    }
}

/// Reads and parses a JSON file, naming the file on failure.
pub fn read_json(path: &std::path::Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| Error::Json {
        path: path.to_path_buf(),
        source,
    })
}
