//! Shared helpers for the integration tests: fixture paths and tensor comparison.
#![allow(dead_code)]
#![allow(clippy::unwrap_used)] // test helpers fail loudly by design

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The committed reference fixtures.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// Loads `cases/<name>.safetensors`.
pub fn load_case(name: &str) -> std::collections::HashMap<String, Tensor> {
    let path = fixtures().join("cases").join(format!("{name}.safetensors"));
    candle_core::safetensors::load(&path, &Device::Cpu).expect("fixture case")
}

/// The model inputs a fixture case holds: `input_ids`, `attention_mask` and, for T5,
/// `decoder_input_ids`.
pub fn case_inputs(data: &std::collections::HashMap<String, Tensor>) -> peft::ModelInputs {
    peft::ModelInputs {
        input_ids: Some(data["input_ids"].clone()),
        attention_mask: Some(data["attention_mask"].clone()),
        decoder_input_ids: data.get("decoder_input_ids").cloned(),
        ..Default::default()
    }
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
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

/// Asserts the largest absolute difference is at most `tol`.
pub fn assert_close(what: &str, a: &Tensor, b: &Tensor, tol: f32) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d} > {tol}");
}
