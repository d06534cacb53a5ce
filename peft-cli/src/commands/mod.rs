//! One module per subcommand, plus the helpers they share.

pub mod count;
pub mod demo;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod methods;

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use peft::{AdaptableModel, PeftModel};

/// Parses `--dtype`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        "f16" | "float16" => DType::F16,
        other => bail!("--dtype: expected f32, bf16 or f16, found `{other}`"),
    })
}

/// Loads a model folder or a GGUF file on the CPU.
pub fn load_base(dir: &Path, dtype: DType) -> Result<Box<dyn AdaptableModel>> {
    if !dir.is_dir() && !peft::models::gguf::is_gguf(dir) {
        bail!("{}: neither a model folder nor a GGUF file", dir.display());
    }
    Ok(peft::models::load_model(dir, dtype, &Device::Cpu)?)
}

/// Loads `adapters` onto `base` (the first as `default`, then `adapter_1`, ...) and makes them
/// all active.
pub fn with_adapters(
    base: Box<dyn AdaptableModel>,
    adapters: &[std::path::PathBuf],
    trainable: bool,
) -> Result<PeftModel> {
    let mut model = PeftModel::new(base);
    let mut names = Vec::new();
    for (i, dir) in adapters.iter().enumerate() {
        let name = if i == 0 {
            peft::DEFAULT_ADAPTER.to_string()
        } else {
            format!("adapter_{i}")
        };
        model
            .load_adapter(dir, &name, trainable)
            .with_context(|| format!("loading adapter {}", dir.display()))?;
        names.push(name);
    }
    if !names.is_empty() {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        model.set_adapters(&refs)?;
    }
    Ok(model)
}
