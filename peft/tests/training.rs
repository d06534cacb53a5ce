//! Training through the LoRA adapters: every trainable tensor gets a gradient, the loss falls,
//! frozen weights stay frozen, and save -> load reproduces the trained outputs.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use common::{assert_close, fixtures};
use peft::lora::LoraConfig;
use peft::models::{LlamaConfig, LlamaModel};
use peft::training::{causal_lm_batch_loss, causal_lm_step, check_gradients, CausalLmBatch};
use peft::{get_peft_model, AdapterConfig, ModelInputs, PeftModel};

fn tiny_base(seed: u64) -> LlamaModel {
    let mut cfg = LlamaConfig::tiny(64, 32, 2, 4, 2, 48);
    // Larger than HF's 0.02 so that a random base carries signal through its layers.
    cfg.initializer_range = 0.2;
    LlamaModel::random(cfg, seed, DType::F32, &Device::Cpu).unwrap()
}

fn batch() -> CausalLmBatch {
    let ids: Vec<u32> = (0..2 * 12).map(|i| (i * 7 % 60 + 1) as u32).collect();
    let ids = Tensor::from_vec(ids, (2, 12), &Device::Cpu).unwrap();
    let mask = Tensor::from_vec(
        [vec![1u32; 12], [vec![1u32; 9], vec![0u32; 3]].concat()].concat(),
        (2, 12),
        &Device::Cpu,
    )
    .unwrap();
    CausalLmBatch::from_ids(ids, Some(mask)).unwrap()
}

fn lora_all_linear_with_embedding() -> AdapterConfig {
    let mut cfg = LoraConfig::new(4, 8.0).with_dropout(0.1);
    cfg.targets.target_modules = Some(peft::TargetModules::List(
        [
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
            "embed_tokens",
            "lm_head",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    ));
    AdapterConfig::new(cfg.with_init(peft::lora::InitLoraWeights::Random))
}

#[test]
fn every_trainable_tensor_gets_a_gradient() {
    let model =
        get_peft_model(Box::new(tiny_base(1)), lora_all_linear_with_embedding(), 3).unwrap();
    model.set_training(true);
    let loss = causal_lm_batch_loss(&model, &batch()).unwrap();
    let grads = loss.backward().unwrap();
    let vars = model.trainable_named_vars();
    assert_eq!(
        vars.len(),
        (2 * 7 + 2) * 2,
        "A and B for 14 linears, the embedding and the head"
    );
    for (name, norm) in check_gradients(&grads, &vars).unwrap() {
        assert!(norm > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn loss_falls_and_frozen_weights_stay_frozen() {
    let model = get_peft_model(
        Box::new(tiny_base(2)),
        AdapterConfig::new(LoraConfig::new(8, 16.0).with_all_linear()),
        5,
    )
    .unwrap();
    let before: Vec<(String, Tensor)> = model.base_model().named_tensors().unwrap();
    model.set_training(true);
    let params = ParamsAdamW {
        lr: 1e-2,
        weight_decay: 0.0,
        ..Default::default()
    };
    let mut opt = AdamW::new(model.trainable_vars(), params).unwrap();
    let b = batch();
    let first = causal_lm_step(&model, &mut opt, &b, Some(1.0))
        .unwrap()
        .loss;
    let mut last = first;
    for _ in 0..40 {
        last = causal_lm_step(&model, &mut opt, &b, Some(1.0))
            .unwrap()
            .loss;
    }
    assert!(last < first * 0.7, "loss did not fall: {first} -> {last}");
    for ((name, a), (_, b)) in before
        .iter()
        .zip(model.base_model().named_tensors().unwrap())
    {
        assert_close(name, a, &b, 0.0);
    }
    let _ = opt.learning_rate();
}

#[test]
fn save_then_load_reproduces_trained_outputs() {
    let mut cfg =
        LoraConfig::new(4, 12.0).with_target_modules(["q_proj", "v_proj", "embed_tokens"]);
    cfg.lora_dropout = 0.05;
    let model = get_peft_model(Box::new(tiny_base(3)), AdapterConfig::new(cfg), 9).unwrap();
    model.set_training(true);
    let mut opt = AdamW::new_lr(model.trainable_vars(), 5e-3).unwrap();
    for _ in 0..5 {
        causal_lm_step(&model, &mut opt, &batch(), None).unwrap();
    }
    model.set_training(false);
    let b = batch();
    let inputs = ModelInputs::from_ids(b.input_ids.clone()).with_mask(b.attention_mask.clone());
    let trained = model.forward(&inputs).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let reloaded = PeftModel::from_pretrained(Box::new(tiny_base(3)), dir.path(), false).unwrap();
    assert_close(
        "reloaded",
        &reloaded.forward(&inputs).unwrap(),
        &trained,
        0.0,
    );
    let _ = fixtures();
}

/// Every method trains: every trainable tensor gets a gradient and the loss falls.
#[test]
fn every_method_trains() {
    let configs = [
        r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}"#,
        r#"{"peft_type": "IA3", "task_type": "CAUSAL_LM"}"#,
        r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}"#,
        r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prompt_tuning_init": "SAMPLE_VOCAB"}"#,
        r#"{"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_hidden_size": 16}"#,
        r#"{"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "encoder_reparameterization_type": "LSTM", "encoder_hidden_size": 8, "encoder_dropout": 0.1}"#,
        r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4}"#,
        r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "prefix_projection": true, "encoder_hidden_size": 16}"#,
    ];
    for json in configs {
        let config = AdapterConfig::from_json_str(json, "inline").unwrap();
        let model = get_peft_model(Box::new(tiny_base(4)), config, 11).unwrap();
        model.set_training(true);
        let b = batch();
        let loss = causal_lm_batch_loss(&model, &b).unwrap();
        let norms = check_gradients(&loss.backward().unwrap(), &model.trainable_named_vars())
            .unwrap_or_else(|e| panic!("{json}: {e}"));
        // Only LoRA's A may start with a zero gradient (its B starts at zero).
        for (name, norm) in norms {
            assert!(
                norm > 0.0 || name.contains("lora_A"),
                "{json}: {name} has a zero gradient"
            );
        }
        let params = ParamsAdamW {
            lr: 2e-2,
            weight_decay: 0.0,
            ..Default::default()
        };
        let mut opt = AdamW::new(model.trainable_vars(), params).unwrap();
        let first = causal_lm_step(&model, &mut opt, &b, Some(1.0))
            .unwrap()
            .loss;
        let mut last = first;
        for _ in 0..30 {
            last = causal_lm_step(&model, &mut opt, &b, Some(1.0))
                .unwrap()
                .loss;
        }
        assert!(
            last < first * 0.9,
            "{json}: loss did not fall: {first} -> {last}"
        );
    }
}
