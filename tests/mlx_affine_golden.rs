//! MLX compatibility of the affine format: for every bit width and group size, MLX's packed words dequantize
//! to MLX's own values, and our matmul agrees with `mx.quantized_matmul`.

mod common;
use common::*;
use engine::quant::affine::{AffineMatrix, ScaleType};
use engine::quant::kernels::Activations;
use engine::weights::Buf;

#[test]
fn mlx_packed_weights_dequantize_and_multiply_like_mlx() {
    let g = json(&fixture("mlx-affine-golden.json"));
    let cases = g["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 18, "6 widths × 3 group sizes");
    for c in cases {
        let (bits, group) = (
            c["bits"].as_u64().unwrap() as u32,
            c["group"].as_u64().unwrap() as usize,
        );
        let (rows, cols) = (
            c["rows"].as_u64().unwrap() as usize,
            c["cols"].as_u64().unwrap() as usize,
        );
        let packed: Vec<u8> = ids(&c["packed_u32"])
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        let f32_bytes = |v: &serde_json::Value| -> Vec<u8> {
            floats(v).iter().flat_map(|f| f.to_le_bytes()).collect()
        };
        let m = AffineMatrix {
            rows,
            cols,
            bits,
            group,
            packed: Buf::owned(packed),
            scales: Buf::owned(f32_bytes(&c["scales"])),
            biases: Buf::owned(f32_bytes(&c["biases"])),
            scale_type: ScaleType::F32,
            activations: Activations::F32,
            lanes: false,
        };
        let d = max_abs_diff(&m.dequantize(), &floats(&c["dequantized"]));
        assert!(d < 1e-5, "bits {bits} group {group}: dequantize off by {d}");
        let x = floats(&c["x"]);
        let mut y = vec![0f32; 2 * rows];
        m.matmul(&x, &mut y);
        let d = max_abs_diff(&y, &floats(&c["y"]));
        assert!(d < 1e-3, "bits {bits} group {group}: matmul off by {d}");
    }
}
