//! A checkpoint directory: one `*.safetensors` file or shards listed by `model.safetensors.index.json`,
//! memory-mapped. Tensors are byte ranges of the maps: nothing is read until a caller touches it, so a node
//! that owns a few experts of a layer never pages in the others.

use crate::error::{Error, Result, read_json};
use memmap2::Mmap;
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::ops::{Deref, Range};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, Entry>,
}

struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

#[derive(Clone)]
struct Entry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// One tensor of the checkpoint: its header facts and its mapped bytes.
pub struct TensorView<'a> {
    pub name: &'a str,
    pub file: &'a Path,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub bytes: MappedBytes,
}

/// A byte range of a mapped file that keeps the map alive; derefs to the bytes.
#[derive(Clone)]
pub struct MappedBytes {
    map: Arc<Mmap>,
    range: Range<usize>,
}

impl Deref for MappedBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.map[self.range.clone()]
    }
}

impl MappedBytes {
    /// A sub-range, relative to this one.
    pub fn slice(&self, r: Range<usize>) -> MappedBytes {
        debug_assert!(r.end <= self.range.len());
        MappedBytes {
            map: self.map.clone(),
            range: self.range.start + r.start..self.range.start + r.end,
        }
    }
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let (file_names, weight_map) = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    field: "weight_map".into(),
                    message: "missing or not an object".into(),
                })?;
            let mut wm = BTreeMap::new();
            for (tensor, file) in map {
                let file = file.as_str().ok_or_else(|| Error::Config {
                    path: index_path.clone(),
                    field: format!("weight_map.{tensor}"),
                    message: "expected a file name".into(),
                })?;
                wm.insert(tensor.clone(), file.to_string());
            }
            let mut files: Vec<String> = wm.values().cloned().collect();
            files.sort();
            files.dedup();
            (files, Some(wm))
        } else {
            let mut files = Vec::new();
            let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
            for entry in rd {
                let entry = entry.map_err(|e| Error::io(dir, e))?;
                let name = entry.file_name().to_string_lossy().to_string();
                if name.ends_with(".safetensors") {
                    files.push(name);
                }
            }
            files.sort();
            if files.is_empty() {
                return Err(Error::io(
                    dir,
                    std::io::Error::new(std::io::ErrorKind::NotFound, "no *.safetensors file"),
                ));
            }
            (files, None)
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (fi, name) in file_names.iter().enumerate() {
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
            // SAFETY: the map is read-only; like every mmap-based loader we rely on the checkpoint
            // files not being truncated or rewritten while the process runs.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&map)
                .map_err(|e| describe_header_error(&path, &map, e))?;
            let data_start = 8 + header_len;
            for (tname, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                tensors.insert(
                    tname,
                    Entry {
                        file: fi,
                        dtype: info.dtype,
                        shape: info.shape.clone(),
                        range: data_start + s..data_start + e,
                    },
                );
            }
            files.push(MappedFile {
                path,
                map: Arc::new(map),
            });
        }
        if let Some(wm) = weight_map {
            for (tensor, file) in &wm {
                let fi = file_names
                    .iter()
                    .position(|f| f == file)
                    .unwrap_or(usize::MAX);
                match tensors.get(tensor) {
                    Some(e) if e.file == fi => {}
                    _ => {
                        return Err(Error::tensor(
                            dir.join(file),
                            tensor,
                            "listed in model.safetensors.index.json but not in this file",
                        ));
                    }
                }
            }
        }
        Ok(Checkpoint {
            dir: dir.to_path_buf(),
            files,
            tensors,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Result<TensorView<'_>> {
        let (key, e) = self
            .tensors
            .get_key_value(name)
            .ok_or_else(|| Error::MissingTensor {
                dir: self.dir.clone(),
                tensor: name.to_string(),
            })?;
        let f = &self.files[e.file];
        Ok(TensorView {
            name: key,
            file: &f.path,
            dtype: e.dtype,
            shape: &e.shape,
            bytes: MappedBytes {
                map: f.map.clone(),
                range: e.range.clone(),
            },
        })
    }

    /// Tensor names with their dtype and shape, sorted: what identifies a checkpoint's layout.
    pub fn index(&self) -> Vec<(&str, Dtype, &[usize])> {
        let mut v: Vec<_> = self
            .tensors
            .iter()
            .map(|(n, e)| (n.as_str(), e.dtype, e.shape.as_slice()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(b.0));
        v
    }
}

impl TensorView<'_> {
    pub fn err(&self, message: impl Into<String>) -> Error {
        Error::tensor(self.file, self.name, message)
    }
}

/// Turns safetensors' header errors into one that names the file and, where one is at fault, the tensor.
fn describe_header_error(path: &Path, bytes: &[u8], e: SafeTensorError) -> Error {
    let header = |message: String| Error::Header {
        file: path.to_path_buf(),
        message,
    };
    match e {
        SafeTensorError::MetadataIncompleteBuffer | SafeTensorError::TensorInvalidInfo => {
            // The header parsed; find the tensor whose bytes are missing or disagree with its shape.
            let n = u64::from_le_bytes(bytes[..8].try_into().unwrap_or([0; 8])) as usize;
            let avail = bytes.len().saturating_sub(8 + n);
            let parsed: Option<serde_json::Map<String, serde_json::Value>> =
                std::str::from_utf8(&bytes[8..8 + n])
                    .ok()
                    .and_then(|s| serde_json::from_str(s).ok());
            let mut worst: Option<(String, String)> = None;
            for (name, info) in parsed.iter().flatten() {
                let Some(off) = info.get("data_offsets").and_then(|o| o.as_array()) else {
                    continue;
                };
                let end = off.get(1).and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                let start = off.first().and_then(|v| v.as_u64()).unwrap_or(0) as usize;
                if end > avail {
                    worst = Some((
                        name.clone(),
                        format!(
                            "file is truncated: the tensor needs data bytes {start}..{end} but the file holds {avail}"
                        ),
                    ));
                    break;
                }
                let dtype: Option<Dtype> = info
                    .get("dtype")
                    .and_then(|d| serde_json::from_value(d.clone()).ok());
                let numel: usize = info
                    .get("shape")
                    .and_then(|s| s.as_array())
                    .map(|s| s.iter().map(|d| d.as_u64().unwrap_or(0) as usize).product())
                    .unwrap_or(0);
                if let Some(dt) = dtype
                    && numel * dt.bitsize() / 8 != end - start
                {
                    worst = Some((
                        name.clone(),
                        format!(
                            "{} bytes for shape {:?} of {dt:?}, expected {}",
                            end - start,
                            info.get("shape"),
                            numel * dt.bitsize() / 8
                        ),
                    ));
                    break;
                }
            }
            match worst {
                Some((tensor, message)) => Error::tensor(path, &tensor, message),
                None => header(format!(
                    "{e}: data section size {avail} disagrees with the header"
                )),
            }
        }
        SafeTensorError::InvalidOffset(t) => {
            Error::tensor(path, &t, "data offsets overlap or leave gaps")
        }
        other => header(other.to_string()),
    }
}

/// The values of a float tensor as f32.
pub fn to_f32_vec(view: &TensorView) -> Result<Vec<f32>> {
    match view.dtype {
        Dtype::F32 | Dtype::BF16 | Dtype::F16 => Ok(floats_from_bytes(view.dtype, &view.bytes)),
        other => Err(view.err(format!("dtype {other:?} where a float tensor was expected"))),
    }
}

/// Little-endian f32 / bf16 / f16 bytes as f32 (other dtypes give an empty vector; callers check first).
pub fn floats_from_bytes(dtype: Dtype, b: &[u8]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => b
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::BF16 => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F16 => b
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        _ => Vec::new(),
    }
}
