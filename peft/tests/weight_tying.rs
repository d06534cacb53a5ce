//! LoRA's `ensure_weight_tying` on models whose `lm_head` is tied to the input embedding: the
//! head's LoRA reads the embedding's (`lora_A = lora_embedding_Bᵀ`, `lora_B =
//! lora_embedding_Aᵀ`), both are saved and counted as peft does; outputs, the parameter line and
//! the loss against peft 0.21, the gradient of each shared factor the sum of peft's two, and a
//! reload that reproduces the saved model (which peft 0.21 does not for GPT-2).
//! Reference: tools/reference/make_tying_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::{adapter_dir, assert_close, base, case_inputs};
use peft::{get_peft_model, AdapterConfig, PeftModel};

fn data() -> HashMap<String, Tensor> {
    common::fixture_tensors("tying")
}

fn cases() -> Vec<(String, serde_json::Value)> {
    common::fixture_cases("tying")
}

fn sorted_targets(config: &serde_json::Value) -> Vec<String> {
    let mut t: Vec<String> = config["target_modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    t.sort();
    t
}

#[test]
fn tied_adapters_run_count_and_save_as_peft() {
    let d = data();
    for (case, meta) in cases() {
        let model = meta["model"].as_str().unwrap();
        let m = PeftModel::from_pretrained(base(model), &adapter_dir(model, &case), true).unwrap();
        assert_eq!(
            m.parameter_line(),
            meta["parameter_line"].as_str().unwrap(),
            "{case}"
        );
        let inputs = case_inputs(&d);
        assert_close(
            &format!("{case} logits"),
            &m.forward(&inputs).unwrap(),
            &d[&format!("{case}.logits")],
            1e-4,
        );
        let dir = tempfile::tempdir().unwrap();
        m.save_pretrained(dir.path()).unwrap();
        let saved = common::assert_saved_like(&case, dir.path(), &adapter_dir(model, &case));
        let want: Vec<String> = serde_json::from_value(meta["target_modules"].clone()).unwrap();
        assert_eq!(sorted_targets(&saved), want, "{case}");
        // One step: the loss, and each factor's gradient. peft's tied factors are two leaves
        // over one storage, each with its gradient; here they are one parameter, whose gradient
        // is the sum (the embedding's factor plus the transposed head's).
        let prefix = format!("{case}.grad.base_model.model.");
        let head = |name: &str| d[&format!("{prefix}lm_head.{name}")].t().unwrap();
        // The head's two factors are the embedding's (tied views in peft).
        for (path, got, own) in common::training_step_tied(&case, &m, &d, 2) {
            let own = own.unwrap();
            let want = if path.ends_with("lora_embedding_B") {
                (own + head("lora_A.weight")).unwrap()
            } else if path.ends_with("lora_embedding_A") {
                (own + head("lora_B.weight")).unwrap()
            } else {
                own
            };
            assert_close(&format!("{case} grad {path}"), &got, &want, 1e-4);
        }
        // Merged: each layer takes its own delta. peft merges both in place into the weight the
        // two layers share, doubling it, so its merged model is not its unmerged one.
        assert!(
            common::max_abs_diff(&d[&format!("{case}.merged")], &d[&format!("{case}.logits")])
                > 1e-3
        );
        let merged = m.merge_and_unload().unwrap();
        assert_close(
            &format!("{case} merged"),
            &merged.forward(&inputs, None).unwrap(),
            &d[&format!("{case}.logits")],
            1e-4,
        );
    }
}

#[test]
fn a_fresh_tied_adapter_is_tied_and_rewrites_its_targets_as_peft() {
    let d = data();
    for (case, meta) in cases() {
        let model = meta["model"].as_str().unwrap();
        // The config as the user wrote it (the fixture script's kwargs), with LoRA's default init.
        let targets = if case == "tied_head" {
            serde_json::json!(["c_attn", "lm_head"])
        } else {
            serde_json::json!(["q_proj", "embed_tokens", "lm_head"])
        };
        let config = AdapterConfig::from_value(
            serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
                "lora_alpha": 4, "target_modules": targets, "ensure_weight_tying": true}),
            "test config",
        )
        .unwrap();
        let m = get_peft_model(base(model), config, 1).unwrap();
        let saved = m.adapter("default").unwrap().config().to_json();
        let want: Vec<String> = serde_json::from_value(meta["target_modules"].clone()).unwrap();
        assert_eq!(sorted_targets(&saved), want, "{case}");
        assert!(
            m.adapter("default")
                .unwrap()
                .targets()
                .iter()
                .any(|t| t == "lm_head"),
            "{case}"
        );
        // B starts at zero: the base's outputs.
        let plain = base(model).forward(&case_inputs(&d), None).unwrap();
        assert_close(
            &format!("{case} fresh"),
            &m.forward(&case_inputs(&d)).unwrap(),
            &plain,
            1e-5,
        );
    }
}
