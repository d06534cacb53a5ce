//! Hot-swapping (peft's `hotswap_adapter`): new weights written into a loaded adapter's own
//! parameters, a smaller rank zero-padded, a missing module zero-filled, the scaling taken from
//! the new config; outputs against peft 0.21, the saved result reloading to the same outputs,
//! and peft's refusals (and one of ours: a larger rank).
//! Reference: tools/reference/make_hotswap_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use common::{adapter_dir, assert_close, fixtures};
use peft::PeftModel;

fn data() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("hotswap.safetensors"), &Device::Cpu).unwrap()
}

fn loaded() -> PeftModel {
    PeftModel::from_pretrained(
        common::base("llama_tiny"),
        &adapter_dir("llama_tiny", "lora_qv"),
        true,
    )
    .unwrap()
}

#[test]
fn hotswapped_adapters_run_as_peft_and_keep_their_parameters() {
    let d = data();
    for name in ["qv_r2", "q_only"] {
        let mut m = loaded();
        let before: Vec<(String, candle_core::Var)> = m.adapter("default").unwrap().vars();
        let before_ids: Vec<_> = before.iter().map(|(_, v)| v.as_tensor().id()).collect();
        m.hotswap_adapter(
            &adapter_dir("llama_tiny", &format!("lora_{name}")),
            "default",
        )
        .unwrap();
        let logits = m.forward(&common::case_inputs(&d)).unwrap();
        assert_close(name, &logits, &d[&format!("{name}.logits")], 1e-4);
        // The same parameters (an optimizer holding them sees the new values), same shapes.
        let after = m.adapter("default").unwrap().vars();
        assert_eq!(
            after
                .iter()
                .map(|(_, v)| v.as_tensor().id())
                .collect::<Vec<_>>(),
            before_ids,
            "{name}"
        );
        assert_eq!(m.trainable_vars().len(), before.len());
        // Saved as swapped, reloaded: the same outputs.
        let dir = tempfile::tempdir().unwrap();
        m.save_adapter("default", dir.path()).unwrap();
        common::assert_reloads_to(
            name,
            "llama_tiny",
            dir.path(),
            &common::case_inputs(&d),
            &logits,
        );
    }
}

#[test]
fn hotswap_refusals_leave_the_adapter_as_it_was() {
    let d = data();
    let mut m = loaded();
    let reference = m.forward(&common::case_inputs(&d)).unwrap();
    // An adapter of a module the loaded one lacks: qv_r2 plus an o_proj factor.
    let extra = tempfile::tempdir().unwrap();
    let src = adapter_dir("llama_tiny", "lora_qv_r2");
    std::fs::copy(
        src.join("adapter_config.json"),
        extra.path().join("adapter_config.json"),
    )
    .unwrap();
    let mut t = candle_core::safetensors::load(src.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let a = t["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].clone();
    t.insert(
        "base_model.model.model.layers.0.self_attn.o_proj.lora_A.weight".into(),
        a,
    );
    candle_core::safetensors::save(&t, extra.path().join("adapter_model.safetensors")).unwrap();
    for (dir, needle) in [
        (
            adapter_dir("llama_tiny", "lora_qv_r6"),
            "rank above the loaded",
        ),
        (extra.path().to_path_buf(), "unexpected keys"),
        (adapter_dir("llama_tiny", "lora_patterns"), "use_rslora"),
        (
            adapter_dir("llama_tiny", "ia3_default"),
            "Incompatible PEFT types",
        ),
    ] {
        let adapter = dir.display().to_string();
        let adapter = adapter.as_str();
        let e = m.hotswap_adapter(&dir, "default").unwrap_err().to_string();
        assert!(e.contains(needle), "{adapter}: {e}");
        assert_close(
            adapter,
            &m.forward(&common::case_inputs(&d)).unwrap(),
            &reference,
            0.0,
        );
    }
    let e = m
        .hotswap_adapter(&adapter_dir("llama_tiny", "lora_qv_r2"), "other")
        .unwrap_err()
        .to_string();
    assert!(e.contains("other"), "{e}");
    m.merge_adapter().unwrap();
    let e = m
        .hotswap_adapter(&adapter_dir("llama_tiny", "lora_qv_r2"), "default")
        .unwrap_err()
        .to_string();
    assert!(e.contains("merged"), "{e}");
}
