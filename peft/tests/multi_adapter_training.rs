//! Training several adapters at once (peft's `set_adapter([...])`: all active and trained): the
//! loss and the gradient of every parameter of both adapters against peft 0.21, and an optimizer
//! step moving both.
//! Reference: tools/reference/make_multi_train_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::Device;
use candle_nn::Optimizer;
use common::{adapter_dir, assert_close, fixtures};
use peft::{ModelInputs, PeftModel};

#[test]
fn two_active_adapters_train_together_as_in_peft() {
    let d =
        candle_core::safetensors::load(fixtures().join("multi_train.safetensors"), &Device::Cpu)
            .unwrap();
    let mut m = PeftModel::new(common::base("llama_tiny"));
    m.load_adapter(&adapter_dir("llama_tiny", "lora_qv"), "qv", true)
        .unwrap();
    m.load_adapter(&adapter_dir("llama_tiny", "lora_qvo"), "qvo", true)
        .unwrap();
    m.set_adapters(&["qv", "qvo"]).unwrap();
    let inputs = ModelInputs {
        input_ids: Some(d["input_ids"].clone()),
        attention_mask: Some(d["attention_mask"].clone()),
        ..Default::default()
    };
    let loss = m.causal_lm_loss(&inputs, &d["labels"]).unwrap();
    assert_close("loss", &loss.reshape(1).unwrap(), &d["loss"], 1e-5);
    let grads = loss.backward().unwrap();
    let vars = m.trainable_named_vars();
    assert_eq!(
        vars.len(),
        8 + 12,
        "every parameter of both adapters is trained"
    );
    for (name, var) in &vars {
        let (adapter, path) = name.split_once(':').unwrap();
        let want = &d[&format!("grad/{adapter}/base_model.model.{path}")];
        let got = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert_close(name, got, want, 1e-5);
    }
    // One step moves both adapters.
    let before: Vec<_> = vars
        .iter()
        .map(|(_, v)| v.as_tensor().copy().unwrap())
        .collect();
    let mut opt = candle_nn::AdamW::new_lr(m.trainable_vars(), 1e-2).unwrap();
    opt.backward_step(&m.causal_lm_loss(&inputs, &d["labels"]).unwrap())
        .unwrap();
    for ((name, v), b) in vars.iter().zip(&before) {
        assert!(
            common::max_abs_diff(v.as_tensor(), b) > 0.0,
            "{name} did not move"
        );
    }
}

#[test]
fn set_adapter_modes_switch_what_trains_as_peft() {
    // Two adapters loaded frozen (peft: `is_trainable=False`), then peft's
    // `set_adapter("second", inference_mode=False)`: exactly that one trains.
    let dir = common::adapter_dir("llama_tiny", "lora_qv");
    let mut m = peft::PeftModel::from_pretrained(common::base("llama_tiny"), &dir, false).unwrap();
    m.load_adapter(&dir, "second", false).unwrap();
    assert!(m.trainable_vars().is_empty());
    m.set_adapters_with_mode(&["second"], false).unwrap();
    assert!(m.adapter("second").unwrap().is_trainable());
    assert!(!m.adapter("default").unwrap().is_trainable());
    let n = m.adapter("second").unwrap().vars().len();
    assert_eq!(m.trainable_vars().len(), n);
    // inference_mode=True freezes the activated adapter too.
    m.set_adapters_with_mode(&["default", "second"], true)
        .unwrap();
    assert!(m.trainable_vars().is_empty());
    // set_requires_grad flips only the named adapters.
    m.set_requires_grad(&["default"], true).unwrap();
    assert!(m.adapter("default").unwrap().is_trainable());
    assert!(!m.adapter("second").unwrap().is_trainable());
    assert_eq!(m.trainable_vars().len(), n);
    assert!(m.set_requires_grad(&["missing"], true).is_err());
}
