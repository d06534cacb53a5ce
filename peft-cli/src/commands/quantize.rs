//! `peft quantize`: write a bitsandbytes-format quantized copy of a model folder (or GGUF
//! file) that `peft` and transformers load with its layers kept quantized.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;

/// Arguments of `peft quantize`.
#[derive(Debug, Args)]
pub struct QuantizeArgs {
    /// The f32/bf16 model folder or GGUF file.
    #[arg(long)]
    pub model: PathBuf,
    /// The scheme: int8, nf4 (QLoRA, double quantization), nf4-nodq, fp4 or fp4-nodq.
    #[arg(long)]
    pub to: String,
    /// The output folder.
    #[arg(long)]
    pub out: PathBuf,
}

/// Quantizes and writes the folder (config.json, model.safetensors, tokenizer files).
pub fn run(args: QuantizeArgs) -> Result<()> {
    let start = Instant::now();
    let model_path = super::resolve_model(&args.model.display().to_string())?;
    let mut model = super::load_base_quant(&model_path, DType::F32.into(), Some(&args.to))?;
    peft::quant::checkpoint::save_quantized_folder(model.as_mut(), &args.out)
        .with_context(|| format!("writing {}", args.out.display()))?;
    super::merge::copy_side_files(&model_path, &args.out)?;
    if peft::models::gguf::is_gguf(&model_path) {
        // The GGUF embeds its tokenizer; the folder gets it as tokenizer.json.
        peft::models::TextTokenizer::for_model(&model_path)?.save_folder(&args.out)?;
    }
    let size = std::fs::metadata(args.out.join("model.safetensors"))
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "wrote {} ({:.1} MB model.safetensors) in {:.1} s",
        args.out.display(),
        size as f64 / 1e6,
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
