//! One training step for each objective other than causal LM, against Python peft +
//! transformers: seq2seq LoRA on T5 (q, v, wi) and SEQ_CLS LoRA on BERT (query, value, with the
//! classifier as a trainable `modules_to_save` copy). Reference:
//! tools/reference/make_training_fixtures.py (torch 2.15, transformers 5.24, peft 0.21.2): the
//! adapter before any update, a right-padded batch, the logits, transformers' loss from
//! `labels=`, and the gradient of every trainable tensor.
//!
//! The batches are made by `peft::data::collate` from examples as `peft train` tokenizes them,
//! so the test covers the trainer's batching as well as the loss.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs_diff};
use peft::data::{collate, Example, Target};
use peft::training::{shift_right, Batch, CausalLmBatch, ClassificationBatch, Seq2SeqBatch};
use peft::{ModelInputs, PeftModel};

fn case(name: &str) -> HashMap<String, Tensor> {
    let path = fixtures()
        .join("training")
        .join(format!("{name}.safetensors"));
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn model(base: &str, adapter: &str) -> PeftModel {
    let dir = fixtures().join("models").join(base);
    let base = peft::models::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
    let mut m = PeftModel::new(base);
    m.load_adapter(&fixtures().join("training").join(adapter), "default", true)
        .unwrap();
    m.set_training(true);
    m
}

/// Row `i` of a 2-D integer tensor without the entries where `keep` is false.
fn row(t: &Tensor, i: usize, keep: impl Fn(usize, i64) -> bool) -> Vec<u32> {
    let r = t
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .remove(i);
    r.into_iter()
        .enumerate()
        .filter(|&(j, v)| keep(j, v))
        .map(|(_, v)| v as u32)
        .collect()
}

/// The reference batch's rows as `peft train` examples (padding dropped), each with the target
/// `target(i)`, collated back into a batch whose ids must be the reference's.
fn batch_of(d: &HashMap<String, Tensor>, target: impl Fn(usize) -> Target) -> Batch {
    let mask = &d["attention_mask"];
    let examples: Vec<Example> = (0..2)
        .map(|i| Example {
            ids: row(&d["input_ids"], i, |j, _| row(mask, i, |_, _| true)[j] == 1),
            learn: Vec::new(),
            line: i + 1,
            target: target(i),
        })
        .collect();
    let refs: Vec<&Example> = examples.iter().collect();
    let batch = collate(&refs, 0, &Device::Cpu).unwrap();
    let (Batch::Seq2Seq(Seq2SeqBatch { input_ids, .. })
    | Batch::Classification(ClassificationBatch { input_ids, .. })
    | Batch::CausalLm(CausalLmBatch { input_ids, .. })) = &batch;
    let ids = input_ids
        .to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap();
    assert_eq!(ids, d["input_ids"].to_vec2::<i64>().unwrap());
    batch
}

/// Loss, logits and every trainable tensor's gradient against the reference.
fn check_step(model: &PeftModel, batch: &Batch, logits: &Tensor, d: &HashMap<String, Tensor>) {
    let diff = max_abs_diff(logits, &d["logits"]);
    assert!(diff < 1e-4, "logits differ by {diff}");
    let loss = batch.loss(model).unwrap();
    let dl = max_abs_diff(&loss.reshape(1).unwrap(), &d["loss"]);
    assert!(dl < 1e-5, "loss {loss} differs by {dl}");
    let grads = loss.backward().unwrap();
    let vars = model.adapter("default").unwrap().vars();
    let want: Vec<&String> = d.keys().filter(|k| k.starts_with("grad.")).collect();
    assert_eq!(
        vars.len(),
        want.len(),
        "trainable tensors: {:?}",
        vars.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    for (path, var) in &vars {
        let key = format!("grad.{path}");
        let reference = d
            .get(&key)
            .unwrap_or_else(|| panic!("no reference gradient {key}"));
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let diff = max_abs_diff(g, reference);
        assert!(diff < 1e-4, "{path}: gradient differs by {diff}");
    }
}

#[test]
fn seq2seq_lora_step_on_t5_matches_peft() {
    let d = case("t5_seq2seq_lora");
    let model = model("t5_tiny", "t5_seq2seq_lora");
    let batch = batch_of(&d, |i| {
        Target::Decoder(row(&d["labels"], i, |_, v| v != -100))
    });
    let Batch::Seq2Seq(b) = &batch else {
        panic!("a seq2seq batch")
    };
    assert_eq!(
        b.labels.to_vec2::<i64>().unwrap(),
        d["labels"].to_vec2::<i64>().unwrap()
    );
    let decoder = shift_right(&b.labels, 0, 0).unwrap();
    assert_eq!(
        decoder.to_vec2::<i64>().unwrap(),
        d["decoder_input_ids"].to_vec2::<i64>().unwrap()
    );
    let inputs = ModelInputs {
        input_ids: Some(b.input_ids.clone()),
        attention_mask: b.attention_mask.clone(),
        decoder_input_ids: Some(decoder),
        ..Default::default()
    };
    let logits = model.forward(&inputs).unwrap();
    check_step(&model, &batch, &logits, &d);
}

#[test]
fn seq_cls_lora_step_on_bert_matches_peft() {
    let d = case("bert_seqcls_lora");
    let model = model("bert_seqcls", "bert_seqcls_lora");
    let labels = d["labels"].to_vec1::<i64>().unwrap();
    let batch = batch_of(&d, |i| Target::Class(labels[i] as u32));
    let Batch::Classification(b) = &batch else {
        panic!("a classification batch")
    };
    let inputs = ModelInputs::from_ids(b.input_ids.clone()).with_mask(b.attention_mask.clone());
    let logits = model.forward(&inputs).unwrap();
    check_step(&model, &batch, &logits, &d);
    let (correct, counted) = peft::training::correct_predictions(&logits, &b.labels).unwrap();
    assert_eq!(counted, 2);
    assert!(correct <= 2);
}
