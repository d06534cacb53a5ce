//! Helpers shared by the CLI end-to-end tests: run the `peft` binary, check its exit, and
//! write a small random LLaMA folder with a byte-level tokenizer.

#![allow(clippy::unwrap_used)] // tests fail loudly by design
#![allow(dead_code)] // each test file uses its own subset

use std::path::Path;
use std::process::{Command, Output};

use candle_core::{DType, Device};
use peft::models::tokenizer::byte_tokenizer;
use peft::models::{LlamaConfig, LlamaModel};

/// Runs `peft` with `args`.
pub fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("run peft")
}

/// Asserts success and returns stdout.
#[track_caller]
pub fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "failed: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Asserts failure and returns stderr.
#[track_caller]
pub fn fails(o: &Output) -> String {
    assert!(!o.status.success(), "expected a failure");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A random LLaMA (vocabulary 260, `hidden` wide, 2 layers, 4 heads / 2 kv heads, ffn
/// `ffn`) with a byte-level tokenizer and its tokenizer_config.json.
pub fn model_folder(dir: &Path, hidden: usize, ffn: usize) {
    let mut cfg = LlamaConfig::tiny(260, hidden, 2, 4, 2, ffn);
    cfg.initializer_range = 0.2;
    let model = LlamaModel::random(cfg, 3, DType::F32, &Device::Cpu).unwrap();
    peft::checkpoint::save_model_folder(&model, dir).unwrap();
    let tok = byte_tokenizer(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).unwrap();
    tok.save(dir.join("tokenizer.json"), false).unwrap();
    let tc = serde_json::json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"});
    std::fs::write(dir.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// Largest absolute difference of two tensors of the same shape.
pub fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
