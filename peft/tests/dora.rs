//! DoRA beyond the parity cases (which peft/tests/parity_lora.rs runs through every LoRA check):
//! a fresh adapter's magnitudes against peft's, the saved checkpoint and config, reloading,
//! and gradients in training mode with dropout active.
//! Reference: tools/reference/make_dora_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{
    adapter_dir, assert_close, assert_saved_like, base, case_inputs, fixtures, load_case,
};
use peft::{AdapterConfig, PeftModel};

const CASES: [(&str, &str); 3] = [
    ("llama_tiny", "dora_mixed"),
    ("qwen2_tiny", "dora_rslora"),
    ("gpt2_tiny", "dora_conv1d"),
];

#[test]
fn fresh_magnitudes_are_peft_weight_norms() {
    let init: HashMap<String, Tensor> =
        candle_core::safetensors::load(fixtures().join("dora_init.safetensors"), &Device::Cpu)
            .unwrap();
    for (model, adapter) in CASES {
        // The case's config with the default init (B zero): every magnitude is a weight norm.
        let dir = adapter_dir(model, adapter);
        let mut json: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        json["init_lora_weights"] = serde_json::Value::Bool(true);
        let config = AdapterConfig::from_value(json, "test config").unwrap();
        let mut m = PeftModel::new(base(model));
        m.add_adapter("default", config, 0).unwrap();
        let prefix = format!("init.{model}__{adapter}.");
        let want: Vec<&String> = init.keys().filter(|k| k.starts_with(&prefix)).collect();
        let vars = m.adapter("default").unwrap().vars();
        let magnitudes: Vec<_> = vars
            .iter()
            .filter(|(p, _)| p.ends_with("lora_magnitude_vector"))
            .collect();
        assert_eq!(magnitudes.len(), want.len(), "{model}__{adapter}");
        for (path, var) in magnitudes {
            let key = format!("{prefix}{path}");
            let reference = init
                .get(&key)
                .unwrap_or_else(|| panic!("no reference {key}"));
            assert_close(&key, var.as_tensor(), reference, 1e-5);
        }
    }
}

#[test]
fn saved_dora_adapters_keep_peft_keys_and_reload_with_the_same_outputs() {
    for (model, adapter) in CASES {
        let name = format!("{model}__{adapter}");
        let data = load_case(&name);
        let inputs = case_inputs(&data);
        let m =
            PeftModel::from_pretrained(base(model), &adapter_dir(model, adapter), false).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        m.save_pretrained(tmp.path()).unwrap();

        let config = assert_saved_like(&name, tmp.path(), &adapter_dir(model, adapter));
        assert_eq!(config["use_dora"], serde_json::Value::Bool(true), "{name}");

        let reloaded = PeftModel::from_pretrained(base(model), tmp.path(), false).unwrap();
        assert_close(
            &format!("{name} reloaded"),
            &reloaded.forward(&inputs).unwrap(),
            &data["logits_adapted"],
            1e-4,
        );
    }
}

#[test]
fn every_dora_tensor_gets_a_gradient_with_dropout_active() {
    // dora_mixed has lora_dropout 0.1: in training the base output is recomputed on the dropped
    // input, and the loss still reaches every A, B and magnitude.
    let (model, adapter) = CASES[0];
    let data = load_case(&format!("{model}__{adapter}"));
    let m = PeftModel::from_pretrained(base(model), &adapter_dir(model, adapter), true).unwrap();
    m.set_training(true);
    let batch = peft::training::CausalLmBatch::from_ids(
        data["input_ids"].clone(),
        Some(data["attention_mask"].clone()),
    )
    .unwrap();
    let loss = peft::training::causal_lm_batch_loss(&m, &batch).unwrap();
    let eval_loss = data["loss"].to_vec1::<f32>().unwrap()[0];
    let train_loss = loss.to_scalar::<f32>().unwrap();
    assert!(
        train_loss.is_finite() && (train_loss - eval_loss).abs() > 1e-6,
        "dropout changed nothing: {train_loss} vs {eval_loss}"
    );
    let grads = loss.backward().unwrap();
    let vars = m.adapter("default").unwrap().vars();
    assert!(vars
        .iter()
        .any(|(p, _)| p.ends_with("lora_magnitude_vector")));
    for (path, var) in vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            norm.is_finite() && norm > 0.0,
            "{path}: gradient norm {norm}"
        );
    }
}
