//! `peft quantize` and `--quant` end to end on a small random model folder: QLoRA training on a
//! quantized checkpoint and on the fly agree, generation and merging work on it, and shapes
//! the blocks cannot hold are refused with the module named.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::Path;

use common::{fails, model_folder, ok, peft};

fn data(dir: &Path) -> std::path::PathBuf {
    let path = dir.join("data.jsonl");
    let lines: String = (0..16)
        .map(|i| {
            format!(
                "{{\"text\": \"fortune {i}: you will quantize {} layers\"}}\n",
                i * 3
            )
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    path
}

fn loss(json: &str) -> f64 {
    serde_json::from_str::<serde_json::Value>(json.trim()).unwrap()["loss"]
        .as_f64()
        .unwrap()
}

#[test]
fn quantize_then_qlora_train_eval_generate_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    model_folder(&model, 64, 128);
    let d = data(tmp.path());
    let q = tmp.path().join("nf4");
    let (m, d, qs) = (
        model.to_str().unwrap(),
        d.to_str().unwrap(),
        q.to_str().unwrap(),
    );
    let text = ok(&peft(&[
        "quantize", "--model", m, "--to", "nf4", "--out", qs,
    ]));
    assert!(text.contains("wrote"), "{text}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    assert!(q.join("tokenizer.json").is_file());

    let adapter = tmp.path().join("qlora");
    let a = adapter.to_str().unwrap();
    let train = peft(&[
        "train",
        "--model",
        qs,
        "--data",
        d,
        "--out",
        a,
        "--max-steps",
        "4",
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--seq-len",
        "48",
        "--no-progress",
    ]);
    ok(&train);
    assert!(
        String::from_utf8_lossy(&train.stderr).contains("loaded quantized 14 linear layers"),
        "{}",
        String::from_utf8_lossy(&train.stderr)
    );
    // The quantized folder and on-the-fly quantization are the same model.
    let from_folder = ok(&peft(&[
        "eval",
        "--model",
        qs,
        "--adapter",
        a,
        "--data",
        d,
        "--json",
    ]));
    let on_the_fly = ok(&peft(&[
        "eval",
        "--model",
        m,
        "--quant",
        "nf4",
        "--adapter",
        a,
        "--data",
        d,
        "--json",
    ]));
    assert_eq!(loss(&from_folder), loss(&on_the_fly));
    let dense = ok(&peft(&[
        "eval",
        "--model",
        m,
        "--adapter",
        a,
        "--data",
        d,
        "--json",
    ]));
    assert_ne!(
        loss(&dense),
        loss(&from_folder),
        "quantization changed nothing?"
    );

    let text = ok(&peft(&[
        "generate",
        "--model",
        qs,
        "--adapter",
        a,
        "--prompt",
        "fortune",
        "--max-new-tokens",
        "5",
    ]));
    assert!(!text.is_empty());

    let merged = tmp.path().join("merged");
    let out = peft(&[
        "merge",
        "--model",
        qs,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
    ]);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("quantized again") && err.contains("moved by up to"),
        "{err}"
    );
    ok(&peft(&[
        "eval",
        "--model",
        merged.to_str().unwrap(),
        "--data",
        d,
        "--json",
    ]));
}

#[test]
fn unsupported_shapes_and_schemes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    model_folder(&model, 32, 64);
    let d = data(tmp.path());
    let (m, d) = (model.to_str().unwrap(), d.to_str().unwrap());
    let err = fails(&peft(&[
        "eval", "--model", m, "--quant", "nf4", "--data", d,
    ]));
    assert!(
        err.contains("model.layers.0.self_attn.q_proj")
            && err.contains("multiple of the block size 64"),
        "{err}"
    );
    // int8 has no block constraint.
    ok(&peft(&[
        "eval", "--model", m, "--quant", "int8", "--data", d, "--json",
    ]));
    let err = fails(&peft(&[
        "eval", "--model", m, "--quant", "nf3", "--data", d,
    ]));
    assert!(err.contains("nf4") && err.contains("nf3"), "{err}");
    let err = fails(&peft(&[
        "eval", "--model", m, "--quant", "gguf", "--data", d,
    ]));
    assert!(err.contains("not a .gguf file"), "{err}");
}
