//! OLoRA on an NF4 base against transformers + bitsandbytes + peft: the QR factors of the
//! dequantized weight become the adapter and the residual is re-quantized into the 4-bit layer;
//! PiSSA on a quantized base is refused, as peft refuses it.
//! Reference: tools/reference/make_qolora_fixtures.py (the tiny LLaMA of qlora_parity.rs in NF4
//! with double quantization, OLoRA r=4 alpha 10 on every linear).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use peft_core::{get_peft_model, AdapterConfig};
use peft_quant::QuantScheme;

use common::{fx_dir, inputs, max_diff, quantized, real};
use peft_lora as _;

fn data() -> HashMap<String, Tensor> {
    let mut d =
        candle_core::safetensors::load(fx_dir().join("qolora.safetensors"), &Device::Cpu).unwrap();
    let batch =
        candle_core::safetensors::load(fx_dir().join("qlora.safetensors"), &Device::Cpu).unwrap();
    for key in ["input_ids", "attention_mask"] {
        d.insert(key.to_string(), batch[key].clone());
    }
    d
}

fn config(init: &str) -> AdapterConfig {
    AdapterConfig::from_value(
        serde_json::json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 10,
            "init_lora_weights": init,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        }),
        "test config",
    )
    .unwrap()
}

#[test]
fn olora_on_nf4_requantizes_the_residual_as_peft() {
    let d = data();
    let m = get_peft_model(quantized(QuantScheme::NF4), config("olora"), 1).unwrap();
    let vars: HashMap<String, Tensor> = m
        .adapter("default")
        .unwrap()
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().clone()))
        .collect();
    let mut modules = 0;
    for (key, want) in d
        .iter()
        .filter(|(k, _)| k.starts_with("nf4.A.") || k.starts_with("nf4.B."))
    {
        let (factor, path) = key["nf4.".len()..].split_once('.').unwrap();
        let got = &vars[&format!("{path}.lora_{factor}.weight")];
        let diff = max_diff(got, want);
        assert!(diff < 1e-5, "{key}: {diff}");
        modules += 1;
    }
    assert_eq!(modules, 2 * 14);
    let logits = m.forward(&inputs(&d)).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["nf4.fresh"], &d));
    assert!(diff < 1e-4, "OLoRA-on-NF4 logits differ by {diff}");
}

#[test]
fn pissa_on_a_quantized_base_is_refused() {
    let err = get_peft_model(quantized(QuantScheme::NF4), config("pissa"), 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("PiSSA") && err.contains("bnb 4bit"), "{err}");
}
