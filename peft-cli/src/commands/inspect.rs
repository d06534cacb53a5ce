//! `peft inspect ADAPTER_DIR [--model MODEL_DIR]`: an adapter's config and tensors.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::Device;
use clap::Args;
use peft::{checkpoint, AdapterConfig};

/// Arguments of `peft inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The adapter folder (adapter_config.json + adapter_model.safetensors).
    pub adapter: PathBuf,
    /// A base model folder: also print the trainable-parameter line as peft does.
    #[arg(long)]
    pub model: Option<PathBuf>,
}

/// Prints the config (in peft's form), then the tensors, then optionally the parameter line.
pub fn run(args: InspectArgs) -> Result<()> {
    let config = AdapterConfig::from_path(&args.adapter)?;
    println!("{}", config.to_json_string());
    let weights = checkpoint::adapter_weights_file(&args.adapter)?;
    let tensors = checkpoint::read_adapter_weights(&weights, &Device::Cpu)?;
    let total: usize = tensors.iter().map(|(_, t)| t.elem_count()).sum();
    let bytes = std::fs::metadata(&weights).map(|m| m.len()).unwrap_or(0);
    println!(
        "{} ({} tensors, {} values, {} bytes)",
        weights.display(),
        tensors.len(),
        total,
        bytes
    );
    for (name, t) in &tensors {
        println!("  {name}  {:?}  {:?}", t.dtype(), t.dims());
    }
    if let Some(model_dir) = &args.model {
        let base = super::load_base(model_dir, candle_core::DType::F32)?;
        let model = super::with_adapters(
            base,
            &[super::AdapterArg::unnamed(args.adapter.clone())],
            true,
        )
        .with_context(|| format!("applying the adapter to {}", model_dir.display()))?;
        println!("{}", model.parameter_line());
    }
    Ok(())
}
