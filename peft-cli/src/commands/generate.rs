//! `peft generate`: greedy continuation of a prompt with any adapter (or none), streamed to
//! stdout as it is decoded. The prompt is text (tokenised with the model folder's
//! `tokenizer.json`) or token ids. Encoder-decoders (T5) read the prompt with the encoder and
//! generate from the decoder.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use clap::Args;

/// Arguments of `peft generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The base model folder (config.json, safetensors, and tokenizer.json for text prompts).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folders (all active; the first is `default`).
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// The prompt text.
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// The prompt as comma-separated token ids (prints ids; no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
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
        let Ok(text) = std::fs::read_to_string(dir.join(file)) else {
            continue;
        };
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else {
            continue;
        };
        match value.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => {
                return n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => {
                return a
                    .iter()
                    .filter_map(|v| v.as_u64())
                    .map(|v| v as u32)
                    .collect()
            }
            _ => {}
        }
    }
    Vec::new()
}

/// Generates and streams the continuation.
pub fn run(args: GenerateArgs) -> Result<()> {
    let tokenizer = match &args.prompt {
        Some(_) => {
            let file = args.model.join("tokenizer.json");
            if !file.is_file() {
                bail!(
                    "{}: no tokenizer.json in the model folder (use --prompt-ids)",
                    args.model.display()
                );
            }
            Some(
                tokenizers::Tokenizer::from_file(&file)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?,
            )
        }
        None => None,
    };
    let prompt: Vec<u32> = match (&args.prompt, &args.prompt_ids, &tokenizer) {
        (Some(text), _, Some(tok)) => tok
            .encode(text.as_str(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
            .get_ids()
            .to_vec(),
        (_, Some(ids), _) => ids.clone(),
        _ => bail!("give --prompt or --prompt-ids"),
    };
    let base = super::load_base(&args.model, super::parse_dtype(&args.dtype)?)?;
    let seq2seq = base.info().is_encoder_decoder;
    let model = super::with_adapters(base, &args.adapter, false)?;
    let stop = if args.ignore_eos {
        Vec::new()
    } else {
        eos_tokens(&args.model)
    };
    let mut generated = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    let mut on_token = |token: u32| -> peft::Result<()> {
        generated.push(token);
        match &tokenizer {
            Some(tok) => {
                let text = tok
                    .decode(&generated, true)
                    .map_err(|e| peft::PeftError::InvalidState(e.to_string()))?;
                // Print only what became final: the decoded text can change at its end.
                if text.len() > printed && text.is_char_boundary(printed) {
                    let _ = write!(stdout, "{}", &text[printed..]);
                    printed = text.len();
                }
            }
            None => {
                let _ = write!(
                    stdout,
                    "{}{token}",
                    if generated.len() > 1 { "," } else { "" }
                );
            }
        }
        let _ = stdout.flush();
        Ok(())
    };
    if seq2seq {
        let ids = Tensor::new(prompt.as_slice(), &Device::Cpu)?.unsqueeze(0)?;
        peft::generate::greedy_generate_seq2seq(
            &model,
            &ids,
            None,
            args.max_new_tokens,
            &stop,
            &mut on_token,
        )
    } else {
        peft::generate::greedy_generate_with(
            &model,
            &prompt,
            args.max_new_tokens,
            &stop,
            &mut on_token,
        )
    }
    .context("generating")?;
    writeln!(stdout)?;
    Ok(())
}
