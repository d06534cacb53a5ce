//! `peft inspect ADAPTER_DIR [--model MODEL_DIR]`: an adapter's config and tensors; with a
//! model, also peft's parameter line, `get_layer_status` (one line per adapted layer) and
//! `get_model_status` (as JSON, the form of peft's `dataclasses.asdict`).

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
    /// A base model folder: also print the trainable-parameter line as peft does, the status of
    /// every adapted layer and of the model (peft's get_layer_status / get_model_status).
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
        if model
            .active_adapters()
            .iter()
            .any(|n| model.adapter(n).is_ok_and(|a| !a.is_prompt_learning()))
        {
            println!("layer status:");
            for l in model.get_layer_status()? {
                let grads: Vec<String> = l
                    .requires_grad
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str()))
                    .collect();
                println!(
                    "  {}  {}  adapters [{}]  active [{}]  merged [{}]  requires_grad {{{}}}{}",
                    l.name,
                    l.module_type,
                    l.available_adapters.join(", "),
                    l.active_adapters.join(", "),
                    l.merged_adapters.join(", "),
                    grads.join(", "),
                    l.quantization_backend
                        .map(|q| format!("  quantized {q}"))
                        .unwrap_or_default()
                );
            }
            println!("model status:");
            println!(
                "{}",
                serde_json::to_string_pretty(&model.get_model_status()?.to_json())?
            );
        }
    }
    Ok(())
}
