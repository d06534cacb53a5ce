//! LoRA, DoRA and LoRA-bias parity with Python peft + transformers on the committed fixtures.
//! Reference: tools/reference/make_fixtures.py, make_dora_fixtures.py and make_bias_fixtures.py
//! (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, load_case};
use peft::{ModelInputs, PeftModel};

const TOL: f32 = 1e-4;

/// The LoRA cases (make_fixtures.py), the DoRA cases (make_dora_fixtures.py) and the `bias` /
/// `lora_bias` cases (make_bias_fixtures.py).
fn cases() -> Vec<serde_json::Value> {
    ["cases.json", "dora_cases.json", "bias_cases.json"]
        .iter()
        .flat_map(|name| {
            let text = std::fs::read_to_string(fixtures().join(name)).unwrap();
            serde_json::from_str::<Vec<serde_json::Value>>(&text).unwrap()
        })
        .collect()
}

fn load(model: &str, adapter: &str, trainable: bool) -> PeftModel {
    let base = peft::models::load_model(
        &fixtures().join("models").join(model),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let dir = fixtures()
        .join("adapters")
        .join(format!("{model}__{adapter}"));
    PeftModel::from_pretrained(base, &dir, trainable).unwrap()
}

#[test]
fn adapted_merged_and_base_logits_match_peft() {
    for case in cases() {
        let (m, a) = (
            case["model"].as_str().unwrap(),
            case["adapter"].as_str().unwrap(),
        );
        let name = format!("{m}__{a}");
        let data = load_case(&name);
        let inputs = ModelInputs::from_ids(data["input_ids"].clone())
            .with_mask(Some(data["attention_mask"].clone()));
        let mut model = load(m, a, false);

        let adapted = model.forward(&inputs).unwrap();
        assert_close(
            &format!("{name} adapted"),
            &adapted,
            &data["logits_adapted"],
            TOL,
        );

        let first_row = ModelInputs::from_ids(data["input_ids"].narrow(0, 0, 1).unwrap());
        assert_close(
            &format!("{name} unmasked"),
            &model.forward(&first_row).unwrap(),
            &data["logits_unmasked"],
            TOL,
        );

        {
            let off = model.disable_adapters();
            assert_close(
                &format!("{name} base"),
                &off.forward(&inputs).unwrap(),
                &data["logits_base"],
                TOL,
            );
        }
        // the guard restored the adapter
        assert_close(
            &format!("{name} re-enabled"),
            &model.forward(&inputs).unwrap(),
            &adapted,
            0.0,
        );

        model.merge_adapter().unwrap();
        assert_close(
            &format!("{name} merged"),
            &model.forward(&inputs).unwrap(),
            &data["logits_merged"],
            TOL,
        );
        model.unmerge_adapter().unwrap();
        assert_close(
            &format!("{name} unmerged"),
            &model.forward(&inputs).unwrap(),
            &adapted,
            0.0,
        );

        let unloaded = model.merge_and_unload().unwrap();
        let merged = unloaded.forward(&inputs, None).unwrap();
        assert_close(
            &format!("{name} merge_and_unload"),
            &merged,
            &data["logits_merged"],
            TOL,
        );
    }
}

#[test]
fn parameter_line_matches_peft() {
    for case in cases() {
        let (m, a) = (
            case["model"].as_str().unwrap(),
            case["adapter"].as_str().unwrap(),
        );
        let model = load(m, a, true);
        assert_eq!(
            model.parameter_line(),
            case["parameter_line"].as_str().unwrap(),
            "{m}__{a}"
        );
    }
}

#[test]
fn greedy_generation_with_kv_cache_matches_peft() {
    for case in cases() {
        let (m, a) = (
            case["model"].as_str().unwrap(),
            case["adapter"].as_str().unwrap(),
        );
        let data = load_case(&format!("{m}__{a}"));
        let model = load(m, a, false);
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
        assert_eq!(got, expected, "{m}__{a}");
    }
}

#[test]
fn incremental_decoding_matches_full_forward() {
    let model = load("llama_tiny", "lora_qv", false);
    let data = load_case("llama_tiny__lora_qv");
    let ids = data["input_ids"].clone();
    let mask = data["attention_mask"].clone();
    let full = model
        .forward(&ModelInputs::from_ids(ids.clone()).with_mask(Some(mask.clone())))
        .unwrap();
    let mut cache = model.new_cache();
    let t = ids.dim(1).unwrap();
    let mut steps = Vec::new();
    // prefill 5 tokens, then one at a time
    let first = ModelInputs::from_ids(ids.narrow(1, 0, 5).unwrap())
        .with_mask(Some(mask.narrow(1, 0, 5).unwrap()));
    steps.push(model.forward_with_cache(&first, &mut cache).unwrap());
    for i in 5..t {
        let step = ModelInputs::from_ids(ids.narrow(1, i, 1).unwrap())
            .with_mask(Some(mask.narrow(1, 0, i + 1).unwrap()));
        steps.push(model.forward_with_cache(&step, &mut cache).unwrap());
    }
    let incremental = Tensor::cat(&steps, 1).unwrap();
    assert_close("incremental vs full", &incremental, &full, 1e-4);
}

#[test]
fn loss_and_gradients_match_peft() {
    for case in cases() {
        let (m, a) = (
            case["model"].as_str().unwrap(),
            case["adapter"].as_str().unwrap(),
        );
        let name = format!("{m}__{a}");
        let data = load_case(&name);
        let model = load(m, a, true);
        // Eval mode: no dropout, as in the reference (which set p = 0).
        let batch = peft::training::CausalLmBatch::from_ids(
            data["input_ids"].clone(),
            Some(data["attention_mask"].clone()),
        )
        .unwrap();
        let loss = peft::training::causal_lm_batch_loss(&model, &batch).unwrap();
        assert_close(
            &format!("{name} loss"),
            &loss.reshape(1).unwrap(),
            &data["loss"],
            TOL,
        );
        let grads = loss.backward().unwrap();
        let vars = model.adapter("default").unwrap().vars();
        let reference = data.keys().filter(|k| k.starts_with("grad.")).count();
        assert_eq!(vars.len(), reference, "{name}: trainable tensors");
        for (path, var) in vars {
            let key = format!("grad.base_model.model.{path}");
            let expected = data
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: no reference gradient {key}"));
            let got = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient for {path}"));
            assert_close(&format!("{name} {key}"), got, expected, TOL);
        }
    }
}
