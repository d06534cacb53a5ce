//! `peft`: the facade of peft-rs, parameter-efficient fine-tuning for candle, checkpoint-
//! compatible with Hugging Face's Python `peft`.
//!
//! It re-exports [`peft_core`] (configs, [`PeftModel`], checkpoints), [`peft_models`] (models
//! whose layers can be adapted) and the method crates chosen with Cargo features (`lora`,
//! `ia3`, `loha`, `lokr`, `hra`, `oft`, `vera`, `fourierft`, `miss`, `c3a`, `prompt`, `ptuning`, `prefix`; all on by default). Depending on this crate links the
//! enabled methods into the registry.
//!
//! ```no_run
//! use peft::{get_peft_model, lora::LoraConfig, models::LlamaModel, AdapterConfig, TaskType};
//! # fn main() -> peft::Result<()> {
//! let device = candle_core::Device::Cpu;
//! let base = LlamaModel::from_folder("models/llama".as_ref(), candle_core::DType::F32, &device)?;
//! let config = AdapterConfig::new(LoraConfig::new(8, 16.0).with_target_modules(["q_proj", "v_proj"]))
//!     .with_task_type(TaskType::CausalLm);
//! let model = get_peft_model(Box::new(base), config, 42)?;
//! println!("{}", model.parameter_line());
//! # Ok(()) }
//! ```

pub use peft_core::*;
pub use peft_models as models;

pub mod data;
pub mod optim;
pub mod plot;
pub mod trainer;

/// Quantized frozen bases (int8, NF4/FP4, GGUF blocks): the `peft-quant` crate.
#[cfg(feature = "quant")]
pub use peft_quant as quant;

#[cfg(feature = "quant")]
pub mod bases;

/// C3A (feature `c3a`).
#[cfg(feature = "c3a")]
pub use peft_c3a as c3a;
/// FourierFT (feature `fourierft`).
#[cfg(feature = "fourierft")]
pub use peft_fourierft as fourierft;
/// HRA (feature `hra`).
#[cfg(feature = "hra")]
pub use peft_hra as hra;
/// IA3 (feature `ia3`).
#[cfg(feature = "ia3")]
pub use peft_ia3 as ia3;
/// LoHa (feature `loha`).
#[cfg(feature = "loha")]
pub use peft_loha as loha;
/// LoKr (feature `lokr`).
#[cfg(feature = "lokr")]
pub use peft_lokr as lokr;
/// LoRA (feature `lora`).
#[cfg(feature = "lora")]
pub use peft_lora as lora;
/// MiSS (feature `miss`).
#[cfg(feature = "miss")]
pub use peft_miss as miss;
/// OFT (feature `oft`).
#[cfg(feature = "oft")]
pub use peft_oft as oft;
/// Prefix tuning (feature `prefix`).
#[cfg(feature = "prefix")]
pub use peft_prefix as prefix_tuning;
/// Prompt tuning (feature `prompt`).
#[cfg(feature = "prompt")]
pub use peft_prompt as prompt_tuning;
/// P-tuning (feature `ptuning`).
#[cfg(feature = "ptuning")]
pub use peft_ptuning as p_tuning;
/// VeRA (feature `vera`).
#[cfg(feature = "vera")]
pub use peft_vera as vera;

/// The methods linked into this build, sorted by `peft_type`.
pub fn available_methods() -> Vec<&'static str> {
    peft_core::registry::registered_types()
}
