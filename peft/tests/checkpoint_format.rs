//! What this library writes is what peft writes: the same tensor keys, shapes and dtypes, and
//! the same config fields and values (reference adapters from tools/reference/make_fixtures.py).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::BTreeSet;

use candle_core::{DType, Device};
use common::fixtures;
use peft::{checkpoint, get_peft_model, AdapterConfig, PeftModel};
use serde_json::Value;

fn reference_config(dir: &str) -> serde_json::Map<String, Value> {
    let text = std::fs::read_to_string(
        fixtures()
            .join("adapters")
            .join(dir)
            .join("adapter_config.json"),
    )
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Re-creates each reference adapter from the reference's own config file (as a user would pass
/// the same LoraConfig), saves it, and compares files with what peft saved.
#[test]
fn saved_files_match_peft_layout() {
    let cases = [
        "llama_tiny__lora_qv",
        "llama_tiny__lora_patterns",
        "llama_tiny__lora_embed",
        "llama3_rope_tied__lora_default",
        "qwen2_tiny__lora_qv",
        "llama_tiny__lora_mts",
    ];
    for case in cases {
        let (model_name, _) = case.split_once("__").unwrap();
        let reference = reference_config(case);
        // The config the user wrote: peft resolved target_modules before saving; start from null
        // where the reference used the defaults, and from "all-linear" where it expanded it.
        let mut user = reference.clone();
        if case.ends_with("lora_default") {
            user.insert("target_modules".into(), Value::Null);
        }
        if case.ends_with("lora_patterns") {
            user.insert("target_modules".into(), Value::from("all-linear"));
        }
        user.insert("inference_mode".into(), Value::Bool(false));
        let config = AdapterConfig::from_value(Value::Object(user), case).unwrap();
        let base = peft::models::load_model(
            &fixtures().join("models").join(model_name),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let model = get_peft_model(base, config, 1).unwrap();
        let dir = tempfile::tempdir().unwrap();
        model.save_pretrained(dir.path()).unwrap();

        // Config: same keys and values, target_modules compared as a set.
        let text = std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap();
        let ours: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
        let keys = |m: &serde_json::Map<String, Value>| m.keys().cloned().collect::<BTreeSet<_>>();
        assert_eq!(keys(&ours), keys(&reference), "{case}: config keys");
        for (k, v) in &reference {
            match k.as_str() {
                "peft_version" | "base_model_name_or_path" | "auto_mapping" => {}
                "target_modules" | "exclude_modules" => {
                    let set = |v: &Value| {
                        v.as_array()
                            .map(|a| a.iter().map(|x| x.to_string()).collect::<BTreeSet<_>>())
                    };
                    assert_eq!(set(&ours[k]), set(v), "{case}: {k}");
                }
                _ => assert_eq!(&ours[k], v, "{case}: {k}"),
            }
        }
        // The file is peft's layout: indent 2, sorted keys.
        let mut sorted_keys: Vec<&String> = ours.keys().collect();
        sorted_keys.sort();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            sorted_keys,
            "{case}: sorted keys"
        );
        assert!(text.starts_with("{\n  \""), "{case}: indent 2");

        // Tensors: same keys, shapes and dtype (F32), and format=pt metadata.
        let ref_file = fixtures()
            .join("adapters")
            .join(case)
            .join(checkpoint::WEIGHTS_NAME);
        let expected = checkpoint::read_safetensors(&ref_file, &Device::Cpu).unwrap();
        let ours_file = dir.path().join(checkpoint::WEIGHTS_NAME);
        let got = checkpoint::read_safetensors(&ours_file, &Device::Cpu).unwrap();
        let shapes = |v: &[(String, candle_core::Tensor)]| {
            v.iter()
                .map(|(k, t)| (k.clone(), t.dims().to_vec(), t.dtype()))
                .collect::<Vec<_>>()
        };
        assert_eq!(shapes(&got), shapes(&expected), "{case}: tensors");
        let bytes = std::fs::read(&ours_file).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata()
                .as_ref()
                .and_then(|m| m.get("format"))
                .map(String::as_str),
            Some("pt")
        );
    }
}

#[test]
fn non_default_adapters_are_saved_in_subfolders_and_reload() {
    let base = || {
        peft::models::load_model(
            &fixtures().join("models/llama_tiny"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let mut model = PeftModel::new(base());
    let cfg = |r: usize| {
        AdapterConfig::from_json_str(
            &format!(r#"{{"peft_type": "LORA", "r": {r}, "lora_alpha": 3, "target_modules": ["k_proj"], "init_lora_weights": false}}"#),
            "inline",
        )
        .unwrap()
    };
    model.add_adapter("default", cfg(2), 1).unwrap();
    model.add_adapter("second", cfg(3), 2).unwrap();
    let dir = tempfile::tempdir().unwrap();
    model.save_pretrained(dir.path()).unwrap();
    assert!(dir.path().join("adapter_model.safetensors").is_file());
    assert!(dir
        .path()
        .join("second/adapter_model.safetensors")
        .is_file());
    let mut reloaded = PeftModel::from_pretrained(base(), dir.path(), false).unwrap();
    reloaded
        .load_adapter(&dir.path().join("second"), "second", false)
        .unwrap();
    let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 33]], &Device::Cpu).unwrap();
    let inputs = peft::ModelInputs::from_ids(ids);
    for name in ["default", "second"] {
        model.set_adapter(name).unwrap();
        reloaded.set_adapter(name).unwrap();
        let d = common::max_abs_diff(
            &model.forward(&inputs).unwrap(),
            &reloaded.forward(&inputs).unwrap(),
        );
        assert_eq!(d, 0.0, "{name}");
    }
}

#[test]
fn keys_without_base_model_prefix_and_pickled_files_load() {
    // peft accepts keys without `base_model.model.`; write such a file and load it.
    let case = "llama_tiny__lora_qv";
    let src = fixtures().join("adapters").join(case);
    let tensors =
        checkpoint::read_safetensors(&src.join(checkpoint::WEIGHTS_NAME), &Device::Cpu).unwrap();
    let stripped: Vec<_> = tensors
        .iter()
        .map(|(k, t)| {
            (
                k.strip_prefix("base_model.model.").unwrap().to_string(),
                t.clone(),
            )
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        dir.path().join("adapter_config.json"),
    )
    .unwrap();
    checkpoint::write_safetensors(&dir.path().join(checkpoint::WEIGHTS_NAME), &stripped).unwrap();
    let base = || {
        peft::models::load_model(
            &fixtures().join("models/llama_tiny"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap()
    };
    let a = PeftModel::from_pretrained(base(), &src, false).unwrap();
    let b = PeftModel::from_pretrained(base(), dir.path(), false).unwrap();
    let inputs = peft::ModelInputs::from_ids(
        candle_core::Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(),
    );
    assert_eq!(
        common::max_abs_diff(&a.forward(&inputs).unwrap(), &b.forward(&inputs).unwrap()),
        0.0
    );
    // adapter_model.bin written by peft with safe_serialization=False
    let bin_dir = fixtures().join("adapters").join("llama_tiny__lora_qv_bin");
    assert!(bin_dir.join("adapter_model.bin").is_file());
    let c = PeftModel::from_pretrained(base(), &bin_dir, false).unwrap();
    assert_eq!(
        common::max_abs_diff(&a.forward(&inputs).unwrap(), &c.forward(&inputs).unwrap()),
        0.0
    );
}

/// Configs written by peft 0.17 to 0.21 all parse, drive the same adapter, and survive a
/// write/read round trip (tools/reference/make_old_configs.sh).
#[test]
fn configs_from_peft_0_17_to_0_21_parse_and_round_trip() {
    let dir = fixtures().join("configs");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.push(fixtures().join("adapters/llama_tiny__lora_qv/adapter_config.json"));
    assert!(files.len() >= 5);
    for file in files {
        let cfg = AdapterConfig::from_path(&file).unwrap();
        assert!(
            cfg.unknown.is_empty(),
            "{}: {:?}",
            file.display(),
            cfg.unknown.keys()
        );
        let lora = cfg.method_as::<peft::lora::LoraConfig>().unwrap();
        assert_eq!(lora.r, 4);
        assert_eq!(lora.alpha(), 16.0);
        let again = AdapterConfig::from_json_str(&cfg.to_json_string(), "rewritten").unwrap();
        assert_eq!(again.to_json_string(), cfg.to_json_string());
        let original: serde_json::Map<String, Value> =
            serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        let written: serde_json::Map<String, Value> =
            serde_json::from_str(&cfg.to_json_string()).unwrap();
        for (k, v) in &original {
            if k == "target_modules" {
                continue; // a set in peft: order varies
            }
            assert_eq!(&written[k], v, "{}: {k}", file.display());
        }
        let base = peft::models::load_model(
            &fixtures().join("models/llama_tiny"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let model = get_peft_model(base, cfg, 0).unwrap();
        assert_eq!(model.adapter("default").unwrap().targets().len(), 4);
    }
}
