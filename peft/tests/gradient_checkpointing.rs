//! Gradient checkpointing (`PeftModel::set_gradient_checkpointing`, `peft train
//! --gradient-checkpointing`) changes memory, never numbers: the training loss and every
//! trainable gradient are the same with it on and off, for LoRA with dropout (the recomputation
//! draws the forward pass's masks), prompt tuning (gradients flow back through every block to
//! the virtual tokens) and prefix tuning (the learned prefix enters each layer through the
//! cache), on each architecture that supports it. A whole `Trainer` run gives the same adapter.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::{base, max_abs_diff};
use peft::{get_peft_model, AdapterConfig, ModelInputs, PeftModel};

fn model(name: &str, config: &str) -> PeftModel {
    let config = AdapterConfig::from_json_str(config, "test").unwrap();
    get_peft_model(base(name), config, 7).unwrap()
}

fn lora(task: &str, targets: &str) -> String {
    format!(
        r#"{{"peft_type": "LORA", "task_type": "{task}", "r": 4, "lora_alpha": 11, "lora_dropout": 0.25,
            "target_modules": [{targets}], "init_lora_weights": false}}"#
    )
}

/// Loss and gradients of one training step of `m` on a padded batch (seq2seq models get
/// decoder inputs and labels; encoders the mean square of their outputs).
fn step(m: &PeftModel) -> (f32, Vec<(String, Tensor)>) {
    let dev = Device::Cpu;
    peft::nn::set_dropout_step(3);
    m.set_training(true);
    let ids = Tensor::new(
        &[[0u32, 0, 5, 17, 99, 3, 64], [11, 12, 13, 14, 15, 16, 17]],
        &dev,
    )
    .unwrap();
    let mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1, 1], [1; 7]], &dev).unwrap();
    let info = m.base_model().info();
    let loss = if info.is_encoder_decoder {
        let labels = Tensor::new(&[[7i64, 8, 9, -100], [10, 11, -100, -100]], &dev).unwrap();
        let start = info.decoder_start_token_id.unwrap();
        let inputs = ModelInputs {
            input_ids: Some(ids),
            attention_mask: Some(mask),
            decoder_input_ids: Some(peft::training::shift_right(&labels, start, 0).unwrap()),
            ..Default::default()
        };
        m.seq2seq_loss(&inputs, &labels).unwrap()
    } else if info.task_type == peft::TaskType::CausalLm {
        let inputs = ModelInputs::from_ids(ids.clone()).with_mask(Some(mask));
        let labels = ids.to_dtype(DType::I64).unwrap();
        m.causal_lm_loss(&inputs, &labels).unwrap()
    } else {
        // Encoders: a loss on every output.
        let inputs = ModelInputs::from_ids(ids).with_mask(Some(mask));
        m.forward(&inputs)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let value = loss.to_scalar::<f32>().unwrap();
    let grads = peft::recompute::backward(&(loss * 0.7).unwrap()).unwrap();
    let named = m
        .trainable_named_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name} got no gradient"))
                .clone();
            (name, g)
        })
        .collect();
    (value, named)
}

/// `make` builds the same model twice (dropout generators are stateful, so each run starts
/// from fresh ones).
fn check(what: &str, make: impl Fn() -> PeftModel) {
    let (loss, plain) = step(&make());
    let mut m = make();
    m.set_gradient_checkpointing(true).unwrap();
    assert!(m.gradient_checkpointing());
    let before = peft::recompute::recomputed_blocks();
    let (loss_ck, ck) = step(&m);
    let layers = m.base_model().info().num_layers as u64;
    assert!(
        peft::recompute::recomputed_blocks() - before >= layers,
        "{what}: checkpointing did not recompute the {layers} blocks"
    );
    assert!(
        (loss - loss_ck).abs() <= 1e-6 * loss.abs().max(1.0),
        "{what}: loss {loss} vs {loss_ck} with checkpointing"
    );
    assert!(!plain.is_empty(), "{what}: nothing trainable");
    for ((name, a), (_, b)) in plain.iter().zip(&ck) {
        let scale = a
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        let d = max_abs_diff(a, b);
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{what}: {name} gradients differ by {d} (largest {scale})"
        );
    }
    // Evaluation under no_grad does not recompute and gives the same output.
    m.set_training(false);
    let ids = Tensor::new(&[[5u32, 6, 7]], &Device::Cpu).unwrap();
    if !m.base_model().info().is_encoder_decoder {
        let _g = peft::no_grad();
        let a = m.forward(&ModelInputs::from_ids(ids.clone())).unwrap();
        m.set_gradient_checkpointing(false).unwrap();
        let b = m.forward(&ModelInputs::from_ids(ids)).unwrap();
        assert!(max_abs_diff(&a, &b) == 0.0, "{what}: eval output changed");
    }
}

#[test]
fn llama_lora_with_dropout_gets_the_same_gradients() {
    check("llama lora", || {
        model(
            "llama_tiny",
            &lora(
                "CAUSAL_LM",
                r#""q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head""#,
            ),
        )
    });
    check("mistral lora", || {
        model(
            "mistral_tiny",
            &lora("CAUSAL_LM", r#""q_proj", "down_proj""#),
        )
    });
}

#[test]
fn llama_prompt_and_prefix_tuning_get_the_same_gradients() {
    check("llama prompt tuning", || {
        model(
            "llama_tiny",
            r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}"#,
        )
    });
    check("llama prefix tuning", || {
        model(
            "llama_tiny",
            r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 16}"#,
        )
    });
}

#[test]
fn gpt2_and_bert_get_the_same_gradients() {
    check("gpt2 lora", || {
        model(
            "gpt2_tiny",
            &lora("CAUSAL_LM", r#""c_attn", "c_proj", "c_fc""#),
        )
    });
    check("gpt2 prefix tuning", || {
        model(
            "gpt2_tiny",
            r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 2}"#,
        )
    });
    check("bert lora", || {
        model(
            "bert_base",
            &lora(
                "FEATURE_EXTRACTION",
                r#""query", "value", "intermediate.dense""#,
            ),
        )
    });
}

#[test]
fn t5_encoder_and_decoder_get_the_same_gradients() {
    check("t5 lora", || {
        model(
            "t5_tiny",
            &lora("SEQ_2_SEQ_LM", r#""q", "k", "v", "o", "wi", "wo""#),
        )
    });
    check("mt5 lora", || {
        model("mt5_tiny", &lora("SEQ_2_SEQ_LM", r#""q", "v", "wi_0""#))
    });
    check("t5 prompt tuning", || {
        model(
            "t5_tiny",
            r#"{"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}"#,
        )
    });
    check("t5 prefix tuning", || {
        model(
            "t5_tiny",
            r#"{"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}"#,
        )
    });
}
