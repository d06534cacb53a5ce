//! Bad prompt-learning and IA3 configs give clear errors naming the key and the expected value.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device};
use common::fixtures;
use peft::{AdapterConfig, PeftError};

fn base() -> Box<dyn peft::AdaptableModel> {
    peft::models::load_model(
        &fixtures().join("models/llama_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn error(json: &str) -> String {
    match AdapterConfig::from_json_str(json, "adapter_config.json")
        .and_then(|c| peft::get_peft_model(base(), c, 0))
    {
        Ok(_) => panic!("expected an error for {json}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn prompt_learning_config_errors() {
    for peft_type in ["PROMPT_TUNING", "P_TUNING", "PREFIX_TUNING"] {
        let s = error(&format!(
            r#"{{"peft_type": "{peft_type}", "num_virtual_tokens": 0}}"#
        ));
        assert!(
            s.contains("num_virtual_tokens") && s.contains("positive"),
            "{s}"
        );
        let s = error(&format!(r#"{{"peft_type": "{peft_type}"}}"#));
        assert!(
            s.contains("num_virtual_tokens") && s.contains("missing"),
            "{s}"
        );
        let s = error(&format!(
            r#"{{"peft_type": "{peft_type}", "num_virtual_tokens": 2, "num_transformer_submodules": 2}}"#
        ));
        assert!(
            s.contains("num_transformer_submodules") && s.contains("decoder-only"),
            "{s}"
        );
        let s = error(&format!(
            r#"{{"peft_type": "{peft_type}", "num_virtual_tokens": 2, "modules_to_save": ["input_layernorm"]}}"#
        ));
        assert!(
            s.contains("modules_to_save") && s.contains("LlamaRMSNorm"),
            "{s}"
        );
    }
    for peft_type in ["PROMPT_TUNING", "P_TUNING"] {
        let s = error(&format!(
            r#"{{"peft_type": "{peft_type}", "num_virtual_tokens": 2, "token_dim": 32}}"#
        ));
        assert!(
            s.contains("token_dim") && s.contains("hidden size 64") && s.contains("32"),
            "{s}"
        );
    }
    let s = error(r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "num_layers": 5}"#);
    assert!(s.contains("num_layers") && s.contains("2 layers"), "{s}");
    let s =
        error(r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 2, "init_weights": "ones"}"#);
    assert!(s.contains("init_weights") && s.contains("zero"), "{s}");
    let s = error(
        r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 2, "encoder_reparameterization_type": "GRU"}"#,
    );
    assert!(
        s.contains("encoder_reparameterization_type")
            && s.contains("MLP or LSTM")
            && s.contains("GRU"),
        "{s}"
    );
    let s = error(
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi"}"#,
    );
    assert!(s.contains("tokenizer_name_or_path"), "{s}");
    let s = error(
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "tokenizer_name_or_path": "x"}"#,
    );
    assert!(s.contains("prompt_tuning_init_text"), "{s}");
    let s = error(
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "hi", "tokenizer_name_or_path": "/no/such/dir"}"#,
    );
    assert!(
        s.contains("/no/such/dir") && s.contains("tokenizer.json"),
        "{s}"
    );
    let s = error(
        r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2, "prompt_tuning_init": "VOCAB"}"#,
    );
    assert!(
        s.contains("prompt_tuning_init") && s.contains("SAMPLE_VOCAB"),
        "{s}"
    );
}

#[test]
fn ia3_config_errors() {
    let s = error(
        r#"{"peft_type": "IA3", "target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}"#,
    );
    assert!(
        s.contains("feedforward_modules") && s.contains("subset"),
        "{s}"
    );
    let s = error(
        r#"{"peft_type": "IA3", "target_modules": ["embed_tokens"], "feedforward_modules": []}"#,
    );
    assert!(s.contains("embed_tokens") && s.contains("linear"), "{s}");
    let s = error(r#"{"peft_type": "IA3", "feedforward_modules": 3}"#);
    assert!(s.contains("feedforward_modules"), "{s}");
}

#[test]
fn prompt_adapters_cannot_be_combined_or_merged() {
    let cfg = |j: &str| AdapterConfig::from_json_str(j, "inline").unwrap();
    let mut model = peft::PeftModel::new(base());
    model
        .add_adapter(
            "p",
            cfg(r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 2}"#),
            0,
        )
        .unwrap();
    model
        .add_adapter(
            "l",
            cfg(r#"{"peft_type": "LORA", "target_modules": ["q_proj"]}"#),
            0,
        )
        .unwrap();
    let e = model.set_adapters(&["p", "l"]).unwrap_err();
    assert!(
        matches!(e, PeftError::InvalidState(_)) && e.to_string().contains("`p`"),
        "{e}"
    );
    assert!(model
        .merge_adapter()
        .unwrap_err()
        .to_string()
        .contains("prompt-learning"));
}
