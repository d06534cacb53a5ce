//! The trainable-parameter line, character for character, for configs too large to commit as
//! weights (built here with random weights of the same shapes).
//! Reference: tools/reference/make_fixtures.py (`param_lines.json`).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device};
use common::fixtures;
use peft::models::{LlamaConfig, LlamaModel};
use peft::{get_peft_model, AdapterConfig};
use serde_json::Value;

#[test]
fn parameter_lines_match_peft() {
    let text = std::fs::read_to_string(fixtures().join("param_lines.json")).unwrap();
    let specs: Vec<Value> = serde_json::from_str(&text).unwrap();
    assert!(specs.len() >= 3);
    for spec in specs {
        let model_cfg = spec["model_config"].as_object().unwrap().clone();
        let cfg = LlamaConfig::from_map(model_cfg, "param_lines.json").unwrap();
        let base = LlamaModel::random(cfg, 0, DType::F32, &Device::Cpu).unwrap();
        let mut lora = spec["lora_config"].as_object().unwrap().clone();
        lora.insert("peft_type".into(), Value::from("LORA"));
        let config = AdapterConfig::from_value(Value::Object(lora), "param_lines.json").unwrap();
        let model = get_peft_model(Box::new(base), config, 0).unwrap();
        assert_eq!(
            model.parameter_line(),
            spec["parameter_line"].as_str().unwrap()
        );
    }
}

#[test]
fn reference_llama_tiny_line() {
    // ../shared/REFERENCE.md: llama-tiny (hidden 256, 4 layers, 4 heads, 2 kv heads, vocab 1000),
    // LoRA r=8 on q_proj, v_proj.
    let base = LlamaModel::random(
        LlamaConfig::tiny(1000, 256, 4, 4, 2, 688),
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"]}"#,
        "inline",
    )
    .unwrap();
    let model = get_peft_model(Box::new(base), config, 0).unwrap();
    assert_eq!(
        model.parameter_line(),
        "trainable params: 28,672 || all params: 3,442,944 || trainable%: 0.8328"
    );
}
