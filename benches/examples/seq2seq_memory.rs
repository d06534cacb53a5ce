//! Peak memory of one LoRA training step on an mT5-shaped model with mT5's 250,112-token
//! vocabulary (untied head), batch 4 x 128 encoder and decoder tokens: the training loss
//! (`PeftModel::seq2seq_loss`, head and cross-entropy fused, no `[B, T, V]` logits) against the
//! decoder logits followed by `cross_entropy` (`logits`).
//!
//! `cargo run --release -p peft-benches --example seq2seq_memory -- fused|logits`
//! (one process per mode, so that each peak RSS is its own).
#![allow(clippy::unwrap_used)] // a benchmark fails loudly by design

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use peft::models::{T5Config, T5Model};
use peft::{get_peft_model, AdapterConfig, ModelInputs};

fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "fused".into());
    let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(
        r#"{"model_type": "mt5", "vocab_size": 250112, "d_model": 512, "d_kv": 64, "d_ff": 1024,
            "num_layers": 2, "num_decoder_layers": 2, "num_heads": 6, "feed_forward_proj": "gated-gelu",
            "tie_word_embeddings": false, "decoder_start_token_id": 0, "eos_token_id": 1}"#,
    )
    .unwrap();
    let cfg = T5Config::from_map(config, "seq2seq_memory").unwrap();
    let dev = Device::Cpu;
    let base = T5Model::random(cfg, 0, DType::F32, &dev).unwrap();
    let adapter = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q", "v"], "init_lora_weights": false}"#,
        "seq2seq_memory",
    )
    .unwrap();
    let model = get_peft_model(Box::new(base), adapter, 0).unwrap();
    model.set_training(true);
    let ids = |seed: u32| {
        let v: Vec<u32> = (0..512u32)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % 250_112)
            .collect();
        Tensor::from_vec(v, (4, 128), &dev).unwrap()
    };
    let labels = ids(1).to_dtype(DType::I64).unwrap();
    let inputs = ModelInputs {
        input_ids: Some(ids(0)),
        decoder_input_ids: Some(peft::training::shift_right(&labels, 0, 0).unwrap()),
        ..Default::default()
    };
    let before = peft::alloc::peak_rss_mb().unwrap_or(0.0);
    let start = Instant::now();
    let loss = match mode.as_str() {
        "logits" => {
            let logits = model.forward(&inputs).unwrap();
            peft::loss::cross_entropy(
                &logits.reshape((512, 250_112)).unwrap(),
                &labels.reshape(512).unwrap(),
            )
            .unwrap()
            .0
        }
        _ => model.seq2seq_loss(&inputs, &labels).unwrap(),
    };
    let grads = loss.backward().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let g = model
        .trainable_vars()
        .iter()
        .filter(|v| grads.get(v.as_tensor()).is_some())
        .count();
    println!(
        "{{\"mode\": \"{mode}\", \"loss\": {:.5}, \"step_s\": {secs:.3}, \"peak_rss_mb_before_step\": {before:.0}, \"peak_rss_mb\": {:.0}, \"vars_with_grad\": {g}}}",
        loss.to_scalar::<f32>().unwrap(),
        peft::alloc::peak_rss_mb().unwrap_or(0.0)
    );
}
