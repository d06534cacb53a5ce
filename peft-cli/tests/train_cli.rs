//! `peft train`, `peft eval` and `peft generate` end to end on a small random model folder with
//! a byte-level tokenizer: files written, resume from a checkpoint, perplexity printed, seeded
//! sampling reproducible, bad data reported with file and line.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::process::Command;

use common::{model_folder, ok, peft};

#[test]
fn train_resume_eval_generate() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    model_folder(&model, 32, 48);
    let data = tmp.path().join("data.jsonl");
    let lines: String = (0..24)
        .map(|i| {
            format!(
                "{{\"text\": \"fortune number {i}: you will write {} tests\"}}\n",
                i * 7
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = tmp.path().join("out");
    let (m, d, o) = (
        model.to_str().unwrap(),
        data.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let common = [
        "--model",
        m,
        "--data",
        d,
        "--out",
        o,
        "--max-steps",
        "6",
        "--batch-size",
        "4",
        "--eval-fraction",
        "0.25",
        "--save-every",
        "3",
        "--eval-every",
        "3",
        "--lr",
        "1e-2",
        "--seq-len",
        "64",
        "--no-progress",
    ];
    let text = ok(&peft(&[&["train"][..], &common[..]].concat()));
    assert!(
        text.contains("trained steps 0..6") && text.contains("perplexity"),
        "{text}"
    );
    for f in [
        "adapter_config.json",
        "adapter_model.safetensors",
        "metrics.jsonl",
        "loss.png",
        "checkpoint-3/trainer_state.json",
        "checkpoint-6/adapter_model.safetensors",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let first = std::fs::read(out.join("adapter_model.safetensors")).unwrap();
    // Interrupt after step 3 (drop the later checkpoint and the final adapter) and resume.
    std::fs::remove_dir_all(out.join("checkpoint-6")).unwrap();
    std::fs::remove_file(out.join("adapter_model.safetensors")).unwrap();
    let text = ok(&peft(
        &[&["train"][..], &common[..], &["--resume"][..]].concat(),
    ));
    assert!(text.contains("trained steps 3..6"), "{text}");
    assert_eq!(
        std::fs::read(out.join("adapter_model.safetensors")).unwrap(),
        first,
        "resumed run ended elsewhere"
    );

    let base = ok(&peft(&["eval", "--model", m, "--data", d, "--json"]));
    let tuned = ok(&peft(&[
        "eval",
        "--model",
        m,
        "--adapter",
        o,
        "--data",
        d,
        "--json",
    ]));
    let ppl = |s: &str| {
        serde_json::from_str::<serde_json::Value>(s.trim()).unwrap()["perplexity"]
            .as_f64()
            .unwrap()
    };
    assert!(
        ppl(&tuned) < ppl(&base),
        "perplexity {} -> {}",
        ppl(&base),
        ppl(&tuned)
    );

    let gen = |seed: &str| {
        ok(&peft(&[
            "generate",
            "--model",
            m,
            "--adapter",
            o,
            "--prompt",
            "fortune",
            "--max-new-tokens",
            "12",
            "--temperature",
            "0.9",
            "--top-k",
            "20",
            "--top-p",
            "0.95",
            "--seed",
            seed,
            "--ignore-eos",
        ]))
    };
    assert_eq!(gen("1"), gen("1"));
    let greedy = ok(&peft(&[
        "generate",
        "--model",
        m,
        "--adapter",
        o,
        "--prompt",
        "fortune",
        "--max-new-tokens",
        "12",
        "--ignore-eos",
    ]));
    assert!(!greedy.trim().is_empty());

    // Bad data: one line on stderr naming the file and line; non-zero exit.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"fine\"}\n{\"txt\": \"typo\"}\n").unwrap();
    let o2 = peft(&[
        "train",
        "--model",
        m,
        "--data",
        bad.to_str().unwrap(),
        "--out",
        o,
        "--max-steps",
        "1",
        "--no-progress",
    ]);
    assert!(!o2.status.success());
    let err = String::from_utf8_lossy(&o2.stderr);
    assert!(
        err.contains(&format!("{}:2:", bad.display())) && err.contains("`text`"),
        "{err}"
    );
    // A hub id offline fails at once and suggests a local path.
    let o4 = Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(["eval", "--model", "no-such-org/no-such-model", "--data", d])
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(!o4.status.success());
    assert!(
        String::from_utf8_lossy(&o4.stderr).contains("local model folder"),
        "{}",
        String::from_utf8_lossy(&o4.stderr)
    );
    // An unknown method is refused, naming the available ones.
    let o3 = peft(&[&["train"][..], &common[..], &["--method", "nope"][..]].concat());
    assert!(!o3.status.success() && String::from_utf8_lossy(&o3.stderr).contains("LORA"));
}

#[test]
fn pissa_training_converts_to_a_plain_lora() {
    use candle_core::{DType, Device, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    model_folder(&model, 32, 48);
    let data = tmp.path().join("data.jsonl");
    let lines: String = (0..8)
        .map(|i| {
            format!(
                "{{\"text\": \"pissa line {i} keeps {} singular values\"}}\n",
                i * 3
            )
        })
        .collect();
    std::fs::write(&data, lines).unwrap();
    let out = tmp.path().join("out");
    let text = ok(&peft(&[
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--seq-len",
        "64",
        "--set",
        "init_lora_weights=pissa",
        "--target-modules",
        "q_proj,v_proj,down_proj",
        "--convert-to-lora",
        "--no-progress",
    ]));
    assert!(text.contains("converted to a plain LoRA"), "{text}");
    let config = |dir: &std::path::Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap())
            .unwrap()
    };
    assert_eq!(config(&out)["init_lora_weights"], "pissa");
    assert_eq!(
        config(&out.join("initial_adapter"))["init_lora_weights"],
        true
    );
    let converted = config(&out.join("converted"));
    assert_eq!(converted["init_lora_weights"], true);
    assert_eq!(converted["r"], 16);
    // The PiSSA adapter (over the residual it recomputes) and the converted one (over the
    // original base) compute the same function.
    let ids = Tensor::new(&[[1u32, 40, 41, 42, 99, 7, 12, 3]], &Device::Cpu).unwrap();
    let inputs = peft::ModelInputs::from_ids(ids);
    let logits = |adapter: &std::path::Path| {
        let base = peft::models::load_model(&model, DType::F32, &Device::Cpu).unwrap();
        peft::PeftModel::from_pretrained(base, adapter, false)
            .unwrap()
            .forward(&inputs)
            .unwrap()
    };
    let (a, b) = (logits(&out), logits(&out.join("converted")));
    let diff = common::max_diff(&a, &b);
    assert!(diff < 1e-4, "converted adapter differs by {diff}");
    let plain = peft::models::load_model(&model, DType::F32, &Device::Cpu)
        .unwrap()
        .forward(&inputs, None)
        .unwrap();
    // Training moved the model.
    assert!(common::max_diff(&logits(&out), &plain) > 1e-4);
}
