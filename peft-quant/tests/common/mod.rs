//! Helpers the quantization tests share.

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::{AdaptableModel, ModelInputs};
use peft_quant::{quantize_model, QuantScheme};

/// The stored tensors of a safetensors file, sorted by name: (name, dtype, shape, bytes).
pub fn stored(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Asserts two safetensors files hold the same tensors: names, dtypes, shapes and bytes.
#[track_caller]
pub fn assert_same_tensors(got: &Path, want: &Path, what: &str) {
    let (got, want) = (stored(got), stored(want));
    let names = |v: &[(String, String, Vec<usize>, Vec<u8>)]| {
        v.iter().map(|t| t.0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&got), names(&want), "{what}: tensor names");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.1, &g.2), (&w.1, &w.2), "{what}: {} dtype/shape", g.0);
        assert!(g.3 == w.3, "{what}: {} bytes differ", g.0);
    }
}

/// Largest absolute difference of two tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    peft_quant::merge::max_abs_diff(a, b).unwrap()
}

/// The committed fixtures of the quantization tests.
pub fn fx_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tiny LLaMA fixture in f32.
pub fn f32_model() -> Box<dyn AdaptableModel> {
    peft_models::load_model(&fx_dir().join("tiny_llama"), DType::F32, &Device::Cpu).unwrap()
}

/// The tiny LLaMA with every linear but `lm_head` quantized (14 layers).
pub fn quantized(scheme: QuantScheme) -> Box<dyn AdaptableModel> {
    let mut m = f32_model();
    let report = quantize_model(m.as_mut(), scheme, &[]).unwrap();
    assert_eq!(report.layers.len(), 14, "{report}");
    assert_eq!(report.skipped, vec!["lm_head".to_string()]);
    m
}

/// The model inputs of a fixture batch (`input_ids`, `attention_mask`).
pub fn inputs(d: &HashMap<String, Tensor>) -> ModelInputs {
    ModelInputs::from_ids(d["input_ids"].clone()).with_mask(Some(d["attention_mask"].clone()))
}

/// Logits at real (unpadded) positions only: transformers' values at padded query rows are
/// implementation noise.
pub fn real(logits: &Tensor, d: &HashMap<String, Tensor>) -> Tensor {
    let mask = d["attention_mask"]
        .to_dtype(DType::F32)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    logits.broadcast_mul(&mask).unwrap()
}
