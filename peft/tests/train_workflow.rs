//! The fine-tuning workflow behind `peft train`: data parsing (formats, learned-token masks,
//! errors naming file and line, counted skips), batching, and exact resume (N steps == k steps +
//! resume + N-k steps, with dropout on and gradient accumulation).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use peft::data::{self, DataOptions, Overflow};
use peft::models::tokenizer::byte_tokenizer;
use peft::models::{LlamaConfig, LlamaModel, TextTokenizer};
use peft::optim::Schedule;
use peft::trainer::{TrainConfig, Trainer};
use peft::{get_peft_model, AdapterConfig, PeftError, PeftModel};

const CHAT_TEMPLATE: &str = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// A byte-level tokenizer (one token per byte, ids 0..256, specials 256..259) in a folder with
/// a tokenizer_config.json carrying the special tokens and a chat template.
fn tokenizer_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let tok = byte_tokenizer(&["<|endoftext|>", "<|im_start|>", "<|im_end|>"]).unwrap();
    tok.save(dir.path().join("tokenizer.json"), false).unwrap();
    let cfg = serde_json::json!({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE});
    std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    dir
}

fn tokenizer() -> (tempfile::TempDir, TextTokenizer) {
    let dir = tokenizer_dir();
    let tok = TextTokenizer::from_folder(dir.path()).unwrap();
    (dir, tok)
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn opts(max_len: usize) -> DataOptions {
    DataOptions {
        max_len,
        ..Default::default()
    }
}

#[track_caller]
fn data_error(e: PeftError, file: &Path, line: usize, needle: &str) {
    let s = e.to_string();
    match &e {
        PeftError::Data { path, line: l, .. } => {
            assert_eq!(path, file, "{s}");
            assert_eq!(*l, line, "{s}");
        }
        other => panic!("expected a data error, got {other:?}"),
    }
    assert!(
        s.contains(&file.display().to_string()) && s.contains(needle),
        "{s}"
    );
}

#[test]
fn formats_and_learned_token_masks() {
    let (dir, tok) = tokenizer();
    assert_eq!(tok.eos_token_ids, vec![256]);
    let p = write(
        dir.path(),
        "mixed.jsonl",
        concat!(
            "{\"text\": \"abc\"}\n",
            "\n",
            "{\"prompt\": \"Q:\", \"completion\": \" yes\"}\n",
            "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"yo\"}]}\n"
        ),
    );
    let ds = data::load_dataset(&p, &tok, &opts(64)).unwrap();
    assert_eq!(ds.examples.len(), 3);
    // text: every byte plus EOS learned.
    let text = &ds.examples[0];
    assert_eq!(text.ids, vec![b'a' as u32, b'b' as u32, b'c' as u32, 256]);
    assert!(text.learn.iter().all(|&l| l));
    assert_eq!(text.line, 1);
    // prompt/completion: only " yes" + EOS learned.
    let pc = &ds.examples[1];
    assert_eq!(pc.line, 3);
    assert_eq!(pc.ids.len(), 2 + 4 + 1);
    assert_eq!(pc.learn, vec![false, false, true, true, true, true, true]);
    // chat: only the assistant's turn ("yo<|im_end|>\n") is learned.
    let chat = &ds.examples[2];
    let learned: Vec<u32> = chat
        .ids
        .iter()
        .zip(&chat.learn)
        .filter(|(_, &l)| l)
        .map(|(&i, _)| i)
        .collect();
    assert_eq!(tok.decode(&learned, false).unwrap(), "yo<|im_end|>\n");
    let rendered = tok.decode(&chat.ids, false).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    );

    // CSV with prompt/completion columns, quoted fields with commas and newlines.
    let csv = write(
        dir.path(),
        "pc.csv",
        "prompt,completion\n\"a, b\",\"c\nd\"\nx,y\n",
    );
    let ds = data::load_dataset(&csv, &tok, &opts(64)).unwrap();
    assert_eq!(ds.examples.len(), 2);
    assert_eq!(
        tok.decode(&ds.examples[0].ids, false).unwrap(),
        "a, bc\nd<|endoftext|>"
    );
    let csv = write(dir.path(), "t.csv", "id,text\n1,hello\n2,world\n");
    assert_eq!(
        data::load_dataset(&csv, &tok, &opts(64))
            .unwrap()
            .examples
            .len(),
        2
    );
}

#[test]
fn bad_records_name_file_and_line() {
    let (dir, tok) = tokenizer();
    let d = dir.path();
    let p = write(
        d,
        "bad_json.jsonl",
        "{\"text\": \"ok\"}\n{\"text\": \"ok\"}\n{\"text\": oops}\n",
    );
    data_error(
        data::load_dataset(&p, &tok, &opts(64)).unwrap_err(),
        &p,
        3,
        "invalid JSON",
    );
    let p = write(
        d,
        "missing.jsonl",
        "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n",
    );
    data_error(
        data::load_dataset(&p, &tok, &opts(64)).unwrap_err(),
        &p,
        2,
        "`text`, `prompt`/`completion` or `messages`",
    );
    let p = write(d, "empty.jsonl", "{\"text\": \"   \"}\n");
    data_error(
        data::load_dataset(&p, &tok, &opts(64)).unwrap_err(),
        &p,
        1,
        "`text` is empty",
    );
    let p = write(d, "no_completion.jsonl", "{\"prompt\": \"q\"}\n");
    data_error(
        data::load_dataset(&p, &tok, &opts(64)).unwrap_err(),
        &p,
        1,
        "missing field `completion`",
    );
    let p = write(d, "wrong_type.jsonl", "{\"text\": 5}\n");
    data_error(
        data::load_dataset(&p, &tok, &opts(64)).unwrap_err(),
        &p,
        1,
        "expected a string",
    );
    let p = write(
        d,
        "no_assistant.jsonl",
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
    );
    data_error(
        data::load_dataset(&p, &tok, &opts(64)).unwrap_err(),
        &p,
        1,
        "no `assistant` turn",
    );
    let p = write(
        d,
        "long.jsonl",
        "{\"text\": \"short\"}\n{\"text\": \"this one is far too long\"}\n",
    );
    data_error(
        data::load_dataset(&p, &tok, &opts(10)).unwrap_err(),
        &p,
        2,
        "longer than the limit of 10",
    );
    let p = write(d, "bad.csv", "name,value\n1,2\n");
    data_error(
        data::load_dataset(&p, &tok, &opts(10)).unwrap_err(),
        &p,
        1,
        "`text` column",
    );
    let p = write(d, "ragged.csv", "text\nok\n\"a\",\"b\"\n");
    data_error(
        data::load_dataset(&p, &tok, &opts(10)).unwrap_err(),
        &p,
        3,
        "bad CSV record",
    );
    let p = write(d, "blank.jsonl", "\n\n");
    data_error(
        data::load_dataset(&p, &tok, &opts(10)).unwrap_err(),
        &p,
        1,
        "no usable records",
    );
    let missing = d.join("nope.jsonl");
    assert!(matches!(
        data::load_dataset(&missing, &tok, &opts(10)),
        Err(PeftError::Io { .. })
    ));
}

#[test]
fn skips_and_truncation_are_counted() {
    let (dir, tok) = tokenizer();
    let p = write(
        dir.path(),
        "mixed.jsonl",
        "{\"text\": \"ok\"}\nnot json\n{\"text\": \"\"}\n{\"text\": \"much too long for it\"}\n{\"text\": \"fine\"}\n",
    );
    let skip = DataOptions {
        max_len: 8,
        skip_bad: true,
        overflow: Overflow::Skip,
        ..Default::default()
    };
    let ds = data::load_dataset(&p, &tok, &skip).unwrap();
    assert_eq!(
        (
            ds.examples.len(),
            ds.skipped_bad,
            ds.skipped_long,
            ds.truncated
        ),
        (2, 2, 1, 0)
    );
    let cut = DataOptions {
        max_len: 8,
        skip_bad: true,
        overflow: Overflow::Truncate,
        ..Default::default()
    };
    let ds = data::load_dataset(&p, &tok, &cut).unwrap();
    assert_eq!(
        (
            ds.examples.len(),
            ds.skipped_bad,
            ds.skipped_long,
            ds.truncated
        ),
        (3, 2, 0, 1)
    );
    assert!(ds.examples.iter().all(|e| e.ids.len() <= 8));
    // Packing accepts long texts and cuts the stream into blocks.
    let pack = DataOptions {
        max_len: 8,
        skip_bad: true,
        packing: true,
        ..Default::default()
    };
    let ds = data::load_dataset(&p, &tok, &pack).unwrap();
    let blocks = data::sequences(&ds, true, 8);
    let total: usize = ds.examples.iter().map(|e| e.ids.len()).sum();
    assert_eq!(blocks.iter().map(|b| b.ids.len()).sum::<usize>(), total);
    assert!(blocks.iter().all(|b| b.ids.len() <= 8));
    // A seeded split is reproducible and disjoint.
    let ds = data::load_dataset(&p, &tok, &skip).unwrap();
    let (a, b) = ds.clone().split(0.5, 3).unwrap();
    let (a2, b2) = ds.split(0.5, 3).unwrap();
    assert_eq!((a.examples.len(), b.examples.len()), (1, 1));
    assert_eq!(a.examples, a2.examples);
    assert_eq!(b.examples, b2.examples);
}

#[test]
fn collate_pads_and_masks_labels() {
    let ex = [
        data::Example::tokens(vec![5, 6, 7], vec![false, true, true], 1),
        data::Example::tokens(vec![8], vec![true], 2),
    ];
    let refs: Vec<&data::Example> = ex.iter().collect();
    let peft::training::Batch::CausalLm(b) = data::collate(&refs, 0, &Device::Cpu).unwrap() else {
        panic!("causal-LM examples make a causal-LM batch")
    };
    assert_eq!(
        b.input_ids.to_vec2::<u32>().unwrap(),
        vec![vec![5, 6, 7], vec![8, 0, 0]]
    );
    assert_eq!(
        b.attention_mask.unwrap().to_vec2::<u32>().unwrap(),
        vec![vec![1, 1, 1], vec![1, 0, 0]]
    );
    assert_eq!(
        b.labels.to_vec2::<i64>().unwrap(),
        vec![vec![-100, 6, 7], vec![8, -100, -100]]
    );
}

fn tiny_model() -> PeftModel {
    let mut cfg = LlamaConfig::tiny(260, 32, 2, 4, 2, 48);
    cfg.initializer_range = 0.2;
    let base = LlamaModel::random(cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 12, "lora_dropout": 0.2, "target_modules": ["q_proj", "v_proj", "down_proj"]}"#,
        "test",
    )
    .unwrap();
    get_peft_model(Box::new(base), config, 11).unwrap()
}

fn train_cfg() -> TrainConfig {
    TrainConfig {
        lr: 5e-3,
        warmup_steps: 2,
        schedule: Schedule::Cosine,
        max_steps: Some(7),
        batch_size: 3,
        grad_accum: 2,
        max_grad_norm: Some(0.5),
        seed: 9,
        save_every: Some(3),
        eval_every: Some(2),
        pad_id: 256,
        adamw: peft::optim::AdamWConfig {
            weight_decay: 0.01,
            ..Default::default()
        },
        ..Default::default()
    }
}

fn corpus() -> (tempfile::TempDir, Vec<data::Example>, Vec<data::Example>) {
    let (dir, tok) = tokenizer();
    let lines: String = (0..17)
        .map(|i| {
            format!(
                "{{\"text\": \"{}\"}}\n",
                "the quick brown fox jumps over the lazy dog "
                    .repeat(1 + i % 3)
                    .chars()
                    .skip(i)
                    .collect::<String>()
            )
        })
        .collect();
    let p = write(dir.path(), "train.jsonl", &lines);
    let ds = data::load_dataset(&p, &tok, &opts(200)).unwrap();
    let (train, eval) = ds.split(0.2, 1).unwrap();
    (dir, train.examples, eval.examples)
}

fn vars(model: &PeftModel) -> Vec<(String, Vec<f32>)> {
    model
        .trainable_named_vars()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                v.as_tensor()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
            )
        })
        .collect()
}

#[test]
fn resume_continues_exactly() {
    let (_d, train, eval) = corpus();
    let out_a = tempfile::tempdir().unwrap();
    let model_a = tiny_model();
    let before = vars(&model_a);
    let report = Trainer::new(
        &model_a,
        train_cfg(),
        train.clone(),
        Some(eval.clone()),
        out_a.path(),
    )
    .unwrap()
    .run(false)
    .unwrap();
    assert_eq!((report.steps_run, report.final_step), (7, 7));
    let after_a = vars(&model_a);
    assert_ne!(before, after_a, "training changed nothing");
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "checkpoint-3/trainer_state.json",
        "checkpoint-6/optimizer.safetensors",
    ] {
        assert!(out_a.path().join(f).is_file(), "{f} missing");
    }
    let png = std::fs::read(out_a.path().join("loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    let metrics = std::fs::read_to_string(out_a.path().join("metrics.jsonl")).unwrap();
    assert_eq!(
        metrics.lines().filter(|l| l.contains("\"loss\"")).count(),
        7
    );
    assert_eq!(
        metrics
            .lines()
            .filter(|l| l.contains("\"eval_loss\""))
            .count(),
        4
    ); // steps 2, 4, 6 and the end

    // Interrupted after step 3: only checkpoint-3 survives; a fresh process resumes from it.
    let out_b = tempfile::tempdir().unwrap();
    let src = out_a.path().join("checkpoint-3");
    let dst = out_b.path().join("checkpoint-3");
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    let model_b = tiny_model();
    let report = Trainer::new(
        &model_b,
        train_cfg(),
        train.clone(),
        Some(eval.clone()),
        out_b.path(),
    )
    .unwrap()
    .run(true)
    .unwrap();
    assert_eq!(
        (report.resumed_from, report.steps_run, report.final_step),
        (3, 4, 7)
    );
    let after_b = vars(&model_b);
    for ((na, a), (nb, b)) in after_a.iter().zip(&after_b) {
        assert_eq!(na, nb);
        let d = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(d <= 1e-6, "{na}: resumed weights differ by {d}");
    }
    // The saved adapters agree too.
    let a = std::fs::read(out_a.path().join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(out_b.path().join("adapter_model.safetensors")).unwrap();
    assert_eq!(a, b);

    // Resuming with a different batch size is refused, naming the state file.
    let model_c = tiny_model();
    let mut cfg = train_cfg();
    cfg.batch_size = 2;
    let e = Trainer::new(&model_c, cfg, train.clone(), None, out_b.path())
        .unwrap()
        .run(true)
        .unwrap_err();
    assert!(e.to_string().contains("trainer_state.json"), "{e}");
    // Resuming where there is no checkpoint is an error.
    let empty = tempfile::tempdir().unwrap();
    assert!(
        Trainer::new(&model_c, train_cfg(), train, None, empty.path())
            .unwrap()
            .run(true)
            .is_err()
    );
}

#[test]
fn training_lowers_held_out_loss() {
    let (_d, train, eval) = corpus();
    let model = tiny_model();
    let (before, _) = peft::trainer::evaluate(&model, &eval, 4, 256).unwrap();
    let out = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        lr: 2e-2,
        max_steps: Some(30),
        batch_size: 4,
        warmup_steps: 3,
        pad_id: 256,
        ..Default::default()
    };
    let report = Trainer::new(&model, cfg, train, Some(eval.clone()), out.path())
        .unwrap()
        .run(false)
        .unwrap();
    let (after, _) = peft::trainer::evaluate(&model, &eval, 4, 256).unwrap();
    assert!(after < before * 0.8, "held-out loss {before} -> {after}");
    assert!((report.eval_loss.unwrap() - after).abs() < 1e-5);
    // The saved adapter reloads onto a fresh base with the trained held-out loss.
    let mut cfg = LlamaConfig::tiny(260, 32, 2, 4, 2, 48);
    cfg.initializer_range = 0.2;
    let base = LlamaModel::random(cfg, 5, DType::F32, &Device::Cpu).unwrap();
    let reloaded = PeftModel::from_pretrained(Box::new(base), out.path(), false).unwrap();
    let (again, _) = peft::trainer::evaluate(&reloaded, &eval, 4, 256).unwrap();
    assert!((again - after).abs() < 1e-5, "{again} vs {after}");
}

/// f16 compute trains with dynamic loss scaling (torch's GradScaler): the adapter stays f32,
/// the loss falls as it does in f32, and the scale is saved with the checkpoint.
#[test]
fn f16_training_scales_the_loss_and_keeps_f32_adapters() {
    let (_d, train, _eval) = corpus();
    let mut cfg = LlamaConfig::tiny(260, 32, 2, 4, 2, 48);
    cfg.initializer_range = 0.2;
    let run = |dtype: DType| {
        let base = LlamaModel::random(cfg.clone(), 5, dtype, &Device::Cpu).unwrap();
        let config = AdapterConfig::from_json_str(
            r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 12, "target_modules": ["q_proj", "v_proj"], "init_lora_weights": false}"#,
            "test",
        )
        .unwrap();
        let model = get_peft_model(Box::new(base), config, 11).unwrap();
        let out = tempfile::tempdir().unwrap();
        let tc = TrainConfig {
            save_every: Some(4),
            eval_every: None,
            max_steps: Some(4),
            ..train_cfg()
        };
        let report = Trainer::new(&model, tc, train.clone(), None, out.path())
            .unwrap()
            .run(false)
            .unwrap();
        for (_, v) in model.trainable_named_vars() {
            assert_eq!(v.dtype(), DType::F32);
        }
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.path().join("checkpoint-4/trainer_state.json")).unwrap(),
        )
        .unwrap();
        (report, state["loss_scale"].clone(), vars(&model))
    };
    let (r32, scale32, v32) = run(DType::F32);
    let (r16, scale16, v16) = run(DType::F16);
    assert!(scale32.is_null(), "{scale32}");
    assert_eq!(scale16["scale"].as_f64(), Some(65536.0), "{scale16}");
    assert_eq!(scale16["good_steps"].as_u64(), Some(4), "{scale16}");
    assert!(r16.last_loss.is_finite());
    assert!(
        (r16.last_loss - r32.last_loss).abs() < 0.05 * r32.last_loss.abs().max(1.0),
        "f16 loss {} vs f32 {}",
        r16.last_loss,
        r32.last_loss
    );
    // The same updates up to f16 rounding.
    let diff = v16
        .iter()
        .zip(&v32)
        .flat_map(|((_, a), (_, b))| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(diff < 5e-2, "f16 and f32 adapters differ by {diff}");
}
