//! `peft generate`: greedy continuation of a text prompt with any adapter (or none), streamed
//! to stdout as it is decoded. The tokenizer is the model folder's `tokenizer.json`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `peft generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The base model folder (config.json, safetensors, tokenizer.json).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folders (all active; the first is `default`).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Compute dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

/// `eos_token_id` from `generation_config.json` or `config.json` (an id or a list).
fn eos_tokens(dir: &Path) -> Vec<u32> {
    for file in ["generation_config.json", "config.json"] {
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else { continue };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
        match value.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => return n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(serde_json::Value::Array(a)) => return a.iter().filter_map(|v| v.as_u64()).map(|v| v as u32).collect(),
            _ => {}
        }
    }
    Vec::new()
}

/// Generates and streams the continuation.
pub fn run(args: GenerateArgs) -> Result<()> {
    let tokenizer_file = args.model.join("tokenizer.json");
    if !tokenizer_file.is_file() {
        bail!("{}: no tokenizer.json in the model folder", args.model.display());
    }
    let tokenizer = tokenizers::Tokenizer::from_file(&tokenizer_file)
        .map_err(|e| anyhow::anyhow!("{}: {e}", tokenizer_file.display()))?;
    let prompt = tokenizer.encode(args.prompt.as_str(), true).map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let base = super::load_base(&args.model, super::parse_dtype(&args.dtype)?)?;
    let model = super::with_adapters(base, &args.adapter, false)?;
    let stop = if args.ignore_eos { Vec::new() } else { eos_tokens(&args.model) };
    let mut generated = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    peft::generate::greedy_generate_with(&model, prompt.get_ids(), args.max_new_tokens, &stop, &mut |token| {
        generated.push(token);
        let text = tokenizer.decode(&generated, true).map_err(|e| peft::PeftError::InvalidState(e.to_string()))?;
        // Print only what became final: the decoded text can change at its end.
        if text.len() > printed && text.is_char_boundary(printed) {
            let _ = write!(stdout, "{}", &text[printed..]);
            let _ = stdout.flush();
            printed = text.len();
        }
        Ok(())
    })
    .context("generating")?;
    writeln!(stdout)?;
    Ok(())
}
