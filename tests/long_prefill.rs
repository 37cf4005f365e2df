//! A prefill long enough for the kernels' tiles with tokens in lanes gives the logits that feeding the same
//! tokens one at a time gives, on the f32 path (and one-token steps against long caches split their keys).

mod common;
use common::*;

#[test]
fn a_64_token_prefill_equals_feeding_the_tokens_one_by_one() {
    let model = load_model(&story_model());
    // 64 tokens: 48 or more take the tiles with tokens in lanes (two blocks of 32), and a 67-token prompt
    // leaves 3 past the whole sixteens to the register kernels. Fed one by one, tokens from the 128th on
    // attend with the keys split over the pool (`KEYS_ON_POOL`).
    for n in [64u32, 67, 200] {
        let prompt: Vec<u32> = (0..n).map(|i| (i * 37 + 11) % 1000 + 10).collect();
        let mut cache = model.new_cache().unwrap();
        let all: Vec<Vec<f32>> = model
            .logits(&prompt, &mut cache, true)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mut cache = model.new_cache().unwrap();
        let mut worst = 0f32;
        for (i, &id) in prompt.iter().enumerate() {
            let one = next_logits(&model, id, &mut cache);
            let d = max_abs_diff(&all[i], &one);
            assert!(d <= 1e-3, "{n} tokens, position {i}: off by {d}");
            worst = worst.max(d);
        }
        eprintln!("{n} tokens: max |Δ| = {worst:.2e}");
    }
}
