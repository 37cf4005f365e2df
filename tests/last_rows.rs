//! The model's last layer computes only the rows whose logits are wanted (each sequence's last position in a
//! prefill or a batch). Those rows' logits are the ones a forward over every row gives, and the caches take
//! every row all the same: the next step's logits agree too.

mod common;
use common::*;
use engine::model::{Model, SeqStep};

/// Kept rows against every row: the same math per row, batched differently (1e-4, as placements).
const TOLERANCE: f32 = 1e-4;

fn check(dir: &str, key: &str) {
    let model = load_model(&fixture(dir));
    let r = json(&fixture("tiny-kimi-logits-reference.json"));
    let (a, b) = (ids(&r[key][0]["prompt_ids"]), ids(&r[key][1]["prompt_ids"]));
    let every = |p: &[u32]| -> (Vec<Vec<f32>>, _) {
        let mut cache = model.new_cache().unwrap();
        let rows = model
            .logits(p, &mut cache, true)
            .unwrap()
            .to_vec2()
            .unwrap();
        (rows, cache)
    };
    let ((all_a, mut cache_a), (all_b, _)) = (every(&a), every(&b));

    // One step over both prompts: the last row of `a`, the last three of `b`.
    let (mut ca, mut cb) = (model.new_cache().unwrap(), model.new_cache().unwrap());
    let (hidden, _) = Model::forward(
        &model,
        &mut [
            SeqStep {
                tokens: &a,
                cache: &mut ca,
                outputs: 1,
            },
            SeqStep {
                tokens: &b,
                cache: &mut cb,
                outputs: 3,
            },
        ],
    )
    .unwrap();
    let got: Vec<Vec<f32>> = model.head.logits(&hidden).unwrap().to_vec2().unwrap();
    assert_eq!(got.len(), 4, "{dir}: rows kept");
    let want = [
        &all_a[a.len() - 1],
        &all_b[b.len() - 3],
        &all_b[b.len() - 2],
        &all_b[b.len() - 1],
    ];
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let d = max_abs_diff(g, w);
        assert!(d <= TOLERANCE, "{dir}: kept row {i} off by {d}");
    }
    // One token's logits alone, as generation asks for them.
    let mut c1 = model.new_cache().unwrap();
    let last = last_logits(&model, &a, &mut c1);
    let d = max_abs_diff(&last, &all_a[a.len() - 1]);
    assert!(d <= TOLERANCE, "{dir}: last position off by {d}");

    // Every row went into the caches: the next step agrees with the one after a full forward.
    let next = ids(&r[key][0]["greedy_ids"])[0];
    let want = next_logits(&model, next, &mut cache_a);
    for (what, cache) in [("batched", &mut ca), ("alone", &mut c1)] {
        for (l, layer) in cache.layers.iter().enumerate() {
            assert_eq!(layer.len(), a.len(), "{dir}: {what} cache of layer {l}");
        }
        let d = max_abs_diff(&next_logits(&model, next, cache), &want);
        assert!(
            d <= TOLERANCE,
            "{dir}: step after the {what} prompt off by {d}"
        );
    }
}

#[test]
fn kept_rows_bf16() {
    check("tiny-kimi-bf16", "bf16");
}

#[test]
fn kept_rows_mlx_mixed() {
    check("tiny-kimi-mlx-mixed", "mlx_mixed");
}
