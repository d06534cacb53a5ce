//! Every bad input gets a typed error that names the file, key and expected vs found; nothing
//! panics and nothing half-applies.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use peft::{checkpoint, AdapterConfig, ModelInputs, PeftError, PeftModel};

fn base() -> Box<dyn peft::AdaptableModel> {
    peft::models::load_model(
        &fixtures().join("models/llama_tiny"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn config(json: &str) -> Result<AdapterConfig, PeftError> {
    AdapterConfig::from_json_str(json, "adapter_config.json")
}

fn err_text<T>(r: Result<T, PeftError>) -> (PeftError, String) {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => {
            let s = e.to_string();
            (e, s)
        }
    }
}

#[test]
fn malformed_and_incomplete_configs() {
    let (e, s) = err_text(config("{\"peft_type\": \"LORA\", \"r\": 8,"));
    assert!(
        matches!(e, PeftError::Json { .. }) && s.contains("adapter_config.json"),
        "{s}"
    );

    let (e, s) = err_text(config("[1, 2]"));
    assert!(
        matches!(e, PeftError::ConfigValue { .. }) && s.contains("a JSON object"),
        "{s}"
    );

    let (e, s) = err_text(config("{\"r\": 8}"));
    assert!(
        matches!(e, PeftError::MissingKey { .. }) && s.contains("peft_type") && s.contains("LORA"),
        "{s}"
    );

    let (e, s) = err_text(config("{\"peft_type\": \"NOT_A_METHOD\"}"));
    assert!(
        matches!(e, PeftError::UnknownMethod { .. })
            && s.contains("NOT_A_METHOD")
            && s.contains("LORA"),
        "{s}"
    );

    let (e, s) = err_text(config("{\"peft_type\": \"LORA\", \"r\": \"eight\"}"));
    assert!(matches!(e, PeftError::ConfigValue { .. }), "{s}");
    assert!(
        s.contains("`r`") && s.contains("non-negative integer") && s.contains("\"eight\""),
        "{s}"
    );

    let (_, s) = err_text(config("{\"peft_type\": \"LORA\", \"r\": 0}"));
    assert!(s.contains("`r`") && s.contains("positive"), "{s}");
    let (_, s) = err_text(config("{\"peft_type\": \"LORA\", \"lora_dropout\": 1.5}"));
    assert!(s.contains("lora_dropout"), "{s}");
    let (_, s) = err_text(config(
        "{\"peft_type\": \"LORA\", \"task_type\": \"TRANSLATE\"}",
    ));
    assert!(s.contains("task_type") && s.contains("CAUSAL_LM"), "{s}");
    let (_, s) = err_text(config(
        "{\"peft_type\": \"LORA\", \"target_modules\": \"(unclosed\"}",
    ));
    assert!(
        s.contains("target_modules") && s.contains("regular expression"),
        "{s}"
    );
    let (_, s) = err_text(config("{\"peft_type\": \"LORA\", \"target_modules\": 5}"));
    assert!(s.contains("target_modules"), "{s}");
    let (_, s) = err_text(config(
        "{\"peft_type\": \"LORA\", \"layers_pattern\": \"layers\"}",
    ));
    assert!(s.contains("layers_to_transform"), "{s}");
    let (_, s) = err_text(config(
        "{\"peft_type\": \"LORA\", \"target_modules\": \".*q\", \"layers_to_transform\": [0]}",
    ));
    assert!(
        s.contains("layers_to_transform") && s.contains("regex"),
        "{s}"
    );
    let (_, s) = err_text(config(
        "{\"peft_type\": \"LORA\", \"rank_pattern\": {\"q_proj\": \"big\"}}",
    ));
    assert!(s.contains("rank_pattern.q_proj"), "{s}");
    let (_, s) = err_text(config(
        "{\"peft_type\": \"LORA\", \"init_lora_weights\": \"zeros\"}",
    ));
    assert!(s.contains("init_lora_weights"), "{s}");
}

#[test]
fn unimplemented_variants_are_refused_not_ignored() {
    for (key, value) in [
        ("target_parameters", "[\"w\"]"),
        ("use_qalora", "true"),
        ("megatron_config", "{\"a\": 1}"),
    ] {
        let (e, s) = err_text(config(&format!(
            "{{\"peft_type\": \"LORA\", \"{key}\": {value}}}"
        )));
        assert!(matches!(e, PeftError::Unsupported { .. }), "{key}: {s}");
        assert!(
            s.contains(key) && s.contains("adapter_config.json"),
            "{key}: {s}"
        );
    }
    // Inits that need a pass over data cannot start a new adapter here.
    for init in ["eva", "corda"] {
        let cfg = config(&format!("{{\"peft_type\": \"LORA\", \"init_lora_weights\": \"{init}\", \"target_modules\": [\"q_proj\"]}}")).unwrap();
        let (e, s) = err_text(peft::get_peft_model(base(), cfg, 0));
        assert!(
            matches!(e, PeftError::Unsupported { .. }) && s.contains(init),
            "{s}"
        );
    }
}

#[test]
fn unknown_fields_are_kept_and_written_back() {
    let cfg = config("{\"peft_type\": \"LORA\", \"some_future_field\": {\"x\": [1, 2]}, \"r\": 4}")
        .unwrap();
    assert!(cfg.unknown.contains_key("some_future_field"));
    let text = cfg.to_json_string();
    assert!(text.contains("\"some_future_field\""), "{text}");
    let again = AdapterConfig::from_json_str(&text, "again").unwrap();
    assert_eq!(again.unknown, cfg.unknown);
}

#[test]
fn target_errors_name_patterns_and_existing_modules() {
    let cfg =
        config("{\"peft_type\": \"LORA\", \"target_modules\": [\"query\", \"value\"]}").unwrap();
    let (e, s) = err_text(peft::get_peft_model(base(), cfg, 0));
    assert!(matches!(e, PeftError::NoTargetMatch { .. }), "{s}");
    assert!(
        s.contains("'query'") && s.contains("q_proj") && s.contains("lm_head"),
        "{s}"
    );

    let cfg = config("{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"], \"exclude_modules\": [\"q_proj\"]}").unwrap();
    let (_, s) = err_text(peft::get_peft_model(base(), cfg, 0));
    assert!(s.contains("excluded") && s.contains("'q_proj'"), "{s}");

    let cfg = config(
        "{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"], \"layers_to_transform\": [7]}",
    )
    .unwrap();
    let (_, s) = err_text(peft::get_peft_model(base(), cfg, 0));
    assert!(s.contains("layers_to_transform"), "{s}");

    let cfg = config("{\"peft_type\": \"LORA\", \"target_modules\": \".*self_attn\"}").unwrap();
    let (e, s) = err_text(peft::get_peft_model(base(), cfg, 0));
    assert!(
        matches!(e, PeftError::UnsupportedModule { .. }) && s.contains("LlamaAttention"),
        "{s}"
    );

    let cfg =
        config("{\"peft_type\": \"LORA\", \"target_modules\": [\"input_layernorm\"]}").unwrap();
    let (_, s) = err_text(peft::get_peft_model(base(), cfg, 0));
    assert!(s.contains("LlamaRMSNorm"), "{s}");
}

fn copy_adapter(case: &str, to: &Path) {
    let src = fixtures().join("adapters").join(case);
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(f), to.join(f)).unwrap();
    }
}

#[test]
fn checkpoint_errors() {
    let dir = tempfile::tempdir().unwrap();
    // No files at all.
    let (e, s) = err_text(PeftModel::from_pretrained(base(), dir.path(), false));
    assert!(
        matches!(e, PeftError::Io { .. }) && s.contains("adapter_config.json"),
        "{s}"
    );

    // Truncated weights.
    copy_adapter("llama_tiny__lora_qv", dir.path());
    let weights = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    let (e, s) = err_text(PeftModel::from_pretrained(base(), dir.path(), false));
    assert!(
        matches!(e, PeftError::BadCheckpoint { .. }) && s.contains("adapter_model.safetensors"),
        "{s}"
    );

    // A missing tensor, then a tensor of the wrong shape.
    let full = checkpoint::read_safetensors(
        &fixtures().join("adapters/llama_tiny__lora_qv/adapter_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let missing: Vec<_> = full
        .iter()
        .filter(|(k, _)| !k.contains("layers.1.self_attn.v_proj.lora_B"))
        .cloned()
        .collect();
    checkpoint::write_safetensors(&weights, &missing).unwrap();
    let (e, s) = err_text(PeftModel::from_pretrained(base(), dir.path(), false));
    assert!(matches!(e, PeftError::MissingTensor { .. }), "{s}");
    assert!(
        s.contains("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
            && s.contains("[32, 4]"),
        "{s}"
    );

    let mut wrong = full.clone();
    let (k, _) = wrong[0].clone();
    wrong[0] = (
        k.clone(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    checkpoint::write_safetensors(&weights, &wrong).unwrap();
    let (e, s) = err_text(PeftModel::from_pretrained(base(), dir.path(), false));
    assert!(
        matches!(e, PeftError::ShapeMismatch { .. }) && s.contains(&k) && s.contains("[3, 3]"),
        "{s}"
    );

    // Unexpected keys load, and are reported.
    let mut extra = full.clone();
    extra.push((
        "base_model.model.something.else".into(),
        Tensor::zeros(2, DType::F32, &Device::Cpu).unwrap(),
    ));
    checkpoint::write_safetensors(&weights, &extra).unwrap();
    let mut model = PeftModel::new(base());
    let report = model.load_adapter(dir.path(), "default", false).unwrap();
    assert_eq!(
        report.unexpected_keys,
        vec!["base_model.model.something.else".to_string()]
    );

    // A config that is not JSON.
    std::fs::write(dir.path().join("adapter_config.json"), "not json").unwrap();
    let (e, s) = err_text(PeftModel::from_pretrained(base(), dir.path(), false));
    assert!(
        matches!(e, PeftError::Json { .. }) && s.contains("adapter_config.json"),
        "{s}"
    );
}

#[test]
fn failed_injection_leaves_the_model_untouched() {
    let dir = tempfile::tempdir().unwrap();
    copy_adapter("llama_tiny__lora_qv", dir.path());
    let full =
        checkpoint::read_safetensors(&dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    let missing: Vec<_> = full
        .iter()
        .filter(|(k, _)| !k.contains("layers.1.self_attn.v_proj"))
        .cloned()
        .collect();
    checkpoint::write_safetensors(&dir.path().join("adapter_model.safetensors"), &missing).unwrap();
    let mut model = PeftModel::new(base());
    let ids = ModelInputs::from_ids(Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap());
    let before = model.forward(&ids).unwrap();
    assert!(model.load_adapter(dir.path(), "default", false).is_err());
    assert!(model.adapter_names().is_empty());
    assert_eq!(
        common::max_abs_diff(&before, &model.forward(&ids).unwrap()),
        0.0
    );
}

#[test]
fn adapter_management_errors() {
    let cfg = || config("{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"]}").unwrap();
    let mut model = peft::get_peft_model(base(), cfg(), 0).unwrap();
    let (e, _) = err_text(model.add_adapter("default", cfg(), 1));
    assert!(matches!(e, PeftError::AdapterExists(_)));
    let (e, s) = err_text(model.set_adapter("nope"));
    assert!(
        matches!(e, PeftError::UnknownAdapter { .. }) && s.contains("default"),
        "{s}"
    );
    assert!(model.delete_adapter("nope").is_err());
    model.delete_adapter("default").unwrap();
    assert!(model.adapter_names().is_empty());
}

#[test]
fn bad_model_inputs_and_configs() {
    let model = PeftModel::new(base());
    let ids = Tensor::new(&[[1u32, 2, 300]], &Device::Cpu).unwrap();
    let (_, s) = err_text(model.forward(&ModelInputs::from_ids(ids)));
    assert!(
        s.contains("input_ids") && s.contains("[0, 128)") && s.contains("300"),
        "{s}"
    );
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
    let (_, s) = err_text(model.forward(&ModelInputs::from_ids(ids).with_mask(Some(mask))));
    assert!(
        s.contains("attention_mask") && s.contains("[1, 3]") && s.contains("[1, 2]"),
        "{s}"
    );

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"llama\", \"hidden_size\": 64}",
    )
    .unwrap();
    let (e, s) = err_text(peft::models::load_model(
        dir.path(),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        matches!(e, PeftError::MissingKey { .. })
            && s.contains("vocab_size")
            && s.contains("config.json"),
        "{s}"
    );
    std::fs::write(
        dir.path().join("config.json"),
        "{\"model_type\": \"gpt_neox\"}",
    )
    .unwrap();
    let (_, s) = err_text(peft::models::load_model(
        dir.path(),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        s.contains("model_type") && s.contains("gpt_neox") && s.contains("llama"),
        "{s}"
    );

    // Weights of the wrong shape for the config.
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(
            fixtures().join("models/llama_tiny").join(f),
            dir.path().join(f),
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(dir.path().join("config.json"))
        .unwrap()
        .replace("\"intermediate_size\": 96", "\"intermediate_size\": 100");
    std::fs::write(dir.path().join("config.json"), text).unwrap();
    let (e, s) = err_text(peft::models::load_model(
        dir.path(),
        DType::F32,
        &Device::Cpu,
    ));
    assert!(
        matches!(e, PeftError::ShapeMismatch { .. })
            && s.contains("gate_proj.weight")
            && s.contains("[100, 64]"),
        "{s}"
    );
}

#[test]
fn writes_are_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let model = peft::get_peft_model(
        base(),
        config("{\"peft_type\": \"LORA\", \"target_modules\": [\"q_proj\"]}").unwrap(),
        0,
    )
    .unwrap();
    model.save_pretrained(dir.path()).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["adapter_config.json", "adapter_model.safetensors"]
    );
    // A target that cannot be written (a folder in the way) fails without leaving temp files.
    let blocked = dir.path().join("blocked");
    std::fs::create_dir_all(blocked.join("adapter_model.safetensors")).unwrap();
    assert!(model.save_pretrained(&blocked).is_err());
    let left: Vec<String> = std::fs::read_dir(&blocked)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["adapter_model.safetensors"]);
}
