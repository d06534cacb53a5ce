//! `peft-models`: training-capable model implementations for peft-rs.
//!
//! Each model mirrors its transformers counterpart (module paths, tensor names, numerics) and
//! implements [`peft_core::AdaptableModel`], exposing every linear layer and embedding as a
//! swappable slot so that any method crate can adapt it. Only differentiable ops are used, so
//! gradients reach every adapter. Models never import a method.
//!
//! Implemented: the LLaMA family ([`llama::LlamaModel`]: Llama, Mistral, Qwen2), GPT-2
//! ([`gpt2::Gpt2Model`]), T5/mT5/mT0/Flan-T5 ([`t5::T5Model`]) and BERT with its task heads
//! ([`bert::BertModel`]).

pub mod bert;
pub mod blocks;
pub mod gguf;
pub mod gpt2;
pub mod init;
#[cfg(test)]
mod kernel_tests;
pub mod llama;
pub mod ops;
pub mod t5;
pub mod tokenizer;
pub mod weights;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::{AdaptableModel, BaseLayerFactory, ModelBuilder, PeftError, Result};
use serde_json::Value;

pub use bert::{BertConfig, BertModel};
pub use gpt2::{Gpt2Config, Gpt2Model};
pub use llama::{LlamaConfig, LlamaModel};
pub use t5::{T5Config, T5Model};
pub use tokenizer::{ChatMessage, TextTokenizer};

/// The dtypes a model is built in: `compute` for its activations and its 1-D weights (norm
/// scales, biases), `matrices` for its 2-D weights (linear layers and embedding tables).
/// A plain f32/bf16/f16 model has both equal (`Precision::from(dtype)`);
/// [`Precision::bf16_matrices`] keeps the frozen matrices in bf16, half the memory, while every
/// product and activation stays f32 (the dense ops widen the weights a block at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Activations, norm scales and biases.
    pub compute: DType,
    /// Linear weights and embedding tables.
    pub matrices: DType,
}

impl Precision {
    /// bf16 matrices, f32 compute.
    pub fn bf16_matrices() -> Self {
        Precision {
            compute: DType::F32,
            matrices: DType::BF16,
        }
    }

    /// The dtype a tensor of `rank` dimensions is kept in.
    pub fn dtype_for(&self, rank: usize) -> DType {
        if rank == 2 {
            self.matrices
        } else {
            self.compute
        }
    }

    /// Parses `--dtype` values: `f32`, `bf16`, `f16` (one dtype for everything) or
    /// `bf16-weights` (bf16 matrices, f32 compute).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "f32" | "float32" => DType::F32.into(),
            "bf16" | "bfloat16" => DType::BF16.into(),
            "f16" | "float16" => DType::F16.into(),
            "bf16-weights" => Self::bf16_matrices(),
            other => {
                return Err(PeftError::bad_input(
                    "--dtype",
                    "f32, bf16, f16 or bf16-weights",
                    format!("`{other}`"),
                ))
            }
        })
    }
}

impl From<DType> for Precision {
    fn from(dtype: DType) -> Self {
        Precision {
            compute: dtype,
            matrices: dtype,
        }
    }
}

/// Reads `model_type` from a model folder's `config.json`.
pub fn model_type_of(dir: &Path) -> Result<String> {
    let (map, source) = blocks::read_config(dir)?;
    match map.get("model_type") {
        Some(Value::String(s)) => Ok(s.clone()),
        _ => Err(PeftError::MissingKey {
            source_name: source,
            key: "model_type".into(),
            expected: format!("one of {}", supported_model_types().join(", ")),
        }),
    }
}

/// The `model_type`s this crate can load.
pub fn supported_model_types() -> Vec<&'static str> {
    let mut out = llama::config::LLAMA_FAMILY.to_vec();
    out.extend(["gpt2", "t5", "mt5", "bert"]);
    out
}

/// Checks that token ids are within the vocabulary.
pub(crate) fn check_token_ids(ids: &Tensor, vocab_size: usize) -> Result<()> {
    let ids = ids.to_dtype(DType::I64)?;
    let (min, max) = (
        ids.min_all()?.to_scalar::<i64>()?,
        ids.max_all()?.to_scalar::<i64>()?,
    );
    if min < 0 || max >= vocab_size as i64 {
        return Err(PeftError::bad_input(
            "input_ids",
            format!("token ids in [0, {vocab_size})"),
            format!("ids from {min} to {max}"),
        ));
    }
    Ok(())
}

/// A model's `config.json` for saving: the original with `tie_word_embeddings` and `dtype`
/// describing the weights being written.
pub(crate) fn config_with(raw: &serde_json::Map<String, Value>, tied: bool, dtype: DType) -> Value {
    let mut raw = raw.clone();
    raw.insert("tie_word_embeddings".into(), Value::Bool(tied));
    let dtype = match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    };
    raw.remove("torch_dtype");
    raw.insert("dtype".into(), Value::from(dtype));
    Value::Object(raw)
}

/// Builds a model from its `config.json` alone, with zero-cost placeholder weights: enough to
/// list its modules, attach adapters and count parameters (`peft count`), not to run it.
pub fn shape_only_model(config_path: &Path) -> Result<Box<dyn AdaptableModel>> {
    let text = std::fs::read_to_string(config_path).map_err(|e| PeftError::io(config_path, e))?;
    let source = config_path.display().to_string();
    let map = peft_core::json::parse_object(&text, &source)?;
    let device = Device::Cpu;
    let mut src = init::shape_only_source(&device);
    let model_type = map
        .get("model_type")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    Ok(match model_type.as_str() {
        t if llama::config::LLAMA_FAMILY.contains(&t) => Box::new(LlamaModel::build(
            LlamaConfig::from_map(map, &source)?,
            ModelBuilder::new(&mut src),
            DType::F32,
            &device,
        )?),
        "gpt2" => Box::new(Gpt2Model::build(
            Gpt2Config::from_map(map, &source)?,
            ModelBuilder::new(&mut src),
            DType::F32,
            &device,
        )?),
        "t5" | "mt5" => Box::new(T5Model::build(
            T5Config::from_map(map, &source)?,
            ModelBuilder::new(&mut src),
            DType::F32,
            &device,
        )?),
        "bert" => Box::new(BertModel::build(
            BertConfig::from_map(map, &source, None)?,
            ModelBuilder::new(&mut src),
            DType::F32,
            &device,
        )?),
        other => {
            return Err(PeftError::config_value(
                &source,
                "model_type",
                format!("one of {}", supported_model_types().join(", ")),
                format!("\"{other}\""),
            ))
        }
    })
}

/// Loads any supported Hugging Face model folder (dispatching on `model_type`) or a GGUF file
/// of the LLaMA family (weights dequantized to `dtype`).
pub fn load_model(
    dir: &Path,
    dtype: impl Into<Precision>,
    device: &Device,
) -> Result<Box<dyn AdaptableModel>> {
    load_model_with(dir, dtype.into(), device, Vec::new())
}

/// A task head to build whatever architecture the checkpoint was saved with (transformers'
/// `AutoModelForSequenceClassification.from_pretrained(path, num_labels=N)`); weights the
/// checkpoint lacks are initialised as transformers does, from `seed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadSpec {
    /// The head's task (`SEQ_CLS`, `TOKEN_CLS`).
    pub task: peft_core::TaskType,
    /// Its classes.
    pub num_labels: usize,
    /// Seed of a fresh head's weights.
    pub seed: u64,
}

/// [`load_model`], asking `factories` for each base linear layer before building it dense
/// (quantized bases: `peft-quant`'s factories). Every architecture declares its layers through
/// the same builder, so every factory works with every model.
pub fn load_model_with(
    dir: &Path,
    dtype: Precision,
    device: &Device,
    factories: Vec<Box<dyn BaseLayerFactory>>,
) -> Result<Box<dyn AdaptableModel>> {
    load_model_with_head(dir, dtype, device, factories, None)
}

/// [`load_model_with`], with the task head `head` instead of the checkpoint's own.
pub fn load_model_with_head(
    dir: &Path,
    dtype: Precision,
    device: &Device,
    factories: Vec<Box<dyn BaseLayerFactory>>,
    head: Option<HeadSpec>,
) -> Result<Box<dyn AdaptableModel>> {
    if let Some(h) = head {
        let model_type = if gguf::is_gguf(dir) {
            "gguf".to_string()
        } else {
            model_type_of(dir)?
        };
        if model_type != "bert" {
            return Err(PeftError::Unsupported {
                source_name: dir.display().to_string(),
                key: "head".into(),
                value: format!("{} with {} labels", h.task, h.num_labels),
                reason: format!(
                    "classification heads are built for bert; {model_type} keeps its own head"
                ),
            });
        }
        let task = Some((h.task, h.num_labels));
        return Ok(Box::new(BertModel::from_folder_with(
            dir, task, dtype, device, h.seed, factories,
        )?));
    }
    if gguf::is_gguf(dir) {
        return Ok(Box::new(gguf::load_gguf_llama_with(
            dir, dtype, device, factories,
        )?));
    }
    let model_type = model_type_of(dir)?;
    if llama::config::LLAMA_FAMILY.contains(&model_type.as_str()) {
        return Ok(Box::new(LlamaModel::from_folder_with(
            dir, dtype, device, factories,
        )?));
    }
    if model_type == "gpt2" {
        return Ok(Box::new(Gpt2Model::from_folder_with(
            dir, dtype, device, factories,
        )?));
    }
    if model_type == "t5" || model_type == "mt5" {
        return Ok(Box::new(T5Model::from_folder_with(
            dir, dtype, device, factories,
        )?));
    }
    if model_type == "bert" {
        return Ok(Box::new(BertModel::from_folder_with(
            dir, None, dtype, device, 0, factories,
        )?));
    }
    Err(PeftError::config_value(
        &dir.join("config.json").display().to_string(),
        "model_type",
        format!("one of {}", supported_model_types().join(", ")),
        format!("\"{model_type}\""),
    ))
}
