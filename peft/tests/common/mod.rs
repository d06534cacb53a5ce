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

/// The tensors of the fixture file `<name>.safetensors`.
pub fn fixture_tensors(name: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join(format!("{name}.safetensors")), &Device::Cpu)
        .unwrap()
}

/// The cases of the fixture file `<name>.json` (an object: case name -> metadata).
pub fn fixture_cases(name: &str) -> Vec<(String, serde_json::Value)> {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap();
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text).unwrap();
    map.into_iter().collect()
}

/// The config saved with the committed adapter `adapters/<model>__<adapter>`, with `edits`
/// (JSON fields) applied, for training: what a fresh adapter of that kind starts from.
pub fn saved_config_with(
    model: &str,
    adapter: &str,
    edits: serde_json::Value,
) -> peft::AdapterConfig {
    let path = adapter_dir(model, adapter).join("adapter_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["inference_mode"] = serde_json::Value::Bool(false);
    for (k, v) in edits.as_object().unwrap() {
        json[k] = v.clone();
    }
    peft::AdapterConfig::from_value(json, &path.display().to_string()).unwrap()
}

/// One causal-LM step of `m` on the fixture batch (`input_ids`, `attention_mask`): asserts the
/// loss equals `<case>.loss` (to 1e-4), that the fixture holds one `<case>.grad.*` per
/// trainable tensor (plus `tied` for tensors peft keeps as tied views of others) and that every
/// one got a finite, non-zero gradient; returns each trainable tensor's path, its gradient and
/// the reference `<case>.grad.base_model.model.<path>`.
pub fn training_step_tied(
    case: &str,
    m: &peft::PeftModel,
    d: &std::collections::HashMap<String, Tensor>,
    tied: usize,
) -> Vec<(String, Tensor, Option<Tensor>)> {
    let batch = peft::training::CausalLmBatch::from_ids(
        d["input_ids"].clone(),
        Some(d["attention_mask"].clone()),
    )
    .unwrap();
    let loss = peft::training::causal_lm_batch_loss(m, &batch).unwrap();
    assert_close(
        &format!("{case} loss"),
        &loss.reshape(1).unwrap(),
        &d[&format!("{case}.loss")],
        1e-4,
    );
    let grads = loss.backward().unwrap();
    let vars = m.adapter("default").unwrap().vars();
    let prefix = format!("{case}.grad.");
    let reference = d.keys().filter(|k| k.starts_with(&prefix)).count();
    assert_eq!(vars.len() + tied, reference, "{case}: trainable tensors");
    vars.into_iter()
        .map(|(path, var)| {
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{case}: no gradient for {path}"))
                .clone();
            let norm = got
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{case} {path}: gradient norm {norm}"
            );
            let want = d.get(&format!("{prefix}base_model.model.{path}")).cloned();
            (path, got, want)
        })
        .collect()
}

/// [`training_step_tied`] for an adapter without tied tensors.
pub fn training_step(
    case: &str,
    m: &peft::PeftModel,
    d: &std::collections::HashMap<String, Tensor>,
) -> Vec<(String, Tensor, Option<Tensor>)> {
    training_step_tied(case, m, d, 0)
}

/// The parameters of adapter `name` by path (`model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn adapter_tensors(
    m: &peft::PeftModel,
    name: &str,
) -> std::collections::HashMap<String, Tensor> {
    m.adapter(name)
        .unwrap()
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect()
}
