//! GPT-2, T5/mT5 and BERT (sequence and token classification, feature extraction) with every
//! method, and the plugin methods (LoHa, LoKr, HRA, OFT) on LLaMA, BERT and T5, against Python peft +
//! transformers.
//! Reference: tools/reference/make_model_fixtures.py and make_plugin_method_fixtures.py (torch
//! 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, D};
use common::{assert_close, base, fixtures, load_case};
use peft::{checkpoint, AdapterConfig, PeftModel};
use serde_json::Value;

const TOL: f32 = 1e-4;

/// The cases of make_model_fixtures.py and of make_plugin_method_fixtures.py (the method
/// crates of issue 18: LoHa, LoKr, ...).
fn cases() -> Vec<Value> {
    let mut out = Vec::new();
    for file in ["model_cases.json", "plugin_method_cases.json"] {
        let text = std::fs::read_to_string(fixtures().join(file)).unwrap();
        let list: Vec<Value> = serde_json::from_str(&text).unwrap();
        out.extend(list);
    }
    out
}

fn runnable() -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for c in cases() {
        if let Some(reason) = c.get("skipped") {
            // Recorded by the generator: the reference itself cannot run these.
            assert!(reason.as_str().unwrap().contains("reference cannot run"));
            continue;
        }
        out.push((
            c["model"].as_str().unwrap().into(),
            c["method"].as_str().unwrap().into(),
            c["task_type"].as_str().unwrap().into(),
        ));
    }
    assert!(out.len() >= 25, "{} runnable cases", out.len());
    out
}

/// The loss the generator used for each task.
fn loss(task: &str, logits: &Tensor, data: &HashMap<String, Tensor>, model: &PeftModel) -> Tensor {
    let dev = Device::Cpu;
    match task {
        "CAUSAL_LM" => {
            let batch = peft::training::CausalLmBatch::from_ids(
                data["input_ids"].clone(),
                Some(data["attention_mask"].clone()),
            )
            .unwrap();
            peft::training::causal_lm_batch_loss(model, &batch).unwrap()
        }
        "SEQ_2_SEQ_LM" => {
            let (b, t, v) = logits.dims3().unwrap();
            let labels = data["decoder_input_ids"].reshape(b * t).unwrap();
            peft::loss::cross_entropy(&logits.reshape((b * t, v)).unwrap(), &labels)
                .unwrap()
                .0
        }
        "SEQ_CLS" => {
            peft::loss::cross_entropy(logits, &Tensor::new(&[0i64, 2, 1], &dev).unwrap())
                .unwrap()
                .0
        }
        "TOKEN_CLS" => {
            let (b, t, n) = logits.dims3().unwrap();
            let labels: Vec<i64> = (0..b * t).map(|i| (i % n) as i64).collect();
            peft::loss::cross_entropy(
                &logits.reshape((b * t, n)).unwrap(),
                &Tensor::new(labels, &dev).unwrap(),
            )
            .unwrap()
            .0
        }
        _ => logits.sqr().unwrap().mean_all().unwrap(),
    }
}

#[test]
fn every_model_and_method_matches_peft() {
    for (m, method, task) in runnable() {
        let name = format!("{m}__{method}");
        let data = load_case(&name);
        let x = common::case_inputs(&data);
        let mut model =
            PeftModel::from_pretrained(base(&m), &fixtures().join("adapters").join(&name), false)
                .unwrap();
        assert_close(
            &format!("{name} adapted"),
            &model.forward(&x).unwrap(),
            &data["logits_adapted"],
            TOL,
        );
        {
            let off = model.disable_adapters();
            assert_close(
                &format!("{name} disabled"),
                &off.forward(&x).unwrap(),
                &data["logits_base"],
                TOL,
            );
        }
        if let Some(expected) = data.get("generated") {
            let expected: Vec<u32> = expected.to_dtype(DType::U32).unwrap().to_vec1().unwrap();
            let got = if task == "SEQ_2_SEQ_LM" {
                let ids = data["input_ids"].narrow(0, 0, 1).unwrap();
                let mask = data["attention_mask"].narrow(0, 0, 1).unwrap();
                peft::generate::greedy_generate_seq2seq(
                    &model,
                    &ids,
                    Some(&mask),
                    expected.len(),
                    &[],
                    &mut |_| Ok(()),
                )
                .unwrap()
            } else {
                let prompt: Vec<u32> = data["input_ids"]
                    .get(0)
                    .unwrap()
                    .narrow(0, 0, 5)
                    .unwrap()
                    .to_dtype(DType::U32)
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                peft::generate::greedy_generate(&model, &prompt, expected.len(), &[]).unwrap()
            };
            assert_eq!(got, expected, "{name}: greedy continuation");
        }
        if let Some(merged) = data.get("logits_merged") {
            model.merge_adapter().unwrap();
            assert_close(
                &format!("{name} merged"),
                &model.forward(&x).unwrap(),
                merged,
                TOL,
            );
            model.unmerge_adapter().unwrap();
            let unloaded = model.merge_and_unload().unwrap();
            assert_close(
                &format!("{name} merge_and_unload"),
                &unloaded.forward(&x, None).unwrap(),
                merged,
                TOL,
            );
        }
    }
}

#[test]
fn training_mode_outputs_loss_and_gradients_match_peft() {
    for (m, method, task) in runnable() {
        let name = format!("{m}__{method}");
        let data = load_case(&name);
        let params: Vec<(String, Tensor)> = data
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v.clone())))
            .collect();
        let tmp = tempfile::tempdir().unwrap();
        let text = std::fs::read_to_string(
            fixtures()
                .join("adapters")
                .join(&name)
                .join("adapter_config.json"),
        )
        .unwrap();
        let mut config: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        config.insert("inference_mode".into(), Value::Bool(false));
        std::fs::write(
            tmp.path().join("adapter_config.json"),
            Value::Object(config).to_string(),
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
        let logits = model.forward(&common::case_inputs(&data)).unwrap();
        assert_close(
            &format!("{name} train logits"),
            &logits,
            &data["train.logits"],
            TOL,
        );
        let l = loss(&task, &logits, &data, &model);
        assert_close(
            &format!("{name} loss"),
            &l.reshape(1).unwrap(),
            &data["train.loss"],
            TOL,
        );
        let grads = l.backward().unwrap();
        let vars = model.adapter("default").unwrap().vars();
        assert_eq!(vars.len(), params.len(), "{name}: parameter count");
        for (path, var) in vars {
            let expected = &data[&format!("grad.{path}")];
            match grads.get(var.as_tensor()) {
                Some(g) => assert_close(&format!("{name} grad {path}"), g, expected, TOL),
                // Unused rows (the second half of a seq2seq prompt) get no gradient in either.
                None => assert_eq!(
                    expected
                        .abs()
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .max(D::Minus1)
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap(),
                    0.0,
                    "{name}: {path}"
                ),
            }
        }
    }
}

#[test]
fn fresh_adapters_have_peft_parameter_lines_and_configs() {
    for c in cases().iter().filter(|c| c.get("skipped").is_none()) {
        let (m, method) = (c["model"].as_str().unwrap(), c["method"].as_str().unwrap());
        let dir = fixtures().join("adapters").join(format!("{m}__{method}"));
        let text = std::fs::read_to_string(dir.join("adapter_config.json")).unwrap();
        let mut value: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        value.insert("inference_mode".into(), Value::Bool(false));
        // The user's config: peft recorded the classifier heads it added itself.
        if matches!(c["task_type"].as_str(), Some("SEQ_CLS" | "TOKEN_CLS")) {
            value.insert("modules_to_save".into(), Value::Null);
        }
        let config = AdapterConfig::from_value(Value::Object(value), "fixture").unwrap();
        let model = peft::get_peft_model(base(m), config, 0).unwrap();
        assert_eq!(
            model.parameter_line(),
            c["parameter_line"].as_str().unwrap(),
            "{m}__{method}"
        );
        let out = tempfile::tempdir().unwrap();
        model.save_pretrained(out.path()).unwrap();
        let ours: serde_json::Map<String, Value> = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let theirs: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            theirs.keys().collect::<Vec<_>>(),
            "{m}__{method}: config keys"
        );
        for (k, v) in &theirs {
            match k.as_str() {
                "peft_version" | "base_model_name_or_path" | "auto_mapping" => {}
                "target_modules" | "feedforward_modules" => {
                    let set = |v: &Value| {
                        let mut a: Vec<String> = v
                            .as_array()
                            .map(|a| a.iter().map(|x| x.to_string()).collect())
                            .unwrap_or_default();
                        a.sort();
                        a
                    };
                    assert_eq!(set(&ours[k]), set(v), "{m}__{method}: {k}");
                }
                _ => assert_eq!(&ours[k], v, "{m}__{method}: {k}"),
            }
        }
        let saved =
            checkpoint::read_safetensors(&out.path().join(checkpoint::WEIGHTS_NAME), &Device::Cpu)
                .unwrap();
        let reference =
            checkpoint::read_safetensors(&dir.join(checkpoint::WEIGHTS_NAME), &Device::Cpu)
                .unwrap();
        let shapes = |v: &[(String, Tensor)]| {
            v.iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            shapes(&saved),
            shapes(&reference),
            "{m}__{method}: keys and shapes"
        );
    }
}

/// peft rewrites `fan_in_fan_out` to the targeted layers' layout (true for GPT-2's Conv1D).
#[test]
fn fan_in_fan_out_follows_the_layer_layout() {
    for peft_type in ["LORA", "IA3"] {
        let config = AdapterConfig::from_json_str(
            &format!(r#"{{"peft_type": "{peft_type}", "fan_in_fan_out": false}}"#),
            "inline",
        )
        .unwrap();
        let model = peft::get_peft_model(base("gpt2_tiny"), config, 0).unwrap();
        let saved = model.adapter("default").unwrap().config().to_json();
        assert_eq!(saved["fan_in_fan_out"], Value::Bool(true), "{peft_type}");
        let config = AdapterConfig::from_json_str(
            &format!(r#"{{"peft_type": "{peft_type}", "fan_in_fan_out": true}}"#),
            "inline",
        )
        .unwrap();
        let model = peft::get_peft_model(base("llama_tiny"), config, 0).unwrap();
        assert_eq!(
            model.adapter("default").unwrap().config().to_json()["fan_in_fan_out"],
            Value::Bool(false),
            "{peft_type}"
        );
    }
}

/// OFT with COFT saved before any forward pass: the first forward projects every block into
/// the `eps` ball in place, as peft does (the other cases were saved already projected).
#[test]
fn coft_projects_a_fresh_oft_adapter_in_place_as_peft() {
    let name = "bert_seqcls__oft_coft_raw";
    let data = load_case(name);
    let model = PeftModel::from_pretrained(
        base("bert_seqcls"),
        &fixtures().join("adapters").join(name),
        false,
    )
    .unwrap();
    assert_close(
        &format!("{name} adapted"),
        &model.forward(&common::case_inputs(&data)).unwrap(),
        &data["logits_adapted"],
        TOL,
    );
    let vars: Vec<_> = model
        .adapter("default")
        .unwrap()
        .vars()
        .into_iter()
        .filter(|(path, _)| path.contains("oft_R"))
        .collect();
    assert_eq!(
        vars.len(),
        4,
        "{name}: rotation parameters (query and value of two layers)"
    );
    for (path, var) in vars {
        assert_close(
            &format!("{name} projected {path}"),
            var.as_tensor(),
            &data[&format!("param.{path}")],
            1e-6,
        );
    }
}
