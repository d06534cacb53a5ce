//! LoRA's `bias` ("all", "lora_only") and `lora_bias` beyond the parity cases (which
//! peft/tests/parity_lora.rs runs through every LoRA check): the saved checkpoint keeps peft's
//! keys and values, a fresh adapter trains the base biases through the model's layers, and the
//! combinations peft refuses are refused.
//! Reference: tools/reference/make_bias_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::Device;
use common::{
    adapter_dir, assert_close, assert_saved_like, base, case_inputs, fixtures, load_case,
    max_abs_diff,
};
use peft::{AdapterConfig, PeftError, PeftModel};

const CASES: [(&str, &str); 3] = [
    ("gpt2_tiny", "bias_all"),
    ("qwen2_tiny", "bias_lora_only"),
    ("gpt2_tiny", "lora_bias"),
];

fn config_of(
    model: &str,
    adapter: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> AdapterConfig {
    let text =
        std::fs::read_to_string(adapter_dir(model, adapter).join("adapter_config.json")).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    edit(&mut json);
    AdapterConfig::from_value(json, "test config").unwrap()
}

#[test]
fn saved_bias_adapters_keep_peft_keys_and_values_and_reload() {
    for (model, adapter) in CASES {
        let name = format!("{model}__{adapter}");
        let data = load_case(&name);
        let m =
            PeftModel::from_pretrained(base(model), &adapter_dir(model, adapter), true).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        m.save_pretrained(tmp.path()).unwrap();
        let config = assert_saved_like(&name, tmp.path(), &adapter_dir(model, adapter));
        let want: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir(model, adapter).join("adapter_config.json"))
                .unwrap(),
        )
        .unwrap();
        for key in ["bias", "lora_bias"] {
            assert_eq!(config[key], want[key], "{name}: {key}");
        }
        let reloaded = PeftModel::from_pretrained(base(model), tmp.path(), false).unwrap();
        assert_close(
            &format!("{name} reloaded"),
            &reloaded.forward(&case_inputs(&data)).unwrap(),
            &data["logits_adapted"],
            1e-4,
        );
    }
}

/// A new `bias="all"` adapter makes every bias of GPT-2 (its Conv1D layers, targeted or not,
/// and its LayerNorms) a trained parameter that the forward pass reads: each gets a gradient,
/// and changing one changes the output.
#[test]
fn fresh_bias_all_adapter_trains_every_bias_through_the_model() {
    let (model, adapter) = CASES[0];
    let data = load_case(&format!("{model}__{adapter}"));
    let config = config_of(model, adapter, |j| {
        j["init_lora_weights"] = serde_json::Value::Bool(true);
        j["inference_mode"] = serde_json::Value::Bool(false);
    });
    let m = peft::get_peft_model(base(model), config, 3).unwrap();
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("bias_cases.json")).unwrap())
            .unwrap();
    assert_eq!(
        m.parameter_line(),
        cases[0]["parameter_line"].as_str().unwrap(),
        "peft's count: the biases are trainable, and counted once"
    );
    let vars = m.adapter("default").unwrap().vars();
    let biases: Vec<_> = vars
        .iter()
        .filter(|(p, _)| p.ends_with(".bias") && !p.contains("lora_"))
        .collect();
    // 2 blocks x (c_attn, attn.c_proj, c_fc, mlp.c_proj, ln_1, ln_2) + ln_f
    assert_eq!(
        biases.len(),
        13,
        "{:?}",
        biases.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    assert!(biases
        .iter()
        .any(|(p, _)| p == "transformer.h.0.attn.c_attn.base_layer.bias"));
    assert!(biases
        .iter()
        .any(|(p, _)| p == "transformer.h.0.attn.c_proj.bias"));
    assert!(biases.iter().any(|(p, _)| p == "transformer.ln_f.bias"));

    m.set_training(true);
    let inputs = case_inputs(&data);
    let batch = peft::training::CausalLmBatch::from_ids(
        data["input_ids"].clone(),
        Some(data["attention_mask"].clone()),
    )
    .unwrap();
    let loss = peft::training::causal_lm_batch_loss(&m, &batch).unwrap();
    let grads = loss.backward().unwrap();
    for (path, var) in &biases {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{path}: gradient norm {norm}"
        );
    }
    m.set_training(false);
    let before = m.forward(&inputs).unwrap();
    for (path, var) in &biases {
        // Not a constant shift: a LayerNorm after the residual would remove it.
        let n = var.dims()[0];
        let ramp = candle_core::Tensor::arange(0f32, n as f32, &Device::Cpu)
            .unwrap()
            .affine(1.0 / n as f64, 0.0)
            .unwrap();
        let old = var.as_tensor().copy().unwrap();
        var.set(&(&old + &ramp).unwrap()).unwrap();
        let after = m.forward(&inputs).unwrap();
        assert!(
            max_abs_diff(&before, &after) > 1e-3,
            "{path}: the model does not read the trained bias"
        );
        var.set(&old).unwrap();
    }
}

#[test]
fn lora_bias_combinations_peft_refuses_are_refused() {
    // With DoRA (peft's LoraConfig raises).
    let json = r#"{"peft_type": "LORA", "lora_bias": true, "use_dora": true}"#;
    let e = AdapterConfig::from_json_str(json, "adapter_config.json").unwrap_err();
    let s = e.to_string();
    assert!(matches!(e, PeftError::ConfigValue { .. }), "{s}");
    assert!(
        s.contains("lora_bias") && s.contains("adapter_config.json"),
        "{s}"
    );

    // On an embedding (peft's Embedding.update_layer raises); the model is left untouched.
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "lora_bias": true, "target_modules": ["c_attn", "wte"]}"#,
        "adapter_config.json",
    )
    .unwrap();
    let e = peft::get_peft_model(base("gpt2_tiny"), config, 0).unwrap_err();
    assert!(
        matches!(e, PeftError::UnsupportedModule { .. }) && e.to_string().contains("wte"),
        "{e}"
    );

    // Merging a lora_bias adapter into a layer without a bias (LLaMA's) fails cleanly.
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "lora_bias": true, "init_lora_weights": false, "target_modules": ["q_proj"]}"#,
        "adapter_config.json",
    )
    .unwrap();
    let mut m = peft::get_peft_model(base("llama_tiny"), config, 0).unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
    let inputs = peft::ModelInputs::from_ids(ids);
    let before = m.forward(&inputs).unwrap();
    let e = m.merge_adapter().unwrap_err();
    assert!(e.to_string().contains("lora_bias"), "{e}");
    assert_close(
        "after the refused merge",
        &m.forward(&inputs).unwrap(),
        &before,
        0.0,
    );
}
