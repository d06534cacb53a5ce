//! `peft-models`: training-capable model implementations for peft-rs.
//!
//! Each model mirrors its transformers counterpart (module paths, tensor names, numerics) and
//! implements [`peft_core::AdaptableModel`], exposing every linear layer and embedding as a
//! swappable slot so that any method crate can adapt it. Only differentiable ops are used, so
//! gradients reach every adapter. Models never import a method.
//!
//! Implemented: the LLaMA family ([`llama::LlamaModel`]: Llama, Mistral, Qwen2).

pub mod llama;
pub mod ops;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device};
use peft_core::{AdaptableModel, PeftError, Result};
use serde_json::Value;

pub use llama::{LlamaConfig, LlamaModel};

/// Reads `model_type` from a model folder's `config.json`.
pub fn model_type_of(dir: &Path) -> Result<String> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let map = peft_core::json::parse_object(&text, &path.display().to_string())?;
    match map.get("model_type") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(PeftError::MissingKey {
            source_name: path.display().to_string(),
            key: "model_type".into(),
            expected: format!("one of {}", supported_model_types().join(", ")),
        }),
    }
}

/// The `model_type`s this crate can load.
pub fn supported_model_types() -> Vec<&'static str> {
    llama::config::LLAMA_FAMILY.to_vec()
}

/// Loads any supported Hugging Face model folder, dispatching on `model_type`.
pub fn load_model(dir: &Path, dtype: DType, device: &Device) -> Result<Box<dyn AdaptableModel>> {
    let model_type = model_type_of(dir)?;
    if llama::config::LLAMA_FAMILY.contains(&model_type.as_str()) {
        return Ok(Box::new(LlamaModel::from_folder(dir, dtype, device)?));
    }
    Err(PeftError::config_value(
        &dir.join("config.json").display().to_string(),
        "model_type",
        format!("one of {}", supported_model_types().join(", ")),
        format!("\"{model_type}\""),
    ))
}
