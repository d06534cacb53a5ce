//! `peft merge`: fold an adapter into its base model and write a model folder that
//! transformers loads (`config.json`, `model.safetensors`, and the tokenizer files).

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
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
    /// Keep the frozen base quantized: int8 (LLM.int8, outlier threshold 6), nf4 (QLoRA:
    /// blocks of 64, double quantization), nf4-nodq, fp4, fp4-nodq, or gguf (a .gguf file's own
    /// block formats, not dequantized). Output heads stay dense.
    #[arg(long)]
    pub quant: Option<String>,
}

/// Copies the tokenizer and generation files of a model folder (none for a GGUF file).
pub fn copy_side_files(model: &std::path::Path, out: &std::path::Path) -> Result<()> {
    if !model.is_dir() {
        return Ok(());
    }
    for name in SIDE_FILES {
        let src = model.join(name);
        if src.is_file() {
            std::fs::copy(&src, out.join(name))
                .with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// Merges and writes the folder.
pub fn run(args: MergeArgs) -> Result<()> {
    let dtype = super::parse_dtype(&args.dtype)?;
    if dtype.compute != dtype.matrices {
        bail!(
            "--dtype {}: a merged model is written in one dtype; use f32, bf16 or f16",
            args.dtype
        );
    }
    let mut base = super::load_base_quant(&args.model, dtype, args.quant.as_deref())?;
    let quantized = !peft::quant::quantized_layers(base.as_mut())?.is_empty();
    let model = super::with_adapters(
        base,
        &[super::AdapterArg::unnamed(args.adapter.clone())],
        false,
    )?;
    if !quantized {
        let merged = model.merge_and_unload()?;
        merged.save_pretrained(&args.out)?;
        copy_side_files(&args.model, &args.out)?;
        println!("wrote merged model to {}", args.out.display());
        return Ok(());
    }
    // Quantized base: merging re-quantizes W + BA, which changes outputs. Measure by how much
    // on a fixed probe batch before writing anything.
    let vocab = model.base_model().info().vocab_size as u32;
    let ids: Vec<u32> = (0..64u32).map(|i| (i * 7919 + 11) % vocab.max(1)).collect();
    let probe = peft::ModelInputs::from_ids(candle_core::Tensor::from_vec(
        ids,
        (2, 32),
        model.base_model().device(),
    )?);
    let before = {
        let _guard = peft::no_grad();
        model.forward(&probe)?
    };
    let mut merged = model.merge_and_unload()?;
    let after = {
        let _guard = peft::no_grad();
        merged.forward(&probe, None)?
    };
    let drift = peft::quant::merge::max_abs_diff(&before, &after)?;
    let scale = peft::quant::merge::max_abs_diff(&before, &before.zeros_like()?)?;
    eprintln!(
        "warning: the base is quantized, so the merged weights were quantized again; on a probe \
         batch of 2 x 32 tokens the logits moved by up to {drift:.4} (largest logit {scale:.2}). \
         Keep the adapter unmerged for outputs identical to training."
    );
    peft::quant::checkpoint::save_quantized_folder(merged.as_mut(), &args.out)?;
    copy_side_files(&args.model, &args.out)?;
    println!("wrote merged quantized model to {}", args.out.display());
    Ok(())
}
