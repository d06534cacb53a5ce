//! PiSSA and OLoRA (`init_lora_weights` "pissa", "pissa_niter_N", "olora"): the adapter starts as
//! the leading factors of the base weight (singular triplets, or the QR factors) and the base
//! keeps the residual; a saved adapter reloads by rerunning the decomposition on the original
//! base; `save_adapter_converted` turns it into a plain LoRA over the original base (peft's
//! `path_initial_model_for_weight_conversion`). Outputs, residuals, factors and gradients
//! against peft 0.21.
//! Reference: tools/reference/make_pissa_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::Tensor;
use common::{adapter_dir, assert_close, base, case_inputs};
use peft::{get_peft_model, AdapterConfig, PeftModel};

/// (case, model, whether the factors equal peft's: OLoRA's QR has LAPACK's signs; PiSSA's
/// singular pairs are defined up to sign).
const CASES: &[(&str, &str, bool)] = &[
    ("pissa_mixed", "llama_tiny", false),
    ("pissa_conv1d", "gpt2_tiny", false),
    ("olora_mixed", "llama_tiny", true),
    ("olora_dora", "qwen2_tiny", true),
];

fn data() -> HashMap<String, Tensor> {
    common::fixture_tensors("pissa")
}

/// A fresh adapter with the config peft used (the trained adapter's, which names the init).
fn fresh(case: &str, model: &str) -> PeftModel {
    let mut config =
        AdapterConfig::from_path(&adapter_dir(model, case).join("adapter_config.json")).unwrap();
    config.common.inference_mode = false;
    get_peft_model(base(model), config, 7).unwrap()
}

#[test]
fn fresh_adapters_decompose_the_base_as_peft() {
    let d = data();
    for &(case, model, exact_factors) in CASES {
        let m = fresh(case, model);
        let inputs = case_inputs(&d);
        assert_close(
            &format!("{case} fresh logits"),
            &m.forward(&inputs).unwrap(),
            &d[&format!("{case}.fresh_logits")],
            1e-4,
        );
        // The factors (and scaling B A) of every adapted module.
        let vars = common::adapter_tensors(&m, "default");
        let prefix = format!("{case}.residual.");
        let modules: Vec<String> = d
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect();
        assert!(!modules.is_empty());
        for path in &modules {
            let a = &vars[&format!("{path}.lora_A.weight")];
            let b = &vars[&format!("{path}.lora_B.weight")];
            let expected = &d[&format!("{case}.delta.{path}")];
            let scale = expected
                .abs()
                .unwrap()
                .max_keepdim(1)
                .unwrap()
                .max_keepdim(0)
                .unwrap();
            let scale = scale.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
            let ba = b.matmul(a).unwrap();
            // scaling B A of peft's factors, from ours: compare the product through the ratio of
            // any one entry would hide a scaling bug, so compare B A directly against peft's B A.
            let peft_ba = d[&format!("{case}.B.{path}")]
                .matmul(&d[&format!("{case}.A.{path}")])
                .unwrap();
            assert_close(
                &format!("{case} {path} B A"),
                &ba,
                &peft_ba,
                1e-5 * scale.max(1.0),
            );
            if exact_factors {
                assert_close(
                    &format!("{case} {path} A"),
                    a,
                    &d[&format!("{case}.A.{path}")],
                    1e-5,
                );
                assert_close(
                    &format!("{case} {path} B"),
                    b,
                    &d[&format!("{case}.B.{path}")],
                    1e-5,
                );
            }
        }
        // The residual left in the base.
        let unloaded = m.unload().unwrap();
        let weights: HashMap<String, Tensor> =
            unloaded.named_tensors().unwrap().into_iter().collect();
        for path in &modules {
            assert_close(
                &format!("{case} {path} residual"),
                &weights[&format!("{path}.weight")],
                &d[&format!("{case}.residual.{path}")],
                1e-5,
            );
        }
    }
}

#[test]
fn a_training_step_matches_peft() {
    let d = data();
    for &(case, model, exact_factors) in CASES {
        let m = fresh(case, model);
        for (path, got, want) in common::training_step(case, &m, &d) {
            // PiSSA's factors differ from peft's by a sign per singular pair, and so do their
            // gradients; OLoRA's are the same.
            if exact_factors {
                assert_close(&format!("{case} grad {path}"), &got, &want.unwrap(), 1e-4);
            }
        }
    }
}

#[test]
fn trained_adapters_reload_over_the_original_base() {
    let d = data();
    for &(case, model, _) in CASES {
        let m = PeftModel::from_pretrained(base(model), &adapter_dir(model, case), false).unwrap();
        assert_close(
            &format!("{case} trained logits"),
            &m.forward(&case_inputs(&d)).unwrap(),
            &d[&format!("{case}.trained_logits")],
            1e-4,
        );
    }
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn conversion_to_plain_lora_matches_peft() {
    let d = data();
    for &(case, model, _) in CASES {
        if case == "olora_dora" {
            continue; // refused below
        }
        let m = PeftModel::from_pretrained(base(model), &adapter_dir(model, case), false).unwrap();
        let initial = tempfile::tempdir().unwrap();
        copy_dir(&adapter_dir(model, &format!("{case}_init")), initial.path());
        let out = tempfile::tempdir().unwrap();
        m.save_adapter_converted("default", out.path(), initial.path())
            .unwrap();
        // The same tensors as peft's conversion, and the config fields that say how to read them.
        let ours = common::assert_saved_like(
            case,
            out.path(),
            &adapter_dir(model, &format!("{case}_converted")),
        );
        let theirs: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(
                adapter_dir(model, &format!("{case}_converted")).join("adapter_config.json"),
            )
            .unwrap(),
        )
        .unwrap();
        for key in [
            "r",
            "lora_alpha",
            "rank_pattern",
            "alpha_pattern",
            "init_lora_weights",
            "use_rslora",
        ] {
            assert_eq!(ours[key], theirs[key], "{case}: {key}");
        }
        // Over the original base it computes what the trained adapter did over the residual.
        let converted = PeftModel::from_pretrained(base(model), out.path(), false).unwrap();
        let logits = converted.forward(&case_inputs(&d)).unwrap();
        assert_close(
            &format!("{case} converted"),
            &logits,
            &d[&format!("{case}.converted_logits")],
            1e-4,
        );
        assert_close(
            &format!("{case} converted vs trained"),
            &logits,
            &d[&format!("{case}.trained_logits")],
            1e-4,
        );
        // As peft does, the initial folder's config now says init_lora_weights=true.
        let init: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(initial.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            init["init_lora_weights"],
            serde_json::Value::Bool(true),
            "{case}"
        );
    }
}

#[test]
fn conversions_peft_cannot_do_are_refused() {
    // DoRA: the magnitude is normalised over the residual.
    let m = PeftModel::from_pretrained(
        base("qwen2_tiny"),
        &adapter_dir("qwen2_tiny", "olora_dora"),
        false,
    )
    .unwrap();
    let initial = tempfile::tempdir().unwrap();
    copy_dir(
        &adapter_dir("qwen2_tiny", "olora_dora_init"),
        initial.path(),
    );
    let out = tempfile::tempdir().unwrap();
    let err = m
        .save_adapter_converted("default", out.path(), initial.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains("DoRA"), "{err}");
    assert!(!out.path().join("adapter_model.safetensors").exists());
    // A missing initial adapter names the folder.
    let empty = tempfile::tempdir().unwrap();
    let err = m
        .save_adapter_converted("default", out.path(), empty.path())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&empty.path().display().to_string()), "{err}");
}

fn config_json(init: &str, extra: serde_json::Value) -> AdapterConfig {
    let mut obj = serde_json::json!({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 6,
        "target_modules": ["q_proj", "v_proj"], "init_lora_weights": init,
    });
    for (k, v) in extra.as_object().unwrap() {
        obj[k] = v.clone();
    }
    AdapterConfig::from_value(obj, "test config").unwrap()
}

#[test]
fn randomized_pissa_leaves_the_base_function_unchanged() {
    let d = data();
    let config = config_json("pissa_niter_4", serde_json::json!({}));
    assert_eq!(
        config.to_json()["init_lora_weights"],
        serde_json::Value::from("pissa_niter_4")
    );
    let m = get_peft_model(base("llama_tiny"), config, 3).unwrap();
    let inputs = case_inputs(&d);
    let plain = base("llama_tiny").forward(&inputs, None).unwrap();
    assert_close("pissa_niter_4", &m.forward(&inputs).unwrap(), &plain, 1e-4);
    // The factors are not zero: the residual plus scaling B A is the weight.
    let vars = m.adapter("default").unwrap().vars();
    for (path, var) in &vars {
        let n = var
            .as_tensor()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0, "{path}");
    }
}

#[test]
fn bad_decompositions_are_refused() {
    // A rank above the weight's smaller side (k_proj is [32, 64]).
    let err = get_peft_model(
        base("llama_tiny"),
        config_json(
            "olora",
            serde_json::json!({"r": 40, "target_modules": ["k_proj"]}),
        ),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("min(out, in) = 32"), "{err}");
    // OLoRA on Conv1D.
    let err = get_peft_model(
        base("gpt2_tiny"),
        config_json(
            "olora",
            serde_json::json!({"target_modules": ["c_attn"], "fan_in_fan_out": true}),
        ),
        1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("Conv1D"), "{err}");
    // A malformed PiSSA name.
    let err = AdapterConfig::from_value(
        serde_json::json!({"peft_type": "LORA", "init_lora_weights": "pissa_niter_x"}),
        "cfg.json",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("pissa_niter_") && err.contains("cfg.json"),
        "{err}"
    );
    // lora_bias needs init_lora_weights true or false, as in peft.
    let err = AdapterConfig::from_value(
        serde_json::json!({"peft_type": "LORA", "init_lora_weights": "pissa", "lora_bias": true}),
        "cfg.json",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("lora_bias"), "{err}");
}
