//! Broken checkpoints give errors that name the file and the tensor (or field), never a panic.

mod common;
use common::*;
use engine::model::Model;
use engine::weights::Weights;
use std::path::Path;

/// A copy of the single-file MLX fixture that a test may damage.
fn scratch_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = fixture("tiny-kimi-mlx-mixed");
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.path().join(p.file_name().unwrap())).unwrap();
    }
    dir
}

fn load_error(dir: &Path) -> String {
    let result = Weights::open(dir).and_then(|w| Model::load(&w, |_| {}).map(|_| ()));
    match result {
        Ok(()) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites the safetensors header with `edit` applied to its JSON (same data section).
fn edit_header(file: &Path, edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let bytes = std::fs::read(file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(file, out).unwrap();
}

#[test]
fn missing_tensor_is_named() {
    let dir = scratch_copy();
    let file = dir.path().join("model.safetensors");
    edit_header(&file, |h| {
        // Drop the tensor and give its bytes to padding so the file stays consistent.
        let t = h.remove("model.layers.2.self_attn.o_proj.scales").unwrap();
        h.insert("zz_padding".into(), t);
    });
    let idx = dir.path().join("model.safetensors.index.json");
    let mut index = json(&idx);
    index["weight_map"]
        .as_object_mut()
        .unwrap()
        .remove("model.layers.2.self_attn.o_proj.scales");
    index["weight_map"]["zz_padding"] = "model.safetensors".into();
    std::fs::write(&idx, index.to_string()).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.2.self_attn.o_proj.scales") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn shape_that_disagrees_with_the_config_is_named() {
    let dir = scratch_copy();
    let cfg = dir.path().join("config.json");
    let mut c = json(&cfg);
    c["kv_lora_rank"] = 48.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let e = load_error(dir.path());
    // The first tensor loaded that depends on kv_lora_rank is layer 0's embed_q [heads, kv_lora_rank, …].
    assert!(
        e.contains("model.safetensors") && e.contains("model.layers.0.self_attn.embed_q.weight"),
        "{e}"
    );
    assert!(
        e.contains("[4, 64, 8] disagrees with the config (expected [4, 48, 8])"),
        "{e}"
    );
}

#[test]
fn truncated_file_names_the_file_and_tensor() {
    let dir = scratch_copy();
    let file = dir.path().join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 1000]).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated") && e.contains("tensor `"),
        "{e}"
    );
}

#[test]
fn unparsable_header_names_the_file() {
    let dir = scratch_copy();
    let file = dir.path().join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[8] = b'#';
    std::fs::write(&file, &bytes).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("model.safetensors") && e.contains("header does not parse"),
        "{e}"
    );
}

#[test]
fn wrong_bits_in_the_config_are_named() {
    let dir = scratch_copy();
    let cfg = dir.path().join("config.json");
    let mut c = json(&cfg);
    c["quantization"]["model.layers.1.self_attn.o_proj"]["bits"] = 8.into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.1.self_attn.o_proj.weight") && e.contains("8-bit"),
        "{e}"
    );
}

#[test]
fn unsupported_config_value_names_the_field() {
    let dir = scratch_copy();
    let cfg = dir.path().join("config.json");
    let mut c = json(&cfg);
    c["scoring_func"] = "softmax".into();
    std::fs::write(&cfg, c.to_string()).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("config.json") && e.contains("scoring_func") && e.contains("softmax"),
        "{e}"
    );
}

#[test]
fn index_listing_a_tensor_its_shard_lacks_is_named() {
    let dir = scratch_copy();
    let idx = dir.path().join("model.safetensors.index.json");
    let mut index = json(&idx);
    index["weight_map"]["model.layers.9.mlp.gate.weight"] = "model.safetensors".into();
    std::fs::write(&idx, index.to_string()).unwrap();
    let e = load_error(dir.path());
    assert!(
        e.contains("model.layers.9.mlp.gate.weight") && e.contains("index"),
        "{e}"
    );
}
