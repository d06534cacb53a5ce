//! Bad configs and checkpoints of the plugin methods (HRA, OFT, VeRA, FourierFT, MiSS, C3A, LoHa, LoKr)
//! give typed errors naming the key or file, expected vs found; never a panic.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device};
use common::fixtures;
use peft::{checkpoint, AdapterConfig, PeftModel};

fn model(name: &str) -> Box<dyn peft::AdaptableModel> {
    peft::models::load_model(
        &fixtures().join("models").join(name),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn error_on(model_name: &str, json: &str) -> String {
    match AdapterConfig::from_json_str(json, "adapter_config.json")
        .and_then(|c| peft::get_peft_model(model(model_name), c, 0))
    {
        Ok(_) => panic!("expected an error for {json}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_values_are_checked() {
    let cases = [
        (r#"{"peft_type": "HRA", "r": 0}"#, "r", "positive"),
        (
            r#"{"peft_type": "HRA", "bias": "some"}"#,
            "bias",
            "hra_only",
        ),
        (
            r#"{"peft_type": "OFT", "r": 4, "oft_block_size": 16}"#,
            "oft_block_size",
            "exactly one",
        ),
        (
            r#"{"peft_type": "OFT", "r": 0, "oft_block_size": 0}"#,
            "oft_block_size = 0",
            "exactly one",
        ),
        (
            r#"{"peft_type": "OFT", "module_dropout": 1.5}"#,
            "module_dropout",
            "probability",
        ),
        (r#"{"peft_type": "VERA", "r": 0}"#, "r", "positive"),
        (
            r#"{"peft_type": "VERA", "projection_prng_key": "x"}"#,
            "projection_prng_key",
            "integer",
        ),
        (
            r#"{"peft_type": "VERA", "vera_dropout": -0.1}"#,
            "vera_dropout",
            "probability",
        ),
        (
            r#"{"peft_type": "FOURIERFT", "n_frequency": 0}"#,
            "n_frequency",
            "positive",
        ),
        (
            r#"{"peft_type": "FOURIERFT", "n_frequency_pattern": {"q_proj": 2.5}}"#,
            "n_frequency_pattern",
            "integer",
        ),
        (
            r#"{"peft_type": "FOURIERFT", "n_frequency": 100000}"#,
            "n_frequency",
            "at most the 64 x 64",
        ),
        (r#"{"peft_type": "LOHA", "r": 0}"#, "r", "positive"),
        (
            r#"{"peft_type": "C3A", "block_size": 7}"#,
            "block_size",
            "divisor",
        ),
        (
            r#"{"peft_type": "C3A", "init_weights": "orthogonal"}"#,
            "init_weights",
            "gaussian",
        ),
        (
            r#"{"peft_type": "MISS", "r": 128}"#,
            "r",
            "at most in_features",
        ),
        (
            r#"{"peft_type": "MISS", "r": 5, "init_weights": "bat"}"#,
            "r",
            "divisor",
        ),
        (
            r#"{"peft_type": "LOKR", "rank_dropout": 2}"#,
            "rank_dropout",
            "probability",
        ),
    ];
    for (json, key, expected) in cases {
        let s = error_on("llama_tiny", json);
        assert!(s.contains(key) && s.contains(expected), "{json}: {s}");
    }
}

/// As in peft, these methods adapt `nn.Linear` only: GPT-2's Conv1D layers are refused with the
/// layer's path (VeRA and FourierFT support them).
#[test]
fn conv1d_layers_are_refused_by_linear_only_methods() {
    for peft_type in ["LOHA", "LOKR", "HRA", "OFT", "MISS", "C3A"] {
        let s = error_on(
            "gpt2_tiny",
            &format!(r#"{{"peft_type": "{peft_type}", "target_modules": ["c_attn"]}}"#),
        );
        assert!(
            s.contains("c_attn") && s.contains("Conv1D"),
            "{peft_type}: {s}"
        );
    }
    for json in [
        r#"{"peft_type": "VERA", "r": 4, "target_modules": ["c_attn"]}"#,
        r#"{"peft_type": "FOURIERFT", "n_frequency": 8, "target_modules": ["c_attn"]}"#,
    ] {
        let config = AdapterConfig::from_json_str(json, "adapter_config.json").unwrap();
        assert!(
            peft::get_peft_model(model("gpt2_tiny"), config, 0).is_ok(),
            "{json}"
        );
    }
}

/// A VeRA checkpoint whose saved projections do not span the model's layers names the file,
/// the key and both shapes.
#[test]
fn vera_projections_of_the_wrong_shape_are_refused() {
    let src = fixtures().join("adapters/llama_tiny__vera");
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    let tensors = checkpoint::read_safetensors(&src.join(checkpoint::WEIGHTS_NAME), &Device::Cpu)
        .unwrap()
        .into_iter()
        .map(|(k, t)| {
            let t = if k == "base_model.vera_A" {
                t.narrow(1, 0, 32).unwrap()
            } else {
                t
            };
            (k, t)
        })
        .collect::<Vec<_>>();
    checkpoint::write_safetensors(&dir.path().join(checkpoint::WEIGHTS_NAME), &tensors).unwrap();
    let err = match PeftModel::from_pretrained(model("llama_tiny"), dir.path(), false) {
        Ok(_) => panic!("a narrowed vera_A must be refused"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("base_model.vera_A") && err.contains("32") && err.contains("96"),
        "{err}"
    );
    assert!(err.contains(checkpoint::WEIGHTS_NAME), "{err}");
}
