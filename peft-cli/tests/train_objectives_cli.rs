//! `peft train` and `peft eval` on the objectives beyond causal LM: a T5 folder with a
//! prompt/completion JSONL (loss on the completion) and a BERT sequence classifier with a CSV
//! of texts and string labels (class names from the data, written to `labels.json`; `peft
//! eval` reports accuracy). Both on small random models with a byte-level tokenizer: the loss
//! in `metrics.jsonl` falls, and `peft logits` reads the adapter back.
//!
//! With `PEFT_KEEP_TRAINED=DIR` the model folders, adapters and a `check.safetensors` (inputs
//! and logits) are copied to `DIR/<case>/` for `tools/reference/check_rust_adapter.py`, which
//! loads them into Python peft.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fails, ok, peft};
use peft::models::tokenizer::byte_tokenizer;
use peft::models::{BertConfig, BertModel, T5Config, T5Model};

fn tokenizer(dir: &Path, specials: &[&str], config: serde_json::Value) {
    byte_tokenizer(specials)
        .unwrap()
        .save(dir.join("tokenizer.json"), false)
        .unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

fn t5_folder(dir: &Path) {
    let cfg = serde_json::json!({
        "model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "vocab_size": 260,
        "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 2,
        "num_decoder_layers": 2, "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 16, "feed_forward_proj": "relu",
        "decoder_start_token_id": 257, "pad_token_id": 257, "eos_token_id": 256,
        "tie_word_embeddings": true, "initializer_range": 0.5
    });
    let cfg = T5Config::from_map(cfg.as_object().unwrap().clone(), "test").unwrap();
    let model = T5Model::random(cfg, 3, DType::F32, &Device::Cpu).unwrap();
    peft::checkpoint::save_model_folder(&model, dir).unwrap();
    tokenizer(
        dir,
        &["</s>", "<pad>"],
        serde_json::json!({"eos_token": "</s>", "pad_token": "<pad>"}),
    );
}

fn bert_folder(dir: &Path, architecture: &str) {
    let cfg = serde_json::json!({
        "model_type": "bert", "architectures": [architecture],
        "vocab_size": 260, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64, "type_vocab_size": 2,
        "num_labels": 2, "pad_token_id": 258, "initializer_range": 0.2
    });
    let cfg = BertConfig::from_map(cfg.as_object().unwrap().clone(), "test", None).unwrap();
    let model = BertModel::random(cfg, 3, DType::F32, &Device::Cpu).unwrap();
    peft::checkpoint::save_model_folder(&model, dir).unwrap();
    tokenizer(
        dir,
        &["[CLS]", "[SEP]", "[PAD]"],
        serde_json::json!({"cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]"}),
    );
}

/// The `loss` of each step line in `metrics.jsonl`.
fn losses(out: &Path) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()?
                .get("loss")?
                .as_f64()
        })
        .collect()
}

/// `peft train` of `model` on `data` into `out`: 12 steps of 4 sequences (`extra` flags appended).
fn train_run(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    let args = [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "12",
        "--batch-size",
        "4",
        "--lr",
        "2e-2",
        "--seq-len",
        "64",
        "--no-progress",
        "--seed",
        "5",
    ];
    peft(&[&args[..], extra].concat())
}

/// [`train_run`], expected to succeed: its stdout.
fn train(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> String {
    ok(&train_run(model, data, out, extra))
}

/// [`train_run`] on `data`, expected to fail before training: its stderr.
fn train_fails(model: &Path, data: &Path) -> String {
    fails(&train_run(model, data, &data.with_extension("out"), &[]))
}

/// `peft eval` of `model` with the adapter in `adapter` on `data` (`extra` flags appended).
fn run_eval(model: &Path, adapter: &Path, data: &Path, extra: &[&str]) -> std::process::Output {
    let args = [
        "eval",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ];
    peft(&[&args[..], extra].concat())
}

/// Runs `peft logits` on `inputs` (written to a file) and returns the logits; with
/// `PEFT_KEEP_TRAINED` set, keeps everything for the Python check.
fn logits_and_keep(
    case: &str,
    model: &Path,
    adapter: &Path,
    inputs: Vec<(&str, Tensor)>,
) -> Tensor {
    let dir = adapter.parent().unwrap();
    let input = dir.join("inputs.safetensors");
    let output = dir.join("logits.safetensors");
    let named: Vec<(String, Tensor)> = inputs
        .iter()
        .map(|(n, t)| (n.to_string(), t.clone()))
        .collect();
    peft::checkpoint::write_safetensors(&input, &named).unwrap();
    let args = [
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        output.to_str().unwrap(),
    ];
    ok(&peft(&args));
    let logits = candle_core::safetensors::load(&output, &Device::Cpu).unwrap()["logits"].clone();
    if let Ok(keep) = std::env::var("PEFT_KEEP_TRAINED") {
        let dest = Path::new(&keep).join(case);
        std::fs::create_dir_all(dest.join("adapter")).unwrap();
        std::fs::create_dir_all(dest.join("model")).unwrap();
        for (from, to) in [(adapter, dest.join("adapter")), (model, dest.join("model"))] {
            for f in std::fs::read_dir(from).unwrap() {
                let f = f.unwrap().path();
                if f.is_file() {
                    std::fs::copy(&f, to.join(f.file_name().unwrap())).unwrap();
                }
            }
        }
        let mut check = named.clone();
        check.push(("logits".into(), logits.clone()));
        peft::checkpoint::write_safetensors(&dest.join("adapter/check.safetensors"), &check)
            .unwrap();
    }
    logits
}

#[test]
fn train_seq2seq_on_t5_prompt_completion_jsonl() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out) = (tmp.path().join("t5"), tmp.path().join("out"));
    t5_folder(&model);
    let data = tmp.path().join("pairs.jsonl");
    let lines: String = (0..16)
        .map(|i| {
            format!(
                "{{\"prompt\": \"add {i} and 1\", \"completion\": \"{}\"}}\n",
                i + 1
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let text = train(&model, &data, &out, &["--target-modules", "q,v,wi"]);
    assert!(text.contains("trained steps 0..12"), "{text}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_2_SEQ_LM");
    let l = losses(&out);
    assert_eq!(l.len(), 12);
    assert!(l[11] < 0.9 * l[0], "loss did not fall: {l:?}");
    let eval = ok(&run_eval(&model, &out, &data, &["--json"]));
    let e: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert!(e["loss"].as_f64().unwrap() < l[0], "{eval}");

    // Records a seq2seq model cannot learn from are refused with the file and line.
    let bad = tmp.path().join("text.jsonl");
    std::fs::write(&bad, "{\"text\": \"just text\"}\n").unwrap();
    let err = train_fails(&model, &bad);
    assert!(
        err.contains("text.jsonl:1") && err.contains("prompt"),
        "{err}"
    );

    let ids = Tensor::new(
        &[[97i64, 100, 100, 32, 51], [50, 32, 49, 257, 257]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 1], [1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let dec = Tensor::new(&[[257i64, 52, 256], [257, 51, 256]], &Device::Cpu).unwrap();
    let logits = logits_and_keep(
        "t5",
        &model,
        &out,
        vec![
            ("input_ids", ids),
            ("attention_mask", mask),
            ("decoder_input_ids", dec),
        ],
    );
    assert_eq!(logits.dims(), &[2, 3, 260]);
}

/// `--dora`: DoRA adapters train (the loss falls), save `use_dora` and the magnitudes, and read
/// back through `peft logits`.
#[test]
fn train_dora_on_t5() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out) = (tmp.path().join("t5"), tmp.path().join("out"));
    t5_folder(&model);
    let data = tmp.path().join("pairs.jsonl");
    let lines: String = (0..16)
        .map(|i| format!("{{\"input\": \"twice {i}\", \"target\": \"{}\"}}\n", 2 * i))
        .collect();
    std::fs::write(&data, lines).unwrap();
    train(
        &model,
        &data,
        &out,
        &["--dora", "--target-modules", "q,v,o,wi"],
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["use_dora"], true);
    let saved = candle_core::safetensors::load(out.join("adapter_model.safetensors"), &Device::Cpu)
        .unwrap();
    let magnitudes = saved
        .keys()
        .filter(|k| k.ends_with(".lora_magnitude_vector"))
        .count();
    // Encoder layers: q, v, o, wi; decoder layers: self- and cross-attention q, v, o, and wi.
    assert_eq!(magnitudes, 2 * 4 + 2 * 7, "{:?}", saved.keys());
    let l = losses(&out);
    assert!(l[11] < 0.9 * l[0], "loss did not fall: {l:?}");
    let ids = Tensor::new(&[[116i64, 119, 105, 99, 101, 32, 51]], &Device::Cpu).unwrap();
    let dec = Tensor::new(&[[257i64, 54, 256]], &Device::Cpu).unwrap();
    let logits = logits_and_keep(
        "t5_dora",
        &model,
        &out,
        vec![("input_ids", ids), ("decoder_input_ids", dec)],
    );
    assert_eq!(logits.dims(), &[1, 3, 260]);
}

#[test]
fn train_seq_cls_on_bert_text_label_csv() {
    train_classifier("bert", "BertForSequenceClassification", &[]);
}

/// A bare encoder (transformers' `BertModel`, as sentence-embedding checkpoints ship) becomes a
/// classifier with `--num-labels`, as `AutoModelForSequenceClassification` with `num_labels`
/// makes it; `peft eval` rebuilds the head from the adapter's labels.json.
#[test]
fn train_seq_cls_over_a_bare_bert_encoder_with_num_labels() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("encoder");
    bert_folder(&model, "BertModel");
    let data = tmp.path().join("one.csv");
    std::fs::write(&data, "text,label\nok,pos\n").unwrap();
    let err = train_fails(&model, &data);
    assert!(err.contains("--num-labels"), "{err}");
    train_classifier("bert_encoder", "BertModel", &["--num-labels", "2"]);
}

fn train_classifier(case: &str, architecture: &str, extra: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let (model, out) = (tmp.path().join("bert"), tmp.path().join("out"));
    bert_folder(&model, architecture);
    let data = tmp.path().join("reviews.csv");
    let mut csv = String::from("text,label\n");
    for i in 0..16 {
        let (text, label) = if i % 2 == 0 {
            ("great fun, loved it", "pos")
        } else {
            ("dull and slow", "neg")
        };
        csv.push_str(&format!("\"{text} {i}\",{label}\n"));
    }
    std::fs::write(&data, csv).unwrap();
    let text = train(&model, &data, &out, extra);
    assert!(text.contains("trained steps 0..12"), "{text}");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["task_type"], "SEQ_CLS");
    let labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("labels.json")).unwrap()).unwrap();
    assert_eq!(
        labels["id2label"],
        serde_json::json!({"0": "neg", "1": "pos"})
    );
    assert_eq!(labels["label2id"], serde_json::json!({"neg": 0, "pos": 1}));
    let l = losses(&out);
    assert!(l[11] < 0.8 * l[0], "loss did not fall: {l:?}");
    let eval = ok(&run_eval(&model, &out, &data, &["--json"]));
    let e: serde_json::Value = serde_json::from_str(eval.trim()).unwrap();
    assert_eq!(e["accuracy"].as_f64(), Some(1.0), "{eval}");

    // A label the classes do not know is refused with the file and line.
    let bad = tmp.path().join("bad.csv");
    std::fs::write(&bad, "text,label\nfine,pos\nodd,meh\n").unwrap();
    let err = fails(&run_eval(&model, &out, &bad, &[]));
    assert!(err.contains("bad.csv:3") && err.contains("meh"), "{err}");

    let ids = Tensor::new(
        &[[103i64, 114, 101, 97, 116], [100, 117, 108, 108, 258]],
        &Device::Cpu,
    )
    .unwrap();
    let mask = Tensor::new(&[[1i64, 1, 1, 1, 1], [1, 1, 1, 1, 0]], &Device::Cpu).unwrap();
    let logits = logits_and_keep(
        case,
        &model,
        &out,
        vec![("input_ids", ids), ("attention_mask", mask)],
    );
    assert_eq!(logits.dims(), &[2, 2]);
}
