//! `peft generate`: continue a prompt with any adapter (or none), greedily or by sampling
//! (temperature, top-k, top-p, seed), streamed to stdout as it is decoded, stopping at the
//! model's end-of-sequence tokens or at `--stop` strings. The prompt is text (tokenised with the
//! model's tokenizer: a folder's `tokenizer.json` or the GGUF's own; `--chat` formats it with the
//! chat template) or token ids. Encoder-decoders (T5) read the prompt with the encoder and
//! generate greedily from the decoder.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;

/// Arguments of `peft generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The base model: a folder (config.json, safetensors, tokenizer.json), a .gguf file, or a
    /// hub id.
    #[arg(long)]
    pub model: String,
    /// A tokenizer.json (or folder, or .gguf) to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Format the prompt as a user message with the chat template (and open the reply).
    #[arg(long)]
    pub chat: bool,
    /// A system message for --chat.
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Sample only from the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: sample from the smallest set of tokens with this much probability.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop when the output contains this text (repeatable; the stop text is not printed).
    #[arg(long)]
    pub stop: Vec<String>,
    /// Stop after this token id, besides the end-of-sequence tokens (repeatable).
    #[arg(long)]
    pub stop_id: Vec<u32>,
    /// Adapter folders, `DIR` or `NAME=DIR` (all active; an unnamed first one is `default`).
    #[arg(long)]
    pub adapter: Vec<super::AdapterArg>,
    /// One adapter name per prompt (`__base__` for none), comma-separated: each prompt is
    /// continued with its own adapter in one batch (peft's `adapter_names=`).
    #[arg(long, value_delimiter = ',')]
    pub row_adapters: Option<Vec<String>>,
    /// The prompt text; repeat it for a batch (one output line per prompt, left-padded as
    /// transformers' `generate` does).
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Vec<String>,
    /// The prompt as comma-separated token ids (prints ids; no tokenizer needed); repeatable.
    #[arg(long)]
    pub prompt_ids: Vec<String>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Keep going past end-of-sequence tokens.
    #[arg(long)]
    pub ignore_eos: bool,
    /// Compute dtype: f32, bf16 or f16 (the whole model), or bf16-weights (frozen matrices in
    /// bf16, half their memory; f32 compute).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Keep the frozen base quantized: int8 (LLM.int8, outlier threshold 6), nf4 (QLoRA:
    /// blocks of 64, double quantization), nf4-nodq, fp4, fp4-nodq, or gguf (a .gguf file's own
    /// block formats, not dequantized). Output heads stay dense.
    #[arg(long)]
    pub quant: Option<String>,
}

/// Generates and streams the continuation.
pub fn run(args: GenerateArgs) -> Result<()> {
    let model_path = super::resolve_model(&args.model)?;
    let tokenizer = if args.prompt.is_empty() {
        None
    } else {
        Some(
            super::load_tokenizer(&model_path, args.tokenizer.as_deref())
                .context("text prompts need a tokenizer (or use --prompt-ids)")?,
        )
    };
    let mut prompts: Vec<Vec<u32>> = Vec::new();
    if let Some(tok) = &tokenizer {
        for text in &args.prompt {
            prompts.push(if args.chat {
                let mut messages = Vec::new();
                if let Some(system) = &args.system {
                    messages.push(peft::models::ChatMessage {
                        role: "system".into(),
                        content: system.clone(),
                    });
                }
                messages.push(peft::models::ChatMessage {
                    role: "user".into(),
                    content: text.clone(),
                });
                let rendered = tok.apply_chat_template(&messages, true)?;
                tok.encode(&rendered, false)?
            } else {
                tok.encode(text, true)?
            });
        }
    }
    for ids in &args.prompt_ids {
        let parsed: std::result::Result<Vec<u32>, _> =
            ids.split(',').map(|t| t.trim().parse::<u32>()).collect();
        match parsed {
            Ok(p) if !p.is_empty() => prompts.push(p),
            _ => bail!("--prompt-ids `{ids}`: expected comma-separated token ids"),
        }
    }
    if prompts.is_empty() {
        bail!("give --prompt or --prompt-ids");
    }
    if let Some(names) = &args.row_adapters {
        super::row_adapters(names, prompts.len())?;
    }
    let sampling = peft::generate::SamplingConfig {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut sampler = peft::generate::Sampler::new(sampling)?;
    let base = super::load_base_quant(
        &model_path,
        super::parse_dtype(&args.dtype)?,
        args.quant.as_deref(),
    )?;
    let model = super::with_adapters(base, &args.adapter, false)?;
    let mut stop_ids = match (&tokenizer, args.ignore_eos) {
        (_, true) => Vec::new(),
        (Some(tok), false) => tok.eos_token_ids.clone(),
        (None, false) => {
            peft::models::tokenizer::model_eos_token_ids(&model_path).unwrap_or_default()
        }
    };
    stop_ids.extend(&args.stop_id);
    if prompts.len() > 1 || args.row_adapters.is_some() {
        return generate_batch(
            &model,
            &prompts,
            tokenizer.as_ref(),
            &args,
            &stop_ids,
            &mut sampler,
        );
    }
    let prompt = prompts.swap_remove(0);
    let mut generated = Vec::new();
    let mut printed = 0;
    let mut stdout = std::io::stdout().lock();
    let stops = args.stop.clone();
    let mut on_token = |token: u32| -> peft::Result<()> {
        generated.push(token);
        match &tokenizer {
            Some(tok) => {
                let text = tok.decode(&generated, true)?;
                if let Some(pos) = stops.iter().filter_map(|s| text.find(s.as_str())).min() {
                    if pos > printed && text.is_char_boundary(printed) {
                        let _ = write!(stdout, "{}", &text[printed..pos]);
                    }
                    let _ = stdout.flush();
                    return Err(peft::PeftError::InvalidState(STOP.into()));
                }
                // Hold back what could still become a stop string or change as bytes complete.
                let hold = stops
                    .iter()
                    .map(|s| s.len().saturating_sub(1))
                    .max()
                    .unwrap_or(0);
                let mut upto = text.len().saturating_sub(hold);
                while upto > printed && !text.is_char_boundary(upto) {
                    upto -= 1;
                }
                if upto > printed
                    && text.is_char_boundary(printed)
                    && !text[printed..upto].contains('\u{FFFD}')
                {
                    let _ = write!(stdout, "{}", &text[printed..upto]);
                    printed = upto;
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
    // One loop for decoder-only and encoder-decoder models (greedy or sampled).
    let result = peft::generate::generate_with(
        &model,
        &prompt,
        args.max_new_tokens,
        &stop_ids,
        &mut sampler,
        &mut on_token,
    );
    let stopped = matches!(&result, Err(peft::PeftError::InvalidState(m)) if m == STOP);
    if !stopped {
        result.context("generating")?;
        if let Some(tok) = &tokenizer {
            let text = tok.decode(&generated, true)?;
            if text.len() > printed && text.is_char_boundary(printed) {
                write!(stdout, "{}", &text[printed..])?;
            }
        }
    }
    writeln!(stdout)?;
    Ok(())
}

const STOP: &str = "stop string reached";

/// Several prompts (or per-row adapters): one left-padded batch, one output line per prompt
/// (text up to the first stop string, or comma-separated ids).
fn generate_batch(
    model: &peft::PeftModel,
    prompts: &[Vec<u32>],
    tokenizer: Option<&peft::models::TextTokenizer>,
    args: &GenerateArgs,
    stop_ids: &[u32],
    sampler: &mut peft::generate::Sampler,
) -> Result<()> {
    let device = model.base_model().device().clone();
    let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let pad = tokenizer
        .and_then(|t| t.pad_token_id)
        .or_else(|| stop_ids.first().copied())
        .unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * width);
    let mut mask = Vec::with_capacity(prompts.len() * width);
    for p in prompts {
        let n = width - p.len();
        ids.extend(std::iter::repeat_n(pad, n).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0u32, n).chain(std::iter::repeat_n(1u32, p.len())));
    }
    let ids = candle_core::Tensor::from_vec(ids, (prompts.len(), width), &device)?;
    let mask = candle_core::Tensor::from_vec(mask, (prompts.len(), width), &device)?;
    let run = |m: &peft::PeftModel, sampler: &mut peft::generate::Sampler| {
        peft::generate::decode_batch(m, &ids, &mask, args.max_new_tokens, stop_ids, sampler)
    };
    let rows = match &args.row_adapters {
        Some(names) => {
            let mixed = model.mixed_batch(names)?;
            run(&mixed, sampler)
        }
        None => run(model, sampler),
    }
    .context("generating")?;
    let mut stdout = std::io::stdout().lock();
    for row in rows {
        match tokenizer {
            Some(tok) => {
                let row: Vec<u32> = row.into_iter().filter(|t| !stop_ids.contains(t)).collect();
                let mut text = tok.decode(&row, true)?;
                if let Some(pos) = args.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
                    text.truncate(pos);
                }
                writeln!(stdout, "{text}")?;
            }
            None => {
                let ids: Vec<String> = row.iter().map(u32::to_string).collect();
                writeln!(stdout, "{}", ids.join(","))?;
            }
        }
    }
    Ok(())
}
