//! `peft logits`: the parity interface. Reads `input_ids` (I64 `[B, T]`) and the optional
//! `attention_mask`, `token_type_ids` (BERT) and `decoder_input_ids` (T5) from a safetensors
//! file and writes the model's output (F32) as the Hugging Face model's forward returns it:
//! `logits` (`[B, T, V]` for language models, `[B, num_labels]` or `[B, T, num_labels]` for
//! classifiers) or `last_hidden_state` for feature extraction.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use peft::{checkpoint, ModelInputs};

/// Arguments of `peft logits`.
#[derive(Debug, Args)]
pub struct LogitsArgs {
    /// The base model folder (config.json + safetensors).
    #[arg(long)]
    pub model: PathBuf,
    /// Adapter folders, `DIR` or `NAME=DIR`; all are loaded and active together (an unnamed
    /// first one is `default`, later unnamed ones `adapter_1`, ...).
    #[arg(long)]
    pub adapter: Vec<super::AdapterArg>,
    /// One adapter name per batch row (`__base__` for none): each row runs its own adapter
    /// (peft's `adapter_names=`).
    #[arg(long, value_delimiter = ',')]
    pub row_adapters: Option<Vec<String>>,
    /// Merge the adapters into the base weights before running.
    #[arg(long)]
    pub merge: bool,
    /// Input safetensors holding `input_ids` and optionally `attention_mask`.
    #[arg(long)]
    pub input: PathBuf,
    /// Output safetensors; receives `logits` (F32).
    #[arg(long)]
    pub out: PathBuf,
    /// Compute dtype: f32, bf16 or f16 (the whole model), or bf16-weights (frozen matrices in
    /// bf16, half their memory; f32 compute).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Keep the frozen base quantized: int8 (LLM.int8, outlier threshold 6), nf4 (QLoRA:
    /// blocks of 64, double quantization), nf4-nodq, fp4, fp4-nodq, or gguf (a .gguf file's own
    /// block formats, not dequantized). Output heads stay dense.
    #[arg(long)]
    pub quant: Option<String>,
    /// A sequence classifier's classes, when the model folder is a bare encoder (read from the
    /// first adapter's labels.json when not given).
    #[arg(long)]
    pub num_labels: Option<usize>,
}

fn integer_2d(name: &str, t: &Tensor, file: &std::path::Path) -> Result<Tensor> {
    if !matches!(
        t.dtype(),
        DType::I64 | DType::U32 | DType::U8 | DType::I32 | DType::I16
    ) {
        bail!(
            "{}: `{name}`: expected an integer tensor, found {:?}",
            file.display(),
            t.dtype()
        );
    }
    if t.rank() != 2 {
        bail!(
            "{}: `{name}`: expected shape [batch, seq_len], found {:?}",
            file.display(),
            t.dims()
        );
    }
    Ok(t.to_dtype(DType::I64)?)
}

/// Runs the model and writes the logits.
pub fn run(args: LogitsArgs) -> Result<()> {
    let dtype = super::parse_dtype(&args.dtype)?;
    let tensors = checkpoint::read_safetensors(&args.input, super::device())?;
    let find = |name: &str| {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
    };
    let Some(ids) = find("input_ids") else {
        let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
        bail!(
            "{}: missing tensor `input_ids` (I64 [batch, seq_len]); found {names:?}",
            args.input.display()
        );
    };
    let ids = integer_2d("input_ids", &ids, &args.input)?;
    let mask = match find("attention_mask") {
        Some(m) => {
            let m = integer_2d("attention_mask", &m, &args.input)?;
            if m.dims() != ids.dims() {
                bail!(
                    "{}: `attention_mask`: expected shape {:?} like input_ids, found {:?}",
                    args.input.display(),
                    ids.dims(),
                    m.dims()
                );
            }
            Some(m)
        }
        None => None,
    };
    let num_labels =
        super::train::head_classes(args.num_labels, &super::adapter_dirs(&args.adapter))?;
    let base = super::load_base_head(
        &args.model,
        dtype,
        args.quant.as_deref(),
        num_labels.map(|n| (n, 0)),
    )?;
    let optional = |name: &str| -> Result<Option<Tensor>> {
        find(name)
            .map(|t| integer_2d(name, &t, &args.input))
            .transpose()
    };
    let decoder_input_ids = optional("decoder_input_ids")?;
    if decoder_input_ids.is_some() != base.info().is_encoder_decoder {
        bail!(
            "{}: {} is {}, so `decoder_input_ids` must be {}",
            args.input.display(),
            args.model.display(),
            if base.info().is_encoder_decoder {
                "an encoder-decoder"
            } else {
                "decoder-only or an encoder"
            },
            if base.info().is_encoder_decoder {
                "given"
            } else {
                "absent"
            },
        );
    }
    let output_name = if base.info().task_type == peft::TaskType::FeatureExtraction {
        "last_hidden_state"
    } else {
        "logits"
    };
    let mut model = super::with_adapters(base, &args.adapter, false)?;
    if args.merge {
        if args.adapter.is_empty() {
            bail!("--merge needs at least one --adapter");
        }
        model.merge_adapter()?;
    }
    let inputs = ModelInputs {
        input_ids: Some(ids),
        attention_mask: mask,
        token_type_ids: optional("token_type_ids")?,
        decoder_input_ids,
        decoder_attention_mask: optional("decoder_attention_mask")?,
        ..Default::default()
    };
    let output = match &args.row_adapters {
        Some(names) => {
            super::row_adapters(names, inputs.batch_and_len()?.0)?;
            let mixed = model.mixed_batch(names)?;
            mixed.forward(&inputs)?
        }
        None => model.forward(&inputs)?,
    }
    .to_dtype(DType::F32)?;
    checkpoint::write_safetensors(&args.out, &[(output_name.to_string(), output.clone())])?;
    println!(
        "wrote {output_name} {:?} to {}",
        output.dims(),
        args.out.display()
    );
    Ok(())
}
