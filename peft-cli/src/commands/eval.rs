//! `peft eval`: the loss and perplexity of a model (with any adapters, or none) on a data file,
//! over the same targets `peft train` learns from (all of `text`, completions only, assistant
//! turns only, an encoder-decoder's targets); for a sequence classifier, the loss and accuracy.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use super::train::DataArgs;

/// Arguments of `peft eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The base model: a folder, a .gguf file, or a hub id.
    #[arg(long)]
    pub model: String,
    /// Adapter folders, `DIR` or `NAME=DIR` (all active; an unnamed first one is `default`).
    #[arg(long)]
    pub adapter: Vec<super::AdapterArg>,
    /// Data file: .jsonl (text | prompt/completion | messages) or .csv.
    #[arg(long)]
    pub data: PathBuf,
    /// Sequences per batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Compute dtype: f32, bf16 or f16 (the whole model), or bf16-weights (frozen matrices in
    /// bf16, half their memory; f32 compute).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Keep the frozen base quantized: int8 (LLM.int8, outlier threshold 6), nf4 (QLoRA:
    /// blocks of 64, double quantization), nf4-nodq, fp4, fp4-nodq, or gguf (a .gguf file's own
    /// block formats, not dequantized). Output heads stay dense.
    #[arg(long)]
    pub quant: Option<String>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// A sequence classifier's classes, when the model folder is a bare encoder (read from the
    /// adapter's labels.json when not given).
    #[arg(long)]
    pub num_labels: Option<usize>,
    #[command(flatten)]
    pub data_args: DataArgs,
}

/// Evaluates and prints.
pub fn run(args: EvalArgs) -> Result<()> {
    let model_path = super::resolve_model(&args.model)?;
    let tok = super::load_tokenizer(&model_path, args.data_args.tokenizer.as_deref())?;
    let adapter = args.adapter.first().map(|a| a.dir.as_path());
    // A classifier trained over a bare encoder: its head's classes from --num-labels or the
    // adapter's labels.json.
    let num_labels =
        super::train::head_classes(args.num_labels, &super::adapter_dirs(&args.adapter))?;
    let base = super::load_base_head(
        &model_path,
        super::parse_dtype(&args.dtype)?,
        args.quant.as_deref(),
        num_labels.map(|n| (n, 0)),
    )?;
    let mut opts = args.data_args.options(None)?;
    opts.objective = super::train::objective(base.as_ref(), &args.data, adapter)?;
    let ds = super::train::load_sequences(&args.data, &tok, &opts)?;
    let seqs = peft::data::sequences(&ds, opts.packing, opts.max_len);
    let model = super::with_adapters(base, &args.adapter, false)?;
    let pad_id = tok
        .pad_token_id
        .or(tok.eos_token_ids.first().copied())
        .unwrap_or(0);
    let started = std::time::Instant::now();
    let e = peft::trainer::evaluate_data(&model, &seqs, args.batch_size, pad_id)?;
    let (loss, tokens) = (e.loss, e.targets);
    let secs = started.elapsed().as_secs_f64();
    match (args.json, e.accuracy) {
        (true, None) => println!(
            "{}",
            serde_json::json!({"loss": loss, "perplexity": loss.exp(), "tokens": tokens, "sequences": seqs.len(), "seconds": secs})
        ),
        (true, Some(acc)) => println!(
            "{}",
            serde_json::json!({"loss": loss, "accuracy": acc, "examples": seqs.len(), "seconds": secs})
        ),
        (false, None) => println!(
            "loss {loss:.4}  perplexity {:.3}  over {tokens} tokens in {} sequences ({secs:.1} s)",
            loss.exp(),
            seqs.len()
        ),
        (false, Some(acc)) => println!(
            "loss {loss:.4}  accuracy {acc:.4}  over {} examples ({secs:.1} s)",
            seqs.len()
        ),
    }
    Ok(())
}
