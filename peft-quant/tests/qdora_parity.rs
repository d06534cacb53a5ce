//! DoRA on quantized bases (QDoRA) against transformers + bitsandbytes + peft: the magnitude
//! rescales the 4-bit layer's output and the weight norm is taken over the dequantized weight.
//! Reference: tools/reference/make_qdora_fixtures.py (the tiny LLaMA of qlora_parity.rs in NF4
//! with double quantization and in int8, DoRA r=4 alpha 10 on every linear, non-zero B, magnitudes
//! off their initial norms).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use peft_core::loss::causal_lm_loss;
use peft_core::{AdapterConfig, PeftModel};
use peft_quant::QuantScheme;

use common::{fx_dir, inputs, max_diff, quantized, real};
use peft_lora as _;

fn data() -> HashMap<String, Tensor> {
    let mut d =
        candle_core::safetensors::load(fx_dir().join("qdora.safetensors"), &Device::Cpu).unwrap();
    let batch =
        candle_core::safetensors::load(fx_dir().join("qlora.safetensors"), &Device::Cpu).unwrap();
    for key in ["input_ids", "attention_mask", "labels"] {
        d.insert(key.to_string(), batch[key].clone());
    }
    d
}

fn with_qdora(scheme: QuantScheme, trainable: bool) -> PeftModel {
    let mut m = PeftModel::new(quantized(scheme));
    m.load_adapter(&fx_dir().join("qdora_adapter"), "default", trainable)
        .unwrap();
    m
}

#[test]
fn qdora_on_nf4_matches_peft_outputs_loss_and_every_gradient() {
    let d = data();
    let model = with_qdora(QuantScheme::NF4, true);
    model.set_training(true);
    let logits = model.forward(&inputs(&d)).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["nf4.adapted"], &d));
    assert!(diff < 1e-4, "QDoRA logits differ by {diff}");
    let loss = causal_lm_loss(&logits, &d["labels"]).unwrap();
    let dl = max_diff(&loss.reshape(1).unwrap(), &d["nf4.loss"]);
    assert!(dl < 1e-5, "loss differs by {dl}");
    let grads = loss.backward().unwrap();
    let vars = model.adapter("default").unwrap().vars();
    let want: Vec<&String> = d.keys().filter(|k| k.starts_with("nf4.grad.")).collect();
    assert_eq!(
        vars.len(),
        want.len(),
        "one reference gradient per parameter"
    );
    assert_eq!(
        vars.iter()
            .filter(|(p, _)| p.ends_with("lora_magnitude_vector"))
            .count(),
        14
    );
    for (path, var) in &vars {
        let reference = &d[&format!("nf4.grad.{path}")];
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let scale = reference.abs().unwrap().max_all().unwrap();
        let scale: f32 = scale.to_scalar().unwrap();
        let diff = max_diff(g, reference);
        assert!(
            diff < 1e-4 * scale.max(1.0),
            "{path}: gradient differs by {diff} (largest {scale})"
        );
    }
}

#[test]
fn qdora_on_int8_matches_peft() {
    let d = data();
    let model = with_qdora(QuantScheme::INT8, false);
    let logits = model.forward(&inputs(&d)).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["int8.adapted"], &d));
    assert!(diff < 1e-4, "int8 + DoRA logits differ by {diff}");
}

/// peft folds `m / ||W + s B A|| (W + s B A)` into the dequantized weight and re-quantizes it;
/// so do we, from the same dequantized weight.
#[test]
fn merging_qdora_into_nf4_requantizes_like_peft() {
    let d = data();
    let mut merged = with_qdora(QuantScheme::NF4, false)
        .merge_and_unload()
        .unwrap();
    let logits = merged.forward(&inputs(&d), None).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["nf4.merged"], &d));
    assert!(diff < 1e-4, "merged QDoRA logits differ by {diff}");
    assert!(!peft_quant::quantized_layers(merged.as_mut())
        .unwrap()
        .is_empty());
}

/// A new DoRA adapter on a 4-bit base starts from the dequantized weights' row norms.
#[test]
fn fresh_qdora_magnitudes_are_norms_of_the_dequantized_weights() {
    let d = data();
    let dir = fx_dir().join("qdora_adapter");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap();
    json["init_lora_weights"] = serde_json::Value::Bool(true);
    let config = AdapterConfig::from_value(json, "qdora config").unwrap();
    let mut m = PeftModel::new(quantized(QuantScheme::NF4));
    m.add_adapter("default", config, 0).unwrap();
    let mut checked = 0;
    for (path, var) in m.adapter("default").unwrap().vars() {
        if let Some(want) = d.get(&format!("nf4.init.{path}")) {
            let diff = max_diff(var.as_tensor(), want);
            assert!(diff < 1e-5, "{path}: magnitude differs by {diff}");
            checked += 1;
        }
    }
    assert_eq!(checked, 14);
}
