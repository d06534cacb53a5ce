//! LoRA's `trainable_token_indices` (peft's `TrainableTokensWrapper`): chosen rows of an
//! embedding (or output features of a head) trained as `token_adapter.trainable_tokens_delta`,
//! replacing the originals; a head tied to the input embedding reads the same rows. Outputs,
//! merges, the parameter line, the loss and every gradient against peft 0.21, saved files equal
//! to peft's, and the refusals peft makes.
//! Reference: tools/reference/make_tokens_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::{adapter_dir, assert_close, base, case_inputs};
use peft::{get_peft_model, AdapterConfig, PeftModel};

fn data() -> HashMap<String, Tensor> {
    common::fixture_tensors("tokens")
}

fn cases() -> Vec<(String, serde_json::Value)> {
    common::fixture_cases("tokens")
}

#[test]
fn trained_tokens_run_merge_and_count_as_peft() {
    let d = data();
    let cases = cases();
    assert_eq!(cases.len(), 4);
    for (case, meta) in cases {
        let model = meta["model"].as_str().unwrap();
        let m = PeftModel::from_pretrained(base(model), &adapter_dir(model, &case), true).unwrap();
        assert_eq!(
            m.parameter_line(),
            meta["parameter_line"].as_str().unwrap(),
            "{case}"
        );
        let inputs = case_inputs(&d);
        let logits = m.forward(&inputs).unwrap();
        assert_close(
            &format!("{case} logits"),
            &logits,
            &d[&format!("{case}.logits")],
            1e-4,
        );
        // Saved again: peft's keys and values.
        let dir = tempfile::tempdir().unwrap();
        m.save_pretrained(dir.path()).unwrap();
        let saved = common::assert_saved_like(&case, dir.path(), &adapter_dir(model, &case));
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(adapter_dir(model, &case).join("adapter_config.json"))
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            saved["trainable_token_indices"], theirs["trainable_token_indices"],
            "{case}"
        );
        // One training step: the loss and the gradient of every trainable tensor (a tied head's
        // gradient reaches the embedding's rows).
        for (path, got, want) in common::training_step(&case, &m, &d) {
            assert_close(&format!("{case} grad {path}"), &got, &want.unwrap(), 1e-4);
        }
        // Merged into the base: the rows written into the table (and the tied head).
        let merged = m.merge_and_unload().unwrap();
        let merged = merged.forward(&inputs, None).unwrap();
        if case == "tokens_untied" {
            // peft writes the embedding's rows into the weight the head shares, then the head's
            // rows over it, so its merged model computes something else than its unmerged one
            // (the embedding reads the head's rows, the head the embedding's). Here each layer
            // gets its own rows: merged = unmerged.
            assert!(
                common::max_abs_diff(&d[&format!("{case}.merged")], &d[&format!("{case}.logits")])
                    > 1e-2
            );
            assert_close(
                &format!("{case} merged"),
                &merged,
                &d[&format!("{case}.logits")],
                1e-4,
            );
        } else {
            assert_close(
                &format!("{case} merged"),
                &merged,
                &d[&format!("{case}.merged")],
                1e-4,
            );
        }
    }
}

#[test]
fn fresh_tokens_start_as_the_base_rows() {
    let d = data();
    for (case, meta) in cases() {
        let model = meta["model"].as_str().unwrap();
        // The saved config with LoRA's default init (B zero).
        let config =
            common::saved_config_with(model, &case, serde_json::json!({"init_lora_weights": true}));
        let m = get_peft_model(base(model), config, 5).unwrap();
        let vars = common::adapter_tensors(&m, "default");
        let prefix = format!("{case}.fresh.base_model.model.");
        let mut n = 0;
        for (key, want) in d.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            assert_close(key, &vars[&key[prefix.len()..]], want, 0.0);
            n += 1;
        }
        assert!(n > 0, "{case}");
        // Unchanged rows: the model computes what the base does (LoRA B starts at zero).
        let inputs = case_inputs(&d);
        let plain = base(model).forward(&inputs, None).unwrap();
        assert_close(
            &format!("{case} fresh"),
            &m.forward(&inputs).unwrap(),
            &plain,
            1e-5,
        );
    }
}

fn config(extra: serde_json::Value) -> AdapterConfig {
    let mut obj = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj"],
    });
    for (k, v) in extra.as_object().unwrap() {
        obj[k] = v.clone();
    }
    AdapterConfig::from_value(obj, "test config").unwrap()
}

#[test]
fn bad_token_requests_are_refused() {
    let refused = |extra: serde_json::Value| {
        get_peft_model(base("llama_tiny"), config(extra), 1)
            .unwrap_err()
            .to_string()
    };
    let err = refused(serde_json::json!({"trainable_token_indices": [3, 500]}));
    assert!(err.contains("500") && err.contains("128 rows"), "{err}");
    let err = refused(serde_json::json!({"trainable_token_indices": [3, 3]}));
    assert!(err.contains("listed twice"), "{err}");
    let err = refused(serde_json::json!({"trainable_token_indices": {"no_such_layer": [1]}}));
    assert!(
        err.contains("trainable_token_indices.no_such_layer"),
        "{err}"
    );
    // The same module fully trained and token-trained, as peft refuses.
    let err = refused(serde_json::json!({
        "trainable_token_indices": [3], "modules_to_save": ["embed_tokens"],
    }));
    assert!(err.contains("not both"), "{err}");
    // A LoRA target and a token target at once (peft's wrapper would bypass the LoRA).
    let err = refused(serde_json::json!({
        "trainable_token_indices": [3], "target_modules": ["q_proj", "embed_tokens"],
    }));
    assert!(err.contains("bypass"), "{err}");
    // Malformed values name the key.
    let err = AdapterConfig::from_value(
        serde_json::json!({"peft_type": "LORA", "trainable_token_indices": [1, "x"]}),
        "cfg.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("cfg.json") && err.contains("trainable_token_indices"),
        "{err}"
    );
}

#[test]
fn combining_and_hot_swapping_token_adapters_is_refused() {
    let mut m = PeftModel::from_pretrained(
        base("llama_tiny"),
        &adapter_dir("llama_tiny", "tokens_list"),
        false,
    )
    .unwrap();
    let err = m
        .add_weighted_adapter(&["default"], &[1.0], "both", &Default::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("trainable_token_indices"), "{err}");
    let err = m
        .hotswap_adapter(&adapter_dir("llama_tiny", "tokens_list"), "default")
        .unwrap_err()
        .to_string();
    assert!(err.contains("trainable_token_indices"), "{err}");
}
