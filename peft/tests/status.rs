//! peft's `get_layer_status` / `get_model_status`: every field of every layer and of the model
//! summary against peft 0.21 (LoRA with a frozen, a trainable and a modules_to_save adapter;
//! a merged embedding adapter; DoRA on GPT-2's Conv1D; IA3).
//! Reference: tools/reference/make_status_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use common::fixtures;
use peft::PeftModel;

#[test]
fn layer_and_model_status_match_peft() {
    let cases: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("status.json")).unwrap())
            .unwrap();
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let mut m = PeftModel::new(common::base(case["model"].as_str().unwrap()));
        for a in case["adapters"].as_array().unwrap() {
            m.load_adapter(
                &fixtures().join("adapters").join(a[1].as_str().unwrap()),
                a[0].as_str().unwrap(),
                a[2].as_bool().unwrap(),
            )
            .unwrap();
        }
        m.set_adapter(case["active"].as_str().unwrap()).unwrap();
        if case["merge"].as_bool().unwrap() {
            m.merge_adapter().unwrap();
        }
        let layers: Vec<serde_json::Value> = m
            .get_layer_status()
            .unwrap()
            .iter()
            .map(|l| l.to_json())
            .collect();
        let want = case["layer_status"].as_array().unwrap();
        assert_eq!(layers.len(), want.len(), "{name}: layers");
        for (ours, theirs) in layers.iter().zip(want) {
            assert_eq!(ours, theirs, "{name}");
        }
        assert_eq!(
            m.get_model_status().unwrap().to_json(),
            case["model_status"],
            "{name}: model status"
        );
    }
}

#[test]
fn status_refuses_prompt_learning_and_reports_disabled_adapters() {
    let mut m = PeftModel::new(common::base("llama_tiny"));
    m.load_adapter(
        &common::adapter_dir("llama_tiny", "prompt_random"),
        "p",
        false,
    )
    .unwrap();
    let e = m.get_layer_status().unwrap_err().to_string();
    assert!(e.contains("prompt-learning"), "{e}");

    let mut m = PeftModel::new(common::base("llama_tiny"));
    let e = m.get_model_status().unwrap_err().to_string();
    assert!(e.contains("no adapter layers"), "{e}");
    m.load_adapter(&common::adapter_dir("llama_tiny", "lora_qv"), "qv", true)
        .unwrap();
    let guard = m.disable_adapters();
    let status = guard.get_model_status().unwrap();
    assert_eq!(status.enabled, peft::status::Flag::False);
    drop(guard);
    assert_eq!(
        m.get_model_status().unwrap().enabled,
        peft::status::Flag::True
    );
}
