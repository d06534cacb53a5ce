//! `peft count`: the trainable-parameter line from a model config and an adapter config alone.
//! The model is built with zero-cost placeholder weights, so counting mt0-large (1.2B
//! parameters) needs no memory for them; only the adapter's own parameters are allocated.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use peft::AdapterConfig;

/// Arguments of `peft count`.
#[derive(Debug, Args)]
pub struct CountArgs {
    /// The model's `config.json` (or a folder holding it).
    #[arg(long)]
    pub model_config: PathBuf,
    /// The adapter's `adapter_config.json` (or a folder holding it).
    #[arg(long)]
    pub adapter_config: PathBuf,
}

/// Prints peft's `print_trainable_parameters` line.
pub fn run(args: CountArgs) -> Result<()> {
    let model_config = if args.model_config.is_dir() {
        args.model_config.join("config.json")
    } else {
        args.model_config
    };
    let base = peft::models::shape_only_model(&model_config)?;
    let mut config = AdapterConfig::from_path(&args.adapter_config)?;
    // Counted as peft counts a freshly created (trainable) adapter.
    config.common.inference_mode = false;
    let model = peft::get_peft_model(base, config, 0)?;
    println!("{}", model.parameter_line());
    Ok(())
}
