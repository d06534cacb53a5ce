//! `peft merge`: fold an adapter into its base model and write a model folder that
//! transformers loads (`config.json`, `model.safetensors`, and the tokenizer files).

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;

/// Files copied from the base folder when present.
const SIDE_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
];

/// Arguments of `peft merge`.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The base model folder.
    #[arg(long)]
    pub model: PathBuf,
    /// The adapter folder.
    #[arg(long)]
    pub adapter: PathBuf,
    /// The output model folder.
    #[arg(long)]
    pub out: PathBuf,
    /// Dtype of the merged weights: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// Merges and writes the folder.
pub fn run(args: MergeArgs) -> Result<()> {
    let dtype = super::parse_dtype(&args.dtype)?;
    let base = super::load_base(&args.model, dtype)?;
    let model = super::with_adapters(base, std::slice::from_ref(&args.adapter), false)?;
    let merged = model.merge_and_unload()?;
    merged.save_pretrained(&args.out)?;
    for name in SIDE_FILES {
        let src = args.model.join(name);
        if src.is_file() {
            std::fs::copy(&src, args.out.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    println!("wrote merged model to {}", args.out.display());
    Ok(())
}
