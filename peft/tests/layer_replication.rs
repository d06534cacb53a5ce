//! LoRA's `layer_replication` (peft's `replicate_layers`): the decoder stack rebuilt from
//! ranges of the original, the copies sharing the frozen weights and each getting its own LoRA;
//! outputs, merges, the parameter line (shared weights counted once), the loss and every
//! gradient against peft 0.21, and the saved files equal to peft's.
//! Reference: tools/reference/make_replication_fixtures.py (torch 2.15, transformers 5.24,
//! peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::{adapter_dir, assert_close, base, case_inputs};
use peft::{get_peft_model, AdapterConfig, PeftModel};

fn data() -> HashMap<String, Tensor> {
    common::fixture_tensors("replication")
}

fn cases() -> Vec<(String, serde_json::Value)> {
    common::fixture_cases("replication")
}

#[test]
fn replicated_layers_run_train_merge_and_count_as_peft() {
    let d = data();
    let cases = cases();
    assert_eq!(cases.len(), 2);
    for (case, meta) in cases {
        let model = meta["model"].as_str().unwrap();
        let m = PeftModel::from_pretrained(base(model), &adapter_dir(model, &case), true).unwrap();
        assert_eq!(
            m.base_model().info().num_layers as u64,
            meta["num_layers"].as_u64().unwrap(),
            "{case}"
        );
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
        // Generation runs through a cache sized for the new stack.
        let mut cache = m.new_cache();
        m.forward_with_cache(&case_inputs(&d), &mut cache).unwrap();
        // Saved again: peft's keys (per new layer index) and values.
        let dir = tempfile::tempdir().unwrap();
        m.save_pretrained(dir.path()).unwrap();
        let saved = common::assert_saved_like(&case, dir.path(), &adapter_dir(model, &case));
        assert!(saved["layer_replication"].is_array(), "{case}");
        for (path, got, want) in common::training_step(&case, &m, &d) {
            assert_close(&format!("{case} grad {path}"), &got, &want.unwrap(), 1e-4);
        }
        // Merged: peft adds each copy's delta in place into the weight the copies share, so its
        // merged model gives every copy the sum of all their deltas and computes something else
        // than the unmerged one. Here each copy gets its own merged weight: merged = unmerged.
        let merged = m.merge_and_unload().unwrap();
        let repeated = meta["num_layers"].as_u64().unwrap() > 2;
        assert!(
            repeated
                && common::max_abs_diff(
                    &d[&format!("{case}.merged")],
                    &d[&format!("{case}.logits")]
                ) > 1e-2,
            "{case}: peft's merge no longer differs; compare with it"
        );
        assert_close(
            &format!("{case} merged"),
            &merged.forward(&inputs, None).unwrap(),
            &d[&format!("{case}.logits")],
            1e-4,
        );
    }
}

#[test]
fn a_fresh_replicating_adapter_runs_the_replicated_base() {
    let d = data();
    for (case, meta) in cases() {
        let model = meta["model"].as_str().unwrap();
        let config =
            common::saved_config_with(model, &case, serde_json::json!({"init_lora_weights": true}));
        let m = get_peft_model(base(model), config, 3).unwrap();
        assert_close(
            &format!("{case} fresh"),
            &m.forward(&case_inputs(&d)).unwrap(),
            &d[&format!("{case}.fresh")],
            1e-4,
        );
    }
}

#[test]
fn bad_replications_are_refused() {
    let config = |map: serde_json::Value| {
        AdapterConfig::from_value(
            serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
                "target_modules": ["q_proj"], "layer_replication": map}),
            "cfg.json",
        )
    };
    // Out of range (2 layers) and malformed.
    let err = get_peft_model(
        base("llama_tiny"),
        config(serde_json::json!([[0, 3]])).unwrap(),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("[0, 3]") && err.contains("2 layers"), "{err}");
    let err = config(serde_json::json!([[0, 1, 2]]))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("layer_replication") && err.contains("cfg.json"),
        "{err}"
    );
    // An architecture peft cannot replicate (GPT-2's `transformer.h`).
    let err = get_peft_model(
        base("gpt2_tiny"),
        AdapterConfig::from_value(
            serde_json::json!({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2,
                "target_modules": ["c_attn"], "layer_replication": [[0, 2], [1, 2]]}),
            "cfg.json",
        )
        .unwrap(),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("layer replication"), "{err}");
    // A second adapter asking for another replication.
    let mut m = get_peft_model(
        base("llama_tiny"),
        config(serde_json::json!([[0, 2], [1, 2]])).unwrap(),
        1,
    )
    .unwrap();
    let err = m
        .add_adapter("other", config(serde_json::json!([[0, 2]])).unwrap(), 2)
        .unwrap_err()
        .to_string();
    assert!(err.contains("already replicated"), "{err}");
    m.add_adapter(
        "same",
        config(serde_json::json!([[0, 2], [1, 2]])).unwrap(),
        2,
    )
    .unwrap();
}

#[test]
fn bert_encoder_layers_replicate_as_peft() {
    let d = common::fixture_tensors("replication_bert");
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("replication_bert.json")).unwrap(),
    )
    .unwrap();
    let dir = adapter_dir("bert_seqcls", "replicate");
    let m = PeftModel::from_pretrained(base("bert_seqcls"), &dir, false).unwrap();
    assert_eq!(
        m.base_model().info().num_layers as u64,
        meta["num_layers"].as_u64().unwrap()
    );
    // The trainable count of an inference load is 0 here; peft printed the training model's.
    let (_, all) = m.parameter_counts();
    assert!(meta["parameter_line"].as_str().unwrap().contains(&format!(
        "all params: {}",
        peft::peft_model::group_thousands(all)
    )));
    assert_close(
        "bert replicated",
        &m.forward(&case_inputs(&d)).unwrap(),
        &d["logits"],
        1e-4,
    );
    let out = tempfile::tempdir().unwrap();
    m.save_pretrained(out.path()).unwrap();
    common::assert_saved_like("bert replicated", out.path(), &dir);
}
