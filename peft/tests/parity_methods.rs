//! Prompt tuning, p-tuning (MLP and LSTM), prefix tuning (with and without projection) and IA3
//! against Python peft + transformers on the committed fixtures.
//! Reference: tools/reference/make_method_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, base, fixtures, load_case};
use peft::training::{causal_lm_batch_loss, CausalLmBatch};
use peft::{checkpoint, AdapterConfig, ModelInputs, PeftModel};
use serde_json::Value;

const TOL: f32 = 1e-4;

fn cases() -> Vec<Value> {
    let text = std::fs::read_to_string(fixtures().join("method_cases.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

fn names(case: &Value) -> (String, String) {
    (
        case["model"].as_str().unwrap().to_string(),
        case["method"].as_str().unwrap().to_string(),
    )
}

/// The adapter's config as a user would create it: trainable, and with the fixture's
/// tokenizer path resolved from the test's working directory.
fn fresh_config(dir: &Path) -> AdapterConfig {
    let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
    let mut value: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    value.insert("inference_mode".into(), Value::Bool(false));
    if value
        .get("tokenizer_name_or_path")
        .is_some_and(|v| !v.is_null())
    {
        let tok = fixtures().join("models/llama_tiny");
        value.insert(
            "tokenizer_name_or_path".into(),
            Value::from(tok.to_str().unwrap()),
        );
    }
    AdapterConfig::from_value(Value::Object(value), "fixture").unwrap()
}

#[test]
fn loaded_adapters_match_peft_logits_and_generation() {
    for case in cases() {
        let (m, method) = names(&case);
        let name = format!("{m}__{method}");
        let data = load_case(&name);
        let mut model =
            PeftModel::from_pretrained(base(&m), &fixtures().join("adapters").join(&name), false)
                .unwrap();
        let inputs = ModelInputs::from_ids(data["input_ids"].clone())
            .with_mask(Some(data["attention_mask"].clone()));
        let adapted = model.forward(&inputs).unwrap();
        assert_close(
            &format!("{name} adapted"),
            &adapted,
            &data["logits_adapted"],
            TOL,
        );
        let row = ModelInputs::from_ids(data["input_ids"].narrow(0, 0, 1).unwrap());
        assert_close(
            &format!("{name} unmasked"),
            &model.forward(&row).unwrap(),
            &data["logits_unmasked"],
            TOL,
        );
        {
            let off = model.disable_adapters();
            assert_close(
                &format!("{name} disabled"),
                &off.forward(&inputs).unwrap(),
                &data["logits_base"],
                TOL,
            );
        }
        let prompt: Vec<u32> = case["prompt"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let expected: Vec<u32> = data["generated"]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let got = peft::generate::greedy_generate(&model, &prompt, expected.len(), &[]).unwrap();
        assert_eq!(got, expected, "{name}: greedy continuation");
        if let Some(merged) = data.get("logits_merged") {
            model.merge_adapter().unwrap();
            assert_close(
                &format!("{name} merged"),
                &model.forward(&inputs).unwrap(),
                merged,
                TOL,
            );
            let unloaded = model.merge_and_unload().unwrap();
            assert_close(
                &format!("{name} merge_and_unload"),
                &unloaded.forward(&inputs, None).unwrap(),
                merged,
                TOL,
            );
        } else {
            assert!(
                model.merge_adapter().is_err(),
                "{name}: prompt adapters have nothing to merge"
            );
        }
    }
}

#[test]
fn fresh_adapters_have_peft_parameter_lines() {
    for case in cases() {
        let (m, method) = names(&case);
        let dir = fixtures().join("adapters").join(format!("{m}__{method}"));
        let model = peft::get_peft_model(base(&m), fresh_config(&dir), 0).unwrap();
        assert_eq!(
            model.parameter_line(),
            case["parameter_line"].as_str().unwrap(),
            "{m}__{method}"
        );
    }
}

/// The freshly created adapter (encoders active, as in training) with peft's own initial
/// weights: logits, loss and every gradient.
#[test]
fn training_mode_logits_loss_and_gradients_match_peft() {
    for case in cases() {
        let (m, method) = names(&case);
        let name = format!("{m}__{method}");
        let data = load_case(&name);
        let params: Vec<(String, Tensor)> = data
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone())))
            .collect();
        assert!(!params.is_empty(), "{name}");
        let tmp = tempfile::tempdir().unwrap();
        let config = fresh_config(&fixtures().join("adapters").join(&name));
        std::fs::write(
            tmp.path().join("adapter_config.json"),
            config.to_json_string(),
        )
        .unwrap();
        checkpoint::write_safetensors(&tmp.path().join(checkpoint::WEIGHTS_NAME), &params).unwrap();
        let mut model = PeftModel::new(base(&m));
        let report = model.load_adapter(tmp.path(), "default", true).unwrap();
        assert!(
            report.unexpected_keys.is_empty(),
            "{name}: {:?}",
            report.unexpected_keys
        );
        model.set_training(true);

        let batch = CausalLmBatch::from_ids(
            data["input_ids"].clone(),
            Some(data["attention_mask"].clone()),
        )
        .unwrap();
        let inputs =
            ModelInputs::from_ids(batch.input_ids.clone()).with_mask(batch.attention_mask.clone());
        assert_close(
            &format!("{name} train logits"),
            &model.forward(&inputs).unwrap(),
            &data["train.logits"],
            TOL,
        );
        let loss = causal_lm_batch_loss(&model, &batch).unwrap();
        assert_close(
            &format!("{name} loss"),
            &loss.reshape(1).unwrap(),
            &data["train.loss"],
            TOL,
        );
        let grads = loss.backward().unwrap();
        let vars = model.adapter("default").unwrap().vars();
        assert_eq!(
            vars.len(),
            params.len(),
            "{name}: every peft parameter is a parameter here"
        );
        for (path, var) in vars {
            let expected = &data[&format!("grad.{path}")];
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {path}"));
            assert_close(&format!("{name} grad {path}"), got, expected, TOL);
        }
    }
}

#[test]
fn text_initialisation_uses_the_tokenizer_like_peft() {
    let dir = fixtures().join("adapters/llama_tiny__prompt_text");
    let data: HashMap<String, Tensor> = load_case("llama_tiny__prompt_text");
    let model = peft::get_peft_model(base("llama_tiny"), fresh_config(&dir), 0).unwrap();
    let vars = model.adapter("default").unwrap().vars();
    assert_eq!(vars.len(), 1);
    assert_close(
        "TEXT init",
        vars[0].1.as_tensor(),
        &data["param.embedding.weight"],
        0.0,
    );
}

#[test]
fn saving_and_loading_every_method_reproduces_outputs() {
    for case in cases() {
        let (m, method) = names(&case);
        let name = format!("{m}__{method}");
        let data = load_case(&name);
        let model = peft::get_peft_model(
            base(&m),
            fresh_config(&fixtures().join("adapters").join(&name)),
            3,
        )
        .unwrap();
        let inputs = ModelInputs::from_ids(data["input_ids"].clone())
            .with_mask(Some(data["attention_mask"].clone()));
        let before = model.forward(&inputs).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        model.save_pretrained(tmp.path()).unwrap();
        // Saved in peft's layout: prompt methods hold one `prompt_embeddings` tensor.
        let saved =
            checkpoint::read_safetensors(&tmp.path().join(checkpoint::WEIGHTS_NAME), &Device::Cpu)
                .unwrap();
        let reference = checkpoint::read_safetensors(
            &fixtures()
                .join("adapters")
                .join(&name)
                .join(checkpoint::WEIGHTS_NAME),
            &Device::Cpu,
        )
        .unwrap();
        let shapes = |v: &[(String, Tensor)]| {
            v.iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shapes(&saved),
            shapes(&reference),
            "{name}: keys and shapes"
        );
        // The config: peft's fields and values.
        let read = |p: &Path| -> serde_json::Map<String, Value> {
            serde_json::from_str(&std::fs::read_to_string(p.join("adapter_config.json")).unwrap())
                .unwrap()
        };
        let (ours, theirs) = (
            read(tmp.path()),
            read(&fixtures().join("adapters").join(&name)),
        );
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{name}: config keys"
        );
        for (k, v) in &theirs {
            match k.as_str() {
                "peft_version"
                | "base_model_name_or_path"
                | "auto_mapping"
                | "tokenizer_name_or_path" => {}
                "target_modules" | "feedforward_modules" => {
                    let set = |v: &Value| {
                        let mut a: Vec<String> = v
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.to_string())
                            .collect();
                        a.sort();
                        a
                    };
                    assert_eq!(set(&ours[k]), set(v), "{name}: {k}");
                }
                _ => assert_eq!(&ours[k], v, "{name}: {k}"),
            }
        }
        let reloaded = PeftModel::from_pretrained(base(&m), tmp.path(), false).unwrap();
        assert_close(
            &format!("{name} reloaded"),
            &reloaded.forward(&inputs).unwrap(),
            &before,
            1e-5,
        );
    }
}
