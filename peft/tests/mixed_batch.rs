//! Mixed-adapter batches (peft's `adapter_names=`): each row runs its own adapter, in the
//! forward pass and in batched greedy generation, against peft on LLaMA (attention, MLP, the
//! input embedding and the head adapted; a modules_to_save head copy), GPT-2 (Conv1D, lora_bias)
//! and T5 (encoder and decoder).
//! Reference: tools/reference/make_mixed_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures};
use peft::{ModelInputs, PeftError, PeftModel};

fn data() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("mixed_batch.safetensors"), &Device::Cpu)
        .unwrap()
}

fn cases() -> Vec<serde_json::Value> {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("mixed_batch.json")).unwrap())
        .unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn model_of(case: &serde_json::Value) -> PeftModel {
    let base = peft::models::load_model(
        &fixtures()
            .join("models")
            .join(case["model"].as_str().unwrap()),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut m = PeftModel::new(base);
    for pair in case["adapters"].as_array().unwrap() {
        let (name, dir) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        m.load_adapter(&fixtures().join("adapters").join(dir), name, false)
            .unwrap();
    }
    m
}

fn inputs(d: &HashMap<String, Tensor>, case: &str) -> ModelInputs {
    ModelInputs {
        input_ids: Some(d[&format!("{case}.input_ids")].clone()),
        attention_mask: Some(d[&format!("{case}.attention_mask")].clone()),
        decoder_input_ids: d.get(&format!("{case}.decoder_input_ids")).cloned(),
        ..Default::default()
    }
}

#[test]
fn mixed_batch_logits_match_peft() {
    let d = data();
    for case in cases() {
        let name = case["case"].as_str().unwrap();
        let m = model_of(&case);
        let names = strings(&case["adapter_names"]);
        let logits = {
            let mixed = m.mixed_batch(&names).unwrap();
            mixed.forward(&inputs(&d, name)).unwrap()
        };
        assert_close(name, &logits, &d[&format!("{name}.logits")], 1e-4);
        // The guard is gone: the active adapter alone again, on every row.
        let plain = m.forward(&inputs(&d, name)).unwrap();
        assert!(common::max_abs_diff(&plain, &logits) > 1e-4, "{name}");
    }
}

#[test]
fn batched_generation_with_mixed_adapters_matches_peft() {
    let d = data();
    for case in cases() {
        let name = case["case"].as_str().unwrap();
        let m = model_of(&case);
        let names = strings(&case["gen_adapter_names"]);
        let want: Vec<Vec<u32>> = d[&format!("{name}.generated")]
            .to_dtype(DType::U32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let mixed = m.mixed_batch(&names).unwrap();
        let got = peft::generate::greedy_generate_batch(
            &mixed,
            &d[&format!("{name}.gen_input_ids")],
            &d[&format!("{name}.gen_attention_mask")],
            want[0].len(),
            &[],
        )
        .unwrap();
        assert_eq!(got, want, "{name}");
    }
}

/// Rows of an adapter that has no `modules_to_save` copy of a layer use the original layer
/// there (peft raises a KeyError), and DoRA adapters mix too (peft refuses them): each row equals
/// that row alone with its adapter active.
#[test]
fn every_row_equals_its_adapter_alone_dora_and_missing_copies_included() {
    let base = peft::models::load_model(
        &fixtures().join("models/llama_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let mut m = PeftModel::new(base);
    for (name, dir) in [
        ("mts", "llama_tiny__lora_mts"),
        ("qv", "llama_tiny__lora_qv"),
        ("dora", "llama_tiny__dora_mixed"),
    ] {
        m.load_adapter(&fixtures().join("adapters").join(dir), name, false)
            .unwrap();
    }
    let d = data();
    let ids = d["llama_mixed.input_ids"].clone();
    let mask = d["llama_mixed.attention_mask"].clone();
    let names = ["qv", "dora", "mts", "__base__", "dora"];
    let mixed = {
        let g = m.mixed_batch(&names).unwrap();
        g.forward(&ModelInputs::from_ids(ids.clone()).with_mask(Some(mask.clone())))
            .unwrap()
    };
    for (i, name) in names.iter().enumerate() {
        let row = ModelInputs::from_ids(ids.narrow(0, i, 1).unwrap())
            .with_mask(Some(mask.narrow(0, i, 1).unwrap()));
        let alone = if *name == "__base__" {
            m.disable_adapters().forward(&row).unwrap()
        } else {
            m.set_adapter(name).unwrap();
            m.forward(&row).unwrap()
        };
        assert_close(
            &format!("row {i} ({name})"),
            &mixed.narrow(0, i, 1).unwrap(),
            &alone,
            1e-5,
        );
    }
}

#[test]
fn mixed_batches_refuse_what_peft_refuses() {
    let case = &cases()[0];
    let mut m = model_of(case);
    let d = data();
    let inp = inputs(&d, "llama_mixed");

    let e = m.mixed_batch(&["qv", "nope"]).unwrap_err();
    assert!(
        matches!(e, PeftError::UnknownAdapter { .. }) && e.to_string().contains("nope"),
        "{e}"
    );
    // One name per row.
    let g = m.mixed_batch(&["qv", "embed"]).unwrap();
    let e = g.forward(&inp).unwrap_err();
    assert!(e.to_string().contains("adapter_names has 2"), "{e}");
    drop(g);

    m.set_training(true);
    let e = m.mixed_batch(&["qv"; 5]).unwrap_err();
    assert!(e.to_string().contains("training"), "{e}");
    m.set_training(false);

    m.merge_adapter().unwrap();
    let e = m.mixed_batch(&["qv"; 5]).unwrap_err();
    assert!(e.to_string().contains("merged"), "{e}");
    m.unmerge_adapter().unwrap();

    m.load_adapter(
        &fixtures().join("adapters/llama_tiny__prompt_random"),
        "prompt",
        false,
    )
    .unwrap();
    let e = m.mixed_batch(&["prompt"; 5]).unwrap_err();
    assert!(e.to_string().contains("prompt-learning"), "{e}");
}
