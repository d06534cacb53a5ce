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

/// Loads the committed fixture model `models/<name>` in f32 on the CPU.
pub fn base(model: &str) -> Box<dyn peft::AdaptableModel> {
    peft::models::load_model(
        &fixtures().join("models").join(model),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

/// Loads the adapter saved in `dir` onto a fresh fixture model `model` and asserts it gives
/// `logits` on `inputs` (to 1e-5): a saved adapter reloads to the outputs it was saved with.
pub fn assert_reloads_to(
    what: &str,
    model: &str,
    dir: &std::path::Path,
    inputs: &peft::ModelInputs,
    logits: &Tensor,
) {
    let again = peft::PeftModel::from_pretrained(base(model), dir, false).unwrap();
    assert_close(
        &format!("{what} reloaded"),
        &again.forward(inputs).unwrap(),
        logits,
        1e-5,
    );
}

/// The committed adapter `adapters/<model>__<adapter>` (saved by Python peft).
pub fn adapter_dir(model: &str, adapter: &str) -> PathBuf {
    fixtures()
        .join("adapters")
        .join(format!("{model}__{adapter}"))
}

/// Asserts the adapter file saved in `ours` holds exactly the keys of the one in `theirs`,
/// each tensor bit-for-bit equal, and returns the config saved in `ours`.
pub fn assert_saved_like(
    what: &str,
    ours: &std::path::Path,
    theirs: &std::path::Path,
) -> serde_json::Value {
    let load = |dir: &std::path::Path| {
        candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap()
    };
    let (ours_t, theirs_t) = (load(ours), load(theirs));
    let mut ours_keys: Vec<&String> = ours_t.keys().collect();
    let mut their_keys: Vec<&String> = theirs_t.keys().collect();
    ours_keys.sort();
    their_keys.sort();
    assert_eq!(ours_keys, their_keys, "{what}");
    for (k, t) in &ours_t {
        assert_close(&format!("{what} {k}"), t, &theirs_t[k], 0.0);
    }
    serde_json::from_str(&std::fs::read_to_string(ours.join("adapter_config.json")).unwrap())
        .unwrap()
}
