//! LoftQ (`init_lora_weights="loftq"`, `loftq_config`): the base weight becomes its NF4 or int8
//! round trip `Q` and the adapter the rank-r SVD of `W - Q`, alternated `loftq_iter` times, as
//! peft's `loftq_init`; the quantizer comes from `peft-quant` through core's quantizer registry.
//! Reference: tools/reference/make_loftq_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2,
//! bitsandbytes 0.50.2; peft's own loftq_init run on the CPU).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::Tensor;
use common::{assert_close, base, case_inputs, fixtures, max_abs_diff};
use peft::{get_peft_model, AdapterConfig};

fn data() -> HashMap<String, Tensor> {
    common::fixture_tensors("loftq")
}

fn config(kwargs: &serde_json::Value) -> AdapterConfig {
    let mut obj = kwargs.clone();
    obj["peft_type"] = "LORA".into();
    obj["task_type"] = "CAUSAL_LM".into();
    AdapterConfig::from_value(obj, "loftq case").unwrap()
}

#[test]
fn loftq_quantizes_the_base_and_fits_the_error_as_peft() {
    let d = data();
    let cases: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("loftq.json")).unwrap())
            .unwrap();
    assert_eq!(cases.len(), 3);
    for (case, kwargs) in &cases {
        let m = get_peft_model(base("llama_tiny"), config(kwargs), 1).unwrap();
        let vars = common::adapter_tensors(&m, "default");
        let prefix = format!("{case}.delta.");
        let modules: Vec<String> = d
            .keys()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect();
        assert!(!modules.is_empty());
        let scaling = kwargs["lora_alpha"].as_f64().unwrap();
        for path in &modules {
            let a = &vars[&format!("{path}.lora_A.weight")];
            let b = &vars[&format!("{path}.lora_B.weight")];
            let r = a.dims()[0] as f64;
            let delta = (b.matmul(a).unwrap() * (scaling / r)).unwrap();
            assert_close(
                &format!("{case} {path} scaling B A"),
                &delta,
                &d[&format!("{case}.delta.{path}")],
                1e-5,
            );
        }
        let unloaded = m.unload().unwrap();
        let weights: HashMap<String, Tensor> =
            unloaded.named_tensors().unwrap().into_iter().collect();
        for path in &modules {
            // The round trip of W (first pass) is bit-exact; later passes quantize W - L R,
            // whose rounding can move an element across a code boundary.
            let got = &weights[&format!("{path}.weight")];
            let want = &d[&format!("{case}.base.{path}")];
            let diff = max_abs_diff(got, want);
            let tol = if kwargs["loftq_config"]["loftq_iter"] == 1 {
                0.0
            } else {
                1e-5
            };
            assert!(diff <= tol, "{case} {path} base: {diff}");
        }
    }
    // The fresh model's logits.
    for case in cases.keys() {
        let m = get_peft_model(base("llama_tiny"), config(&cases[case]), 1).unwrap();
        assert_close(
            &format!("{case} logits"),
            &m.forward(&case_inputs(&d)).unwrap(),
            &d[&format!("{case}.logits")],
            1e-4,
        );
    }
}

#[test]
fn loftq_settings_are_checked_as_peft_checks_them() {
    let parse = |extra: serde_json::Value| {
        let mut obj = serde_json::json!({"peft_type": "LORA", "init_lora_weights": "loftq"});
        for (k, v) in extra.as_object().unwrap() {
            obj[k] = v.clone();
        }
        AdapterConfig::from_value(obj, "cfg.json")
            .map(|_| ())
            .unwrap_err()
            .to_string()
    };
    let err = parse(serde_json::json!({}));
    assert!(
        err.contains("loftq_config") && err.contains("cfg.json"),
        "{err}"
    );
    let err = parse(serde_json::json!({"loftq_config": {"loftq_bits": 3}}));
    assert!(err.contains("loftq_bits"), "{err}");
    let err = parse(serde_json::json!({"loftq_config": {"loftq_bits": 4, "loftq_iter": 0}}));
    assert!(err.contains("loftq_iter"), "{err}");
    // LoftQ on an embedding fails in peft; refused here.
    let cfg = AdapterConfig::from_value(
        serde_json::json!({"peft_type": "LORA", "init_lora_weights": "loftq",
            "loftq_config": {"loftq_bits": 4, "loftq_iter": 1}, "target_modules": ["embed_tokens"]}),
        "cfg.json",
    )
    .unwrap();
    let err = get_peft_model(base("llama_tiny"), cfg, 1)
        .unwrap_err()
        .to_string();
    assert!(err.contains("loftq"), "{err}");
}
