//! `PeftModel::causal_lm_loss` (the training loss, which applies a frozen `lm_head` a chunk of
//! rows at a time and never holds the `[B, T, V]` logits) equals the logits of
//! `PeftModel::forward` followed by `causal_lm_loss`, in value and in every trainable gradient:
//! LLaMA with an untied and a tied head, Qwen2, GPT-2, bf16-kept weights, left padding, LoRA on
//! `lm_head` itself (which takes the logits path), modules_to_save on the head, prompt tuning
//! (labels gain ignored virtual positions) and prefix tuning (a cache from the first step). The
//! reference-checked losses and gradients (parity tests) go through the same path. The same
//! for `PeftModel::seq2seq_loss` on T5 and mT5 (LoRA, prompt tuning, prefix tuning). And
//! `ModelInputs::logits_to_keep` (generation's prefill) gives the last positions of the logits.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff};
use peft::models::Precision;
use peft::training::CausalLmBatch;
use peft::{get_peft_model, AdapterConfig, ModelInputs, PeftModel};

fn lora(targets: &str, extra: &str) -> String {
    format!(
        r#"{{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 11, "lora_dropout": 0.0,
            "target_modules": [{targets}], "init_lora_weights": false{extra}}}"#
    )
}

/// Left-padded batch of two rows of nine tokens; labels ignore the padding.
fn batch() -> CausalLmBatch {
    let dev = Device::Cpu;
    let ids = Tensor::new(
        &[
            [0u32, 0, 5, 17, 99, 3, 64, 127, 8],
            [11, 12, 13, 14, 15, 16, 17, 18, 19],
        ],
        &dev,
    )
    .unwrap();
    let mask = Tensor::new(&[[0u32, 0, 1, 1, 1, 1, 1, 1, 1], [1; 9]], &dev).unwrap();
    CausalLmBatch::from_ids(ids, Some(mask)).unwrap()
}

/// The loss and trainable gradients through the logits (the reference path).
fn through_logits(model: &PeftModel, inputs: &ModelInputs, labels: &Tensor) -> Tensor {
    let logits = model.forward(inputs).unwrap();
    let virtual_tokens = model.virtual_tokens_in_output();
    let labels = if virtual_tokens > 0 {
        let ignore = Tensor::full(
            peft::loss::IGNORE_INDEX,
            (labels.dim(0).unwrap(), virtual_tokens),
            &Device::Cpu,
        )
        .unwrap();
        Tensor::cat(&[&ignore, &labels.to_dtype(DType::I64).unwrap()], 1).unwrap()
    } else {
        labels.clone()
    };
    peft::loss::causal_lm_loss(&logits, &labels).unwrap()
}

fn check(what: &str, model: &PeftModel) {
    model.set_training(true);
    let b = batch();
    let inputs = ModelInputs::from_ids(b.input_ids.clone()).with_mask(b.attention_mask.clone());
    let fused = model.causal_lm_loss(&inputs, &b.labels).unwrap();
    let chain = through_logits(model, &inputs, &b.labels);
    let (f, c) = (
        fused.to_scalar::<f32>().unwrap(),
        chain.to_scalar::<f32>().unwrap(),
    );
    assert!(
        (f - c).abs() < 1e-5 * c.abs().max(1.0),
        "{what}: loss {f} vs {c}"
    );
    let gf = (fused * 0.7).unwrap().backward().unwrap();
    let gc = (chain * 0.7).unwrap().backward().unwrap();
    let vars = model.trainable_named_vars();
    assert!(!vars.is_empty(), "{what}: nothing trainable");
    for (name, var) in vars {
        let a = gf
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{what}: {name} got no gradient"));
        let r = gc.get(var.as_tensor()).unwrap();
        let scale = r
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(scale > 0.0, "{what}: {name} has a zero gradient");
        let d = max_abs_diff(a, r);
        assert!(
            d <= 1e-5 * scale.max(1.0),
            "{what}: {name} gradients differ by {d} (largest {scale})"
        );
    }
}

fn model(name: &str, precision: Precision, config: &str) -> PeftModel {
    let base = peft::models::load_model(
        &fixtures().join("models").join(name),
        precision,
        &Device::Cpu,
    )
    .unwrap();
    get_peft_model(
        base,
        AdapterConfig::from_json_str(config, "inline").unwrap(),
        5,
    )
    .unwrap()
}

#[test]
fn fused_head_loss_equals_logits_then_loss() {
    let qv = lora(r#""q_proj", "v_proj""#, "");
    check(
        "llama (untied)",
        &model("llama_tiny", DType::F32.into(), &qv),
    );
    check(
        "llama3 (tied)",
        &model("llama3_rope_tied", DType::F32.into(), &qv),
    );
    check("qwen2", &model("qwen2_tiny", DType::F32.into(), &qv));
    check(
        "llama bf16-weights",
        &model("llama_tiny", Precision::bf16_matrices(), &qv),
    );
    check(
        "gpt2 (Conv1D, tied)",
        &model("gpt2_tiny", DType::F32.into(), &lora(r#""c_attn""#, "")),
    );
    check(
        "llama, LoRA on lm_head",
        &model(
            "llama_tiny",
            DType::F32.into(),
            &lora(r#""q_proj", "lm_head""#, ""),
        ),
    );
    check(
        "llama, lm_head in modules_to_save",
        &model(
            "llama_tiny",
            DType::F32.into(),
            &lora(r#""v_proj""#, r#", "modules_to_save": ["lm_head"]"#),
        ),
    );
    check(
        "llama, prompt tuning",
        &model(
            "llama_tiny",
            DType::F32.into(),
            r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}"#,
        ),
    );
    check(
        "llama, prefix tuning",
        &model(
            "llama_tiny",
            DType::F32.into(),
            r#"{"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3, "prefix_projection": true, "encoder_hidden_size": 16}"#,
        ),
    );
}

/// Wrong labels are refused with the expected and found shapes or ids.
#[test]
fn bad_labels_name_what_was_expected() {
    let m = model("llama_tiny", DType::F32.into(), &lora(r#""q_proj""#, ""));
    let b = batch();
    let inputs = ModelInputs::from_ids(b.input_ids.clone());
    let err = m
        .causal_lm_loss(
            &inputs,
            &Tensor::zeros((2, 8), DType::I64, &Device::Cpu).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("[2, 9]") && err.contains("[2, 8]"), "{err}");
    let mut bad = vec![0i64; 18];
    bad[4] = 128;
    let err = m
        .causal_lm_loss(
            &inputs,
            &Tensor::from_vec(bad, (2, 9), &Device::Cpu).unwrap(),
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("0..128") && err.contains("128"), "{err}");
}

/// `logits_to_keep = k` returns the last `k` positions of the full logits (0 or more than the
/// length: all), for decoder-only models with and without a prompt and for T5's decoder.
#[test]
fn logits_to_keep_is_the_last_positions() {
    let qv = lora(r#""q_proj", "v_proj""#, "");
    let prompt =
        r#"{"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 3}"#;
    let cases = [
        ("llama", model("llama_tiny", DType::F32.into(), &qv)),
        (
            "llama, prompt tuning",
            model("llama_tiny", DType::F32.into(), prompt),
        ),
        (
            "gpt2",
            model("gpt2_tiny", DType::F32.into(), &lora(r#""c_attn""#, "")),
        ),
    ];
    let b = batch();
    for (what, m) in &cases {
        let inputs = ModelInputs::from_ids(b.input_ids.clone()).with_mask(b.attention_mask.clone());
        let full = m.forward(&inputs).unwrap();
        let t = full.dim(1).unwrap();
        for keep in [0, 1, 4, t + 5] {
            let part = m
                .forward(&ModelInputs {
                    logits_to_keep: keep,
                    ..inputs.clone()
                })
                .unwrap();
            let n = if keep == 0 || keep > t { t } else { keep };
            assert_eq!(part.dims(), [2, n, 128], "{what} keep {keep}");
            let d = max_abs_diff(&part, &full.narrow(1, t - n, n).unwrap());
            assert!(d < 1e-5, "{what} keep {keep}: differs by {d}");
        }
    }
    let t5 = peft::models::load_model(
        &fixtures().join("models").join("t5_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let dev = Device::Cpu;
    let inputs = ModelInputs {
        input_ids: Some(Tensor::new(&[[5u32, 6, 7, 8]], &dev).unwrap()),
        decoder_input_ids: Some(Tensor::new(&[[0u32, 9, 10]], &dev).unwrap()),
        ..Default::default()
    };
    let full = t5.forward(&inputs, None).unwrap();
    let last = t5
        .forward(
            &ModelInputs {
                logits_to_keep: 1,
                ..inputs.clone()
            },
            None,
        )
        .unwrap();
    let v = full.dim(2).unwrap();
    assert_eq!(last.dims(), [1, 1, v]);
    assert!(
        max_abs_diff(&last, &full.narrow(1, 2, 1).unwrap()) < 1e-5,
        "t5"
    );
}

/// `PeftModel::seq2seq_loss` (T5's decoder head applied in chunks) equals the decoder logits
/// followed by `cross_entropy`, in value and gradients, for T5 and mT5 with LoRA, prompt tuning
/// and prefix tuning, labels with ignored positions.
#[test]
fn seq2seq_head_loss_equals_logits_then_loss() {
    let dev = Device::Cpu;
    let labels = Tensor::new(&[[7i64, 8, 9, -100], [10, 11, -100, -100]], &dev).unwrap();
    let lora_s2s = r#"{"peft_type": "LORA", "task_type": "SEQ_2_SEQ_LM", "r": 4, "lora_alpha": 11, "lora_dropout": 0.0,
        "target_modules": ["q", "v"], "init_lora_weights": false}"#;
    let cases = [
        ("t5 lora", "t5_tiny", lora_s2s),
        ("mt5 lora", "mt5_tiny", lora_s2s),
        (
            "t5 prompt tuning",
            "t5_tiny",
            r#"{"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}"#,
        ),
        (
            "t5 prefix tuning",
            "t5_tiny",
            r#"{"peft_type": "PREFIX_TUNING", "task_type": "SEQ_2_SEQ_LM", "num_virtual_tokens": 3}"#,
        ),
    ];
    for (what, name, config) in cases {
        let m = model(name, DType::F32.into(), config);
        m.set_training(true);
        let start = m.base_model().info().decoder_start_token_id.unwrap();
        let inputs = ModelInputs {
            input_ids: Some(Tensor::new(&[[5u32, 6, 7, 8, 1], [9, 10, 1, 0, 0]], &dev).unwrap()),
            attention_mask: Some(
                Tensor::new(&[[1u32, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &dev).unwrap(),
            ),
            decoder_input_ids: Some(peft::training::shift_right(&labels, start, 0).unwrap()),
            ..Default::default()
        };
        let fused = m.seq2seq_loss(&inputs, &labels).unwrap();
        let logits = m.forward(&inputs).unwrap();
        let v = logits.dim(2).unwrap();
        let chain = peft::loss::cross_entropy(
            &logits.reshape((8, v)).unwrap(),
            &labels.reshape(8).unwrap(),
        )
        .unwrap()
        .0;
        let (f, c) = (
            fused.to_scalar::<f32>().unwrap(),
            chain.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (f - c).abs() < 1e-5 * c.abs().max(1.0),
            "{what}: loss {f} vs {c}"
        );
        let gf = fused.backward().unwrap();
        let gc = chain.backward().unwrap();
        for (name, var) in m.trainable_named_vars() {
            let a = gf
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{what}: {name} got no gradient"));
            let r = gc.get(var.as_tensor()).unwrap();
            let scale = r
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_abs_diff(a, r);
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{what}: {name} gradients differ by {d} (largest {scale})"
            );
        }
        let err = m
            .seq2seq_loss(&inputs, &labels.narrow(1, 0, 3).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[2, 4]") && err.contains("[2, 3]"),
            "{what}: {err}"
        );
    }
}
