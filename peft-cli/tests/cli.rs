//! The `peft` command's contract: results on stdout, one error line on stderr and a non-zero
//! exit on failure, and `peft logits` matching the Python reference (tools/reference).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};

mod common;
use common::max_diff;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../peft/tests/fixtures")
}

fn peft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft"))
        .args(args)
        .output()
        .expect("run peft")
}

/// Writes the `input_ids` and `attention_mask` of a fixture into `dir/in.safetensors` (what
/// `peft logits --input` reads).
fn write_inputs(
    data: &std::collections::HashMap<String, Tensor>,
    dir: &std::path::Path,
) -> PathBuf {
    let input = dir.join("in.safetensors");
    let picked: std::collections::HashMap<String, Tensor> = ["input_ids", "attention_mask"]
        .iter()
        .map(|k| (k.to_string(), data[*k].clone()))
        .collect();
    candle_core::safetensors::save(&picked, &input).unwrap();
    input
}

/// `peft logits --model MODEL --adapter ADAPTER --input INPUT --out OUT`, which must succeed;
/// returns the `logits` it wrote.
fn logits_of(model: &Path, adapter: &Path, input: &Path, out: &Path) -> Tensor {
    let o = peft(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    candle_core::safetensors::load(out, &Device::Cpu).unwrap()["logits"].clone()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn methods_lists_lora() {
    let o = peft(&["methods"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("LORA"), "{}", stdout(&o));
}

#[test]
fn logits_match_the_reference_unmerged_and_merged() {
    let case = fixtures().join("cases/llama_tiny__lora_patterns.safetensors");
    let data = candle_core::safetensors::load(&case, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(&data, dir.path());
    let model = fixtures().join("models/llama_tiny");
    let adapter = fixtures().join("adapters/llama_tiny__lora_patterns");
    for (merge, expected) in [(false, "logits_adapted"), (true, "logits_merged")] {
        let out = dir.path().join(format!("out_{merge}.safetensors"));
        let mut args = vec![
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ];
        args.extend([
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        if merge {
            args.push("--merge");
        }
        let o = peft(&args);
        assert!(o.status.success(), "{}", stderr(&o));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert_eq!(got["logits"].dtype(), DType::F32);
        assert!(
            max_diff(&got["logits"], &data[expected]) <= 1e-4,
            "{expected}"
        );
    }
}

/// `--dtype bf16-weights`: f32 logits within bf16 rounding of the reference; `merge` refuses
/// it (a merged folder has one dtype) and an unknown `--dtype` names the accepted values.
#[test]
fn bf16_weights_dtype_runs_and_bad_dtypes_are_refused() {
    let case = fixtures().join("cases/llama_tiny__lora_patterns.safetensors");
    let data = candle_core::safetensors::load(&case, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(&data, dir.path());
    let model = fixtures().join("models/llama_tiny");
    let adapter = fixtures().join("adapters/llama_tiny__lora_patterns");
    let out = dir.path().join("out.safetensors");
    let (m, a, i, o) = (
        model.to_str().unwrap(),
        adapter.to_str().unwrap(),
        input.to_str().unwrap(),
        out.to_str().unwrap(),
    );
    let run = peft(&[
        "logits",
        "--model",
        m,
        "--adapter",
        a,
        "--input",
        i,
        "--out",
        o,
        "--dtype",
        "bf16-weights",
    ]);
    assert!(run.status.success(), "{}", stderr(&run));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    let want = &data["logits_adapted"];
    let scale = want
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let d = max_diff(&got["logits"], want);
    assert_eq!(got["logits"].dtype(), DType::F32);
    assert!(
        d > 0.0 && d < 0.02 * scale,
        "bf16-weights logits differ by {d} (scale {scale})"
    );

    let merged = dir.path().join("merged");
    let o = peft(&[
        "merge",
        "--model",
        m,
        "--adapter",
        a,
        "--out",
        merged.to_str().unwrap(),
        "--dtype",
        "bf16-weights",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("one dtype"), "{}", stderr(&o));
    assert!(!merged.exists(), "nothing is written on a refused merge");
    let never = dir.path().join("never.safetensors");
    let o = peft(&[
        "logits",
        "--model",
        m,
        "--input",
        i,
        "--out",
        never.to_str().unwrap(),
        "--dtype",
        "f8",
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("bf16-weights") && stderr(&o).contains("f8"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn merge_writes_a_loadable_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let model = fixtures().join("models/llama_tiny");
    let adapter = fixtures().join("adapters/llama_tiny__lora_embed");
    let o = peft(&[
        "merge",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        adapter.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let data = candle_core::safetensors::load(
        fixtures().join("cases/llama_tiny__lora_embed.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let merged = peft::models::load_model(&out, DType::F32, &Device::Cpu).unwrap();
    let inputs = peft::ModelInputs::from_ids(data["input_ids"].clone())
        .with_mask(Some(data["attention_mask"].clone()));
    let logits = merged.forward(&inputs, None).unwrap();
    assert!(max_diff(&logits, &data["logits_merged"]) <= 1e-4);
}

#[test]
fn inspect_prints_config_tensors_and_parameter_line() {
    let model = fixtures().join("models/llama_tiny");
    let adapter = fixtures().join("adapters/llama_tiny__lora_qv");
    let o = peft(&[
        "inspect",
        adapter.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(text.contains("\"peft_type\": \"LORA\""), "{text}");
    assert!(
        text.contains("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{text}"
    );
    assert!(
        text.contains("trainable params: 1,792 || all params: 79,936 || trainable%: 2.2418"),
        "{text}"
    );
    // peft's get_layer_status / get_model_status.
    assert!(
        text.contains("  model.model.layers.0.self_attn.q_proj  lora.Linear  adapters [default]  active [default]  merged []  requires_grad {default=true}"),
        "{text}"
    );
    let json_start = text.find("model status:\n").unwrap() + "model status:\n".len();
    let status: serde_json::Value = serde_json::from_str(&text[json_start..]).unwrap();
    assert_eq!(status["adapter_model_type"], "LoraModel");
    assert_eq!(status["num_adapter_layers"], 4);
    assert_eq!(status["trainable_params"], 1792);
}

#[test]
fn errors_exit_non_zero_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    candle_core::safetensors::save(
        &[(
            "tokens".to_string(),
            Tensor::new(&[[1i64, 2]], &Device::Cpu).unwrap(),
        )]
        .into_iter()
        .collect(),
        &input,
    )
    .unwrap();
    let model = fixtures().join("models/llama_tiny");
    let out = dir.path().join("out.safetensors");
    let o = peft(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    let err = stderr(&o);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(
        err.contains("input_ids") && err.contains("in.safetensors"),
        "{err}"
    );
    assert!(!out.exists());

    let o = peft(&["inspect", dir.path().join("missing").to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("adapter_config.json"), "{}", stderr(&o));
}

/// `peft generate` continues a text prompt like the reference, with every method and with no
/// adapter (make_method_fixtures.py: greedy continuation of "the model learns").
#[test]
fn generate_matches_the_reference_text_for_every_method() {
    let text = std::fs::read_to_string(fixtures().join("method_cases.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let model = fixtures().join("models/llama_tiny");
    let mut checked = 0;
    for case in cases.iter().filter(|c| c["model"] == "llama_tiny") {
        let adapter = fixtures()
            .join("adapters")
            .join(format!("llama_tiny__{}", case["method"].as_str().unwrap()));
        let o = peft(&[
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--prompt",
            case["prompt_text"].as_str().unwrap(),
            "--max-new-tokens",
            "10",
            "--ignore-eos",
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(
            stdout(&o).trim_end_matches('\n'),
            case["generated_text"].as_str().unwrap(),
            "{}",
            case["method"]
        );
        checked += 1;
    }
    assert!(checked >= 5);
    let o = peft(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "the model learns",
        "--max-new-tokens",
        "5",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = peft(&[
        "generate",
        "--model",
        fixtures().join("models/qwen2_tiny").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("tokenizer.json"),
        "{}",
        stderr(&o)
    );
}

/// `peft logits` with a prompt-tuning adapter includes the virtual positions, as peft returns.
#[test]
fn logits_with_prompt_learning_adapters() {
    for method in ["prompt_text", "ptuning_lstm", "prefix_plain"] {
        let case = fixtures().join(format!("cases/llama_tiny__{method}.safetensors"));
        let data = candle_core::safetensors::load(&case, &Device::Cpu).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = write_inputs(&data, dir.path());
        let out = dir.path().join("out.safetensors");
        let model = fixtures().join("models/llama_tiny");
        let adapter = fixtures().join(format!("adapters/llama_tiny__{method}"));
        let got = logits_of(&model, &adapter, &input, &out);
        assert!(max_diff(&got, &data["logits_adapted"]) <= 1e-4, "{method}");
        let o = peft(&[
            "logits",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
            "--merge",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(
            !o.status.success() && stderr(&o).contains("merge"),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn demo_runs_every_method() {
    for method in [
        "lora", "ia3", "loha", "lokr", "prompt", "p_tuning", "prefix",
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = peft(&[
            "demo",
            "--method",
            method,
            "--steps",
            "60",
            "--out",
            dir.path().to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{method}: {}", stderr(&o));
        let text = stdout(&o);
        assert!(
            text.contains("trainable params:") && text.contains("demo passed"),
            "{method}: {text}"
        );
        assert!(dir
            .path()
            .join("adapter/adapter_model.safetensors")
            .is_file());
    }
    let o = peft(&["demo", "--method", "dora"]);
    assert!(
        !o.status.success() && stderr(&o).contains("lora, ia3"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn demo_runs_every_model_type() {
    for (model_type, method) in [
        ("gpt2", "lora"),
        ("gpt2", "ia3"),
        ("t5", "lora"),
        ("t5", "prefix"),
        ("bert", "lora"),
        ("bert", "prefix"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let o = peft(&[
            "demo",
            "--model-type",
            model_type,
            "--method",
            method,
            "--steps",
            "60",
            "--out",
            dir.path().to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{model_type} {method}: {}", stderr(&o));
        assert!(
            stdout(&o).contains("demo passed"),
            "{model_type} {method}: {}",
            stdout(&o)
        );
    }
    let o = peft(&["demo", "--model-type", "bloom"]);
    assert!(
        !o.status.success() && stderr(&o).contains("llama, gpt2, t5 or bert"),
        "{}",
        stderr(&o)
    );
}

/// `peft count` prints peft's line from configs alone, including the seed's number for
/// mt0-large (make_model_fixtures.py: count_cases.json).
#[test]
fn count_from_configs_alone() {
    let text = std::fs::read_to_string(fixtures().join("count_cases.json")).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(cases.iter().any(|c| c["parameter_line"]
        == "trainable params: 2,359,296 || all params: 1,231,940,608 || trainable%: 0.1915"));
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("config.json");
        let adapter = dir.path().join("adapter_config.json");
        std::fs::write(&model, case["model_config"].to_string()).unwrap();
        std::fs::write(&adapter, case["adapter_config"].to_string()).unwrap();
        let o = peft(&[
            "count",
            "--model-config",
            model.to_str().unwrap(),
            "--adapter-config",
            adapter.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", stderr(&o));
        assert_eq!(stdout(&o).trim(), case["parameter_line"].as_str().unwrap());
    }
    let o = peft(&[
        "count",
        "--model-config",
        "/no/such.json",
        "--adapter-config",
        "/no/such.json",
    ]);
    assert!(!o.status.success() && stderr(&o).contains("/no/such.json"));
}

/// `peft logits` on seq2seq (with `decoder_input_ids`) and classification models, and `peft
/// generate --prompt-ids` on GPT-2 and T5 (make_model_fixtures.py).
#[test]
fn logits_and_generate_on_every_model_family() {
    for (case, output) in [
        ("t5_tiny__lora", "logits"),
        ("mt5_tiny__prompt", "logits"),
        ("gpt2_tiny__ia3", "logits"),
        ("bert_seqcls__lora", "logits"),
        ("bert_tokcls__ptuning", "logits"),
        ("bert_base__prefix", "last_hidden_state"),
    ] {
        let data = candle_core::safetensors::load(
            fixtures().join(format!("cases/{case}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in.safetensors");
        let mut tensors = std::collections::HashMap::new();
        for k in ["input_ids", "attention_mask", "decoder_input_ids"] {
            if let Some(t) = data.get(k) {
                tensors.insert(k.to_string(), t.clone());
            }
        }
        candle_core::safetensors::save(&tensors, &input).unwrap();
        let (model, _) = case.split_once("__").unwrap();
        let out = dir.path().join("out.safetensors");
        let o = peft(&[
            "logits",
            "--model",
            fixtures().join("models").join(model).to_str().unwrap(),
            "--adapter",
            fixtures().join("adapters").join(case).to_str().unwrap(),
            "--input",
            input.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
        assert!(
            max_diff(&got[output], &data["logits_adapted"]) <= 1e-4,
            "{case}"
        );
    }
    for case in ["t5_tiny__prefix", "gpt2_tiny__prompt"] {
        let data = candle_core::safetensors::load(
            fixtures().join(format!("cases/{case}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        let (model, _) = case.split_once("__").unwrap();
        let row: Vec<i64> = data["input_ids"].get(0).unwrap().to_vec1().unwrap();
        let ids: Vec<String> = if model.starts_with("t5") {
            row.iter()
        } else {
            row[..5].iter()
        }
        .map(|v| v.to_string())
        .collect();
        let expected: Vec<String> = data["generated"]
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|v| v.to_string())
            .collect();
        let o = peft(&[
            "generate",
            "--model",
            fixtures().join("models").join(model).to_str().unwrap(),
            "--adapter",
            fixtures().join("adapters").join(case).to_str().unwrap(),
            "--prompt-ids",
            &ids.join(","),
            "--max-new-tokens",
            &expected.len().to_string(),
            "--ignore-eos",
        ]);
        assert!(o.status.success(), "{case}: {}", stderr(&o));
        assert_eq!(stdout(&o).trim(), expected.join(","), "{case}");
    }
    // A decoder-only model refuses decoder inputs.
    let data = candle_core::safetensors::load(
        fixtures().join("cases/t5_tiny__lora.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    let tensors = [
        ("input_ids".to_string(), data["input_ids"].clone()),
        (
            "decoder_input_ids".to_string(),
            data["decoder_input_ids"].clone(),
        ),
    ];
    candle_core::safetensors::save(&tensors.into_iter().collect(), &input).unwrap();
    let o = peft(&[
        "logits",
        "--model",
        fixtures().join("models/gpt2_tiny").to_str().unwrap(),
        "--input",
        input.to_str().unwrap(),
        "--out",
        dir.path().join("o.safetensors").to_str().unwrap(),
    ]);
    assert!(
        !o.status.success() && stderr(&o).contains("decoder_input_ids"),
        "{}",
        stderr(&o)
    );
}

/// `--adapter NAME=DIR` and `--row-adapters`: each row (or prompt) runs its own adapter, as
/// peft's `adapter_names=` (tools/reference/make_mixed_fixtures.py, the LLaMA case).
#[test]
fn logits_and_generate_with_row_adapters_match_peft_mixed_batches() {
    let data =
        candle_core::safetensors::load(fixtures().join("mixed_batch.safetensors"), &Device::Cpu)
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.safetensors");
    candle_core::safetensors::save(
        &[
            (
                "input_ids".to_string(),
                data["llama_mixed.input_ids"].clone(),
            ),
            (
                "attention_mask".to_string(),
                data["llama_mixed.attention_mask"].clone(),
            ),
        ]
        .into_iter()
        .collect(),
        &input,
    )
    .unwrap();
    let model = fixtures().join("models/llama_tiny");
    let adapter = |name: &str, dir: &str| {
        format!("{name}={}", fixtures().join("adapters").join(dir).display())
    };
    let qv = adapter("qv", "llama_tiny__lora_qv");
    let embed = adapter("embed", "llama_tiny__lora_embed");
    let patterns = adapter("patterns", "llama_tiny__lora_patterns");
    let out = dir.path().join("out.safetensors");
    let o = peft(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &qv,
        "--adapter",
        &embed,
        "--adapter",
        &patterns,
        "--row-adapters",
        "qv,__base__,embed,qv,patterns",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let got = candle_core::safetensors::load(&out, &Device::Cpu).unwrap();
    assert!(max_diff(&got["logits"], &data["llama_mixed.logits"]) <= 1e-4);

    // One prompt per row, left-padded in one batch.
    let ids: Vec<Vec<u32>> = data["llama_mixed.gen_input_ids"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mask: Vec<Vec<u32>> = data["llama_mixed.gen_attention_mask"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let prompts: Vec<String> = ids
        .iter()
        .zip(&mask)
        .map(|(r, m)| {
            r.iter()
                .zip(m)
                .filter(|(_, &m)| m == 1)
                .map(|(t, _)| t.to_string())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let want: Vec<Vec<u32>> = data["llama_mixed.generated"]
        .to_dtype(DType::U32)
        .unwrap()
        .to_vec2()
        .unwrap();
    let mut args = vec![
        "generate".to_string(),
        "--model".into(),
        model.to_str().unwrap().into(),
        "--adapter".into(),
        qv.clone(),
        "--adapter".into(),
        embed.clone(),
        "--adapter".into(),
        patterns.clone(),
        "--row-adapters".into(),
        "embed,patterns,__base__,qv".into(),
        "--max-new-tokens".into(),
        want[0].len().to_string(),
        "--ignore-eos".into(),
    ];
    for p in &prompts {
        args.extend(["--prompt-ids".to_string(), p.clone()]);
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = peft(&refs);
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<Vec<u32>> = stdout(&o)
        .lines()
        .map(|l| l.split(',').map(|t| t.parse().unwrap()).collect())
        .collect();
    assert_eq!(lines, want);

    // A wrong count is one clear error.
    let o = peft(&[
        "logits",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &qv,
        "--row-adapters",
        "qv,qv",
        "--input",
        input.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("--row-adapters: 2 names for 5"),
        "{}",
        stderr(&o)
    );
}

/// `peft combine` writes peft's combined adapter: `cat` of two LoRA adapters with a negative
/// weight, then `peft logits` with it matches peft's logits (fixtures from
/// tools/reference/make_combine_fixtures.py); bad requests fail with one line naming the flag.
#[test]
fn combine_writes_the_adapter_peft_combines() {
    let data = candle_core::safetensors::load(fixtures().join("combine.safetensors"), &Device::Cpu)
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let input = write_inputs(&data, dir.path());
    let model = fixtures().join("models/llama_tiny");
    let adapter = |name: &str| {
        fixtures()
            .join("adapters")
            .join(name)
            .to_str()
            .unwrap()
            .to_string()
    };
    let (qv, qvo, embed) = (
        adapter("llama_tiny__lora_qv"),
        adapter("llama_tiny__lora_qvo"),
        adapter("llama_tiny__lora_embed"),
    );
    let out = dir.path().join("combined");
    let o = peft(&[
        "combine",
        "--model",
        model.to_str().unwrap(),
        "--adapter",
        &qv,
        "--adapter",
        &qvo,
        "--adapter",
        &embed,
        "--weights",
        "0.6,0.5,-0.3",
        "--type",
        "cat",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("r = 12"), "{}", stdout(&o));
    let got = logits_of(&model, &out, &input, &dir.path().join("logits.safetensors"));
    assert!(max_diff(&got, &data["cat.logits"]) <= 1e-4);

    for (args, needle) in [
        (vec!["--weights", "1.0"], "--weights"),
        (
            vec!["--weights", "1,1", "--type", "average"],
            "combination_type",
        ),
        (vec!["--weights", "1,1", "--type", "ties"], "density"),
    ] {
        let mut all = vec![
            "combine",
            "--model",
            model.to_str().unwrap(),
            "--adapter",
            &qv,
            "--adapter",
            &qvo,
        ];
        all.extend(args);
        all.extend(["--out", out.to_str().unwrap()]);
        let o = peft(&all);
        assert!(!o.status.success());
        let err = stderr(&o);
        assert!(err.contains(needle) && err.lines().count() == 1, "{err}");
    }
}

/// `--device`: `peft devices` reports the backends; a malformed name and a backend this build
/// lacks are one-line errors saying what to do; `PEFT_DEVICE` is the default.
#[test]
fn devices_are_reported_and_unbuilt_ones_refused() {
    let o = Command::new(env!("CARGO_BIN_EXE_peft"))
        .arg("devices")
        .env_remove("PEFT_DEVICE")
        .output()
        .unwrap();
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("cpu     available") && out.contains("device  cpu opens"),
        "{out}"
    );
    let o = peft(&["--device", "tpu", "methods"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cpu, cuda, cuda:N, metal or metal:N"));
    assert_eq!(err.lines().count(), 1, "{err}");
    if !cfg!(feature = "cuda") {
        let o = Command::new(env!("CARGO_BIN_EXE_peft"))
            .args(["logits", "--model", "m", "--input", "i", "--out", "o"])
            .env("PEFT_DEVICE", "cuda:0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            !o.status.success()
                && err.contains("no CUDA support")
                && err.contains("--features cuda"),
            "{err}"
        );
    }
}
