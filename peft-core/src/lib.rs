//! `peft-core`: the method-agnostic heart of peft-rs, a Rust port of Hugging Face's `peft`
//! built on candle.
//!
//! It defines the seams every other crate hangs on:
//! - [`layers`]: swappable linear and embedding slots that models expose;
//! - [`model::AdaptableModel`]: the trait a model (in `peft-models`) implements;
//! - [`method`]: what a method crate (`peft-lora`, ...) supplies, registered by `peft_type`
//!   through [`registry`] with `inventory` (core never names a method);
//! - [`config`]: `adapter_config.json` in peft's exact form;
//! - [`targets`]: peft's target-module matching;
//! - [`peft_model::PeftModel`]: the wrapped model with named adapters, merging, counting,
//!   saving and loading in peft's checkpoint layout ([`checkpoint`]).
//!
//! ```ignore
//! let config = AdapterConfig::from_json_str(r#"{"peft_type": "LORA", "r": 8}"#, "inline")?;
//! let mut model = peft_core::get_peft_model(base, config, 0)?;
//! println!("{}", model.parameter_line());
//! let opt = candle_nn::AdamW::new_lr(model.trainable_vars(), 1e-3)?;
//! model.save_pretrained("out/".as_ref())?;
//! ```

pub mod adapted;
pub mod alloc;
pub mod checkpoint;
pub mod combine;
pub mod config;
pub mod delta;
pub mod device;
pub mod error;
pub mod generate;
pub mod grad;
mod hotswap;
mod inject;
pub mod json;
pub mod layers;
pub mod linalg;
pub mod loss;
pub mod low_rank;
pub mod method;
pub mod model;
pub mod module_tree;
pub mod nn;
pub mod peft_model;
pub mod prompt;
pub mod prompt_config;
pub mod quantizers;
pub mod recompute;
pub mod registry;
pub mod replicate;
pub mod saved_modules;
pub mod status;
pub mod targets;
pub mod tokens;
pub mod torch_rng;
pub mod training;
pub mod vars;

pub use combine::{Combination, CombinationType, CombinePart, MajoritySign};
pub use config::{AdapterConfig, CommonConfig, ConfigObject, MethodConfig, TaskType};
pub use error::{PeftError, Result};
pub use grad::{is_grad_enabled, no_grad, NoGrad};
pub use layers::{
    DenseEmbedding, DenseLinear, EmbeddingLike, EmbeddingSlot, LinearLike, LinearSlot,
};
pub use method::{
    ConvertedAdapter, EmbeddingAdapter, LayerMethod, LinearAdapter, PromptEncoder, PromptKind,
    PromptMethod, StoredPrompt, TrainedBiases,
};
pub use model::{
    AdaptableModel, KvCache, ModelCore, ModelInfo, ModelInputs, ModuleEntry, ModuleKind,
};
pub use module_tree::{
    BaseLayerFactory, EmbeddingId, LinearId, LinearRole, LinearSpec, ModelBuilder, ModuleTree,
    NormIds, ParamId, Scope, StoredTensor, WeightSource,
};
pub use peft_model::{
    get_peft_model, parameter_line, Adapter, LoadReport, MixedBatch, PeftModel, DEFAULT_ADAPTER,
};
pub use prompt_config::PromptLearningConfig;
pub use registry::{MethodRegistration, ParseFn};
pub use targets::{LayerIndices, TargetModules, TargetSpec};
pub use vars::{Init, ParamBuilder, ParamStore};

/// The fused CPU kernels and the portable-path switch (`PEFT_KERNELS=portable`).
pub use peft_kernels as kernels;

/// Re-exported so method crates can register without depending on `inventory` themselves.
pub use inventory;
/// Re-exported: the seeded generator handed to [`ParamBuilder::get_with`] initialisers.
pub use rand;

/// The version written into saved configs' `peft_version` (this crate's version).
pub const PEFT_VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), "+peft.rs");
