//! `peft train`: fine-tune an adapter on a data file with one command. The model is a folder,
//! a `.gguf` file or a hub id; the data JSONL (`text`, `prompt`/`completion`, `messages`) or CSV;
//! the adapter any registered method (LoRA r=8 on the architecture's default targets unless told
//! otherwise). Writes `adapter_config.json` + `adapter_model.safetensors`, `checkpoint-N/`
//! folders, `metrics.jsonl` and `loss.png` into `--out`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use peft::data::{self, DataOptions, Overflow};
use peft::optim::{AdamWConfig, Schedule};
use peft::trainer::{TrainConfig, Trainer};
use peft::{get_peft_model, AdapterConfig, TaskType};
use serde_json::{Map, Value};

/// Data flags shared by `train` and `eval`.
#[derive(Debug, Args, Clone)]
pub struct DataArgs {
    /// Longest sequence in tokens (the block length with --packing).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Pack sequences into --seq-len blocks instead of padding each.
    #[arg(long)]
    pub packing: bool,
    /// Cut sequences longer than --seq-len (default: an error naming the line).
    #[arg(long, conflicts_with = "skip_long")]
    pub truncate: bool,
    /// Skip (and count) sequences longer than --seq-len.
    #[arg(long)]
    pub skip_long: bool,
    /// Skip (and count) malformed records instead of failing on the first.
    #[arg(long)]
    pub skip_bad: bool,
    /// Do not append the end-of-sequence token to texts and completions.
    #[arg(long)]
    pub no_eos: bool,
    /// A tokenizer.json (or folder, or .gguf) to use instead of the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
}

impl DataArgs {
    /// The data options, checking --seq-len against the model's context.
    pub fn options(&self, max_positions: Option<usize>) -> Result<DataOptions> {
        if self.seq_len < 2 {
            bail!("--seq-len {}: need at least 2 tokens", self.seq_len);
        }
        if let Some(max) = max_positions {
            if self.seq_len > max {
                bail!(
                    "--seq-len {} is longer than the model's context of {max} positions",
                    self.seq_len
                );
            }
        }
        Ok(DataOptions {
            max_len: self.seq_len,
            packing: self.packing,
            overflow: if self.truncate {
                Overflow::Truncate
            } else if self.skip_long {
                Overflow::Skip
            } else {
                Overflow::Error
            },
            skip_bad: self.skip_bad,
            add_eos: !self.no_eos,
            objective: data::Objective::CausalLm,
        })
    }
}

/// Arguments of `peft train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    /// The base model: a folder (config.json + safetensors), a .gguf file, or a hub id.
    #[arg(long)]
    pub model: String,
    /// Training data: .jsonl (text | prompt/completion | messages) or .csv.
    #[arg(long)]
    pub data: PathBuf,
    /// Held-out data file for evaluation.
    #[arg(long, conflicts_with = "eval_fraction")]
    pub eval_data: Option<PathBuf>,
    /// Hold out this fraction of --data (seeded) for evaluation.
    #[arg(long)]
    pub eval_fraction: Option<f64>,
    /// Output folder for the adapter, checkpoints, metrics and plot.
    #[arg(long)]
    pub out: PathBuf,
    /// The method (lora, ia3, prompt_tuning, p_tuning, prefix_tuning, or any registered peft_type).
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// An adapter_config.json to start from (replaces --method and its defaults).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Adapter config fields, `key=value` (value as JSON, else a string), e.g. --set r=16.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// LoRA rank.
    #[arg(long)]
    pub lora_r: Option<usize>,
    /// LoRA alpha.
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// LoRA dropout.
    #[arg(long)]
    pub lora_dropout: Option<f64>,
    /// DoRA: weight-decomposed LoRA (`use_dora`), a trained magnitude per output feature.
    #[arg(long)]
    pub dora: bool,
    /// For an initialisation that rewrites the base weights (`--set init_lora_weights=pissa`,
    /// `pissa_niter_N`, `olora`): save the initial adapter to `<out>/initial_adapter` before
    /// training and, after it, the trained adapter converted to a plain LoRA over the original
    /// base to `<out>/converted` (peft's `path_initial_model_for_weight_conversion`).
    #[arg(long)]
    pub convert_to_lora: bool,
    /// Target modules (comma-separated names, `all-linear`, or a regex).
    #[arg(long)]
    pub target_modules: Option<String>,
    /// Optimizer steps (default: --epochs passes over the data).
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Passes over the data when --max-steps is not given.
    #[arg(long, default_value_t = 1)]
    pub epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 2e-4)]
    pub lr: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 0.0)]
    pub weight_decay: f64,
    /// Warm-up steps.
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: usize,
    /// Warm-up as a fraction of the total steps (overrides --warmup-steps).
    #[arg(long)]
    pub warmup_ratio: Option<f64>,
    /// Learning-rate schedule after warm-up: constant, linear or cosine.
    #[arg(long, default_value = "linear")]
    pub schedule: Schedule,
    /// Sequences per micro-batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Clip the gradient norm to this (0: no clipping).
    #[arg(long, default_value_t = 1.0)]
    pub max_grad_norm: f32,
    /// Seed of the adapter initialisation and the data order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Evaluate every N steps (and at the end).
    #[arg(long)]
    pub eval_every: Option<usize>,
    /// Save a checkpoint every N steps.
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Write a metrics line every N steps.
    #[arg(long, default_value_t = 1)]
    pub log_every: usize,
    /// Continue from the latest checkpoint in --out.
    #[arg(long)]
    pub resume: bool,
    /// Compute dtype: f32, bf16 or f16 (the whole model), or bf16-weights (frozen matrices in
    /// bf16, half their memory; f32 compute).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
    /// Keep the frozen base quantized: int8 (LLM.int8, outlier threshold 6), nf4 (QLoRA:
    /// blocks of 64, double quantization), nf4-nodq, fp4, fp4-nodq, or gguf (a .gguf file's own
    /// block formats, not dequantized). Output heads stay dense.
    #[arg(long)]
    pub quant: Option<String>,
    /// Recompute each block's activations in the backward pass instead of keeping them
    /// (transformers' `gradient_checkpointing`): activation memory falls to one hidden state
    /// per layer, a step costs about one more forward pass; the gradients are the same.
    #[arg(long)]
    pub gradient_checkpointing: bool,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Train a sequence classifier with this many classes: a classification head is built over
    /// the model's encoder (newly initialised unless the checkpoint has one), as
    /// `AutoModelForSequenceClassification` with `num_labels` does. For BERT folders.
    #[arg(long)]
    pub num_labels: Option<usize>,
    #[command(flatten)]
    pub data_args: DataArgs,
}

fn peft_type_of(method: &str) -> String {
    match method.to_ascii_lowercase().replace('-', "_").as_str() {
        "lora" => "LORA".into(),
        "ia3" => "IA3".into(),
        "prompt" | "prompt_tuning" => "PROMPT_TUNING".into(),
        "p_tuning" | "ptuning" => "P_TUNING".into(),
        "prefix" | "prefix_tuning" => "PREFIX_TUNING".into(),
        _ => method.to_ascii_uppercase(),
    }
}

/// The adapter config from --config, or --method with its defaults, then the flags; the task
/// type defaults to the model's (`task`).
fn adapter_config(args: &TrainArgs, task: TaskType) -> Result<AdapterConfig> {
    let mut obj: Map<String, Value> = match &args.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            match serde_json::from_str(&text)
                .with_context(|| format!("{}: invalid JSON", path.display()))?
            {
                Value::Object(o) => o,
                _ => bail!("{}: expected a JSON object", path.display()),
            }
        }
        None => {
            let peft_type = peft_type_of(&args.method);
            if !peft::available_methods().contains(&peft_type.as_str()) {
                bail!(
                    "--method {}: not a registered method; available: {}",
                    args.method,
                    peft::available_methods().join(", ")
                );
            }
            let mut o = Map::new();
            o.insert("peft_type".into(), Value::from(peft_type.clone()));
            match peft_type.as_str() {
                "LORA" => {
                    o.insert("r".into(), Value::from(8));
                    o.insert("lora_alpha".into(), Value::from(16));
                    o.insert("lora_dropout".into(), Value::from(0.05));
                }
                "PROMPT_TUNING" | "P_TUNING" | "PREFIX_TUNING" => {
                    o.insert("num_virtual_tokens".into(), Value::from(20));
                }
                _ => {}
            }
            o
        }
    };
    if let Some(r) = args.lora_r {
        obj.insert("r".into(), Value::from(r));
    }
    if let Some(a) = args.lora_alpha {
        obj.insert("lora_alpha".into(), Value::from(a));
    }
    if let Some(d) = args.lora_dropout {
        obj.insert("lora_dropout".into(), Value::from(d));
    }
    if args.dora {
        obj.insert("use_dora".into(), Value::Bool(true));
    }
    if let Some(t) = &args.target_modules {
        let value = if t.contains(',') {
            Value::from(
                t.split(',')
                    .map(|s| s.trim().to_string())
                    .collect::<Vec<_>>(),
            )
        } else if t == "all-linear" || t.chars().any(|c| "^$*+?()[]|\\.".contains(c)) {
            Value::from(t.clone())
        } else {
            Value::from(vec![t.clone()])
        };
        obj.insert("target_modules".into(), value);
    }
    for kv in &args.set {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--set {kv}: expected KEY=VALUE")
        };
        let value = serde_json::from_str(v).unwrap_or_else(|_| Value::from(v));
        obj.insert(k.trim().to_string(), value);
    }
    obj.entry("task_type")
        .or_insert_with(|| Value::from(task.as_str()));
    obj.insert("inference_mode".into(), Value::Bool(false));
    let source = args.config.as_ref().map_or_else(
        || format!("--method {}", args.method),
        |p| p.display().to_string(),
    );
    Ok(AdapterConfig::from_value(Value::Object(obj), &source)?)
}

/// Reads a data file into training sequences.
pub fn load_sequences(
    path: &Path,
    tok: &peft::models::TextTokenizer,
    opts: &DataOptions,
) -> Result<data::Dataset> {
    let ds = data::load_dataset(path, tok, opts)?;
    if ds.skipped_bad + ds.skipped_long + ds.truncated > 0 {
        eprintln!(
            "{}: {} examples; skipped {} malformed and {} too long; truncated {}",
            path.display(),
            ds.examples.len(),
            ds.skipped_bad,
            ds.skipped_long,
            ds.truncated
        );
    }
    Ok(ds)
}

/// The file `peft train` writes beside a classifier's adapter: the class names as transformers
/// keeps them in a config (`id2label`, `label2id`), read back by `peft eval`.
pub const LABELS_NAME: &str = "labels.json";

fn write_labels(out: &Path, labels: &[String]) -> Result<()> {
    let id2label: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), Value::from(l.clone())))
        .collect();
    let label2id: Map<String, Value> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (l.clone(), Value::from(i)))
        .collect();
    let text = serde_json::to_string_pretty(
        &serde_json::json!({"id2label": id2label, "label2id": label2id}),
    )?;
    peft::checkpoint::write_atomic(&out.join(LABELS_NAME), text.as_bytes())?;
    Ok(())
}

/// The classes of a classifier head to build over a bare encoder when loading with adapters:
/// `--num-labels`, else the count in the first adapter's `labels.json`, else none.
pub fn head_classes(num_labels: Option<usize>, adapters: &[PathBuf]) -> Result<Option<usize>> {
    match num_labels {
        Some(n) => Ok(Some(n)),
        None => Ok(read_labels(adapters.first().map(PathBuf::as_path))?.map(|l| l.len())),
    }
}

/// The class names in `adapter`'s `labels.json` (its `id2label`, index order), if it has one.
fn read_labels(adapter: Option<&Path>) -> Result<Option<Vec<String>>> {
    let Some(path) = adapter.map(|a| a.join(LABELS_NAME)).filter(|p| p.is_file()) else {
        return Ok(None);
    };
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{}: invalid JSON", path.display()))?;
    let id2label = v.get("id2label");
    let n = id2label.and_then(Value::as_object).map_or(0, Map::len);
    match id2label
        .and_then(|m| names_of(m, n))
        .filter(|l| !l.is_empty())
    {
        Some(labels) => Ok(Some(labels)),
        None => bail!(
            "{}: expected an `id2label` object naming classes \"0\" to \"N-1\"",
            path.display()
        ),
    }
}

/// Class names from an `id2label` object (`{"0": "neg", "1": "pos"}`), in index order.
fn names_of(id2label: &Value, n: usize) -> Option<Vec<String>> {
    let map = id2label.as_object()?;
    (0..n)
        .map(|i| {
            map.get(&i.to_string())
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .collect()
}

/// What the model trains on, from its head: an encoder-decoder trains seq2seq, a sequence
/// classifier on labelled texts (class names from `adapter`'s `labels.json`, else the model
/// config's `id2label` when it names the classes, else the distinct string labels of `data`,
/// sorted), anything else as a causal LM.
pub fn objective(
    base: &dyn peft::AdaptableModel,
    data_path: &Path,
    adapter: Option<&Path>,
) -> Result<data::Objective> {
    let info = base.info();
    if info.is_encoder_decoder {
        return Ok(data::Objective::Seq2Seq);
    }
    match info.task_type {
        TaskType::CausalLm => return Ok(data::Objective::CausalLm),
        TaskType::SeqCls => {}
        TaskType::FeatureExtraction => bail!(
            "{} ({}) has no classification head: pass --num-labels N to train a sequence classifier over it",
            info.name_or_path.clone().unwrap_or_default(),
            info.architecture
        ),
        other => bail!(
            "{} ({}, {}): peft train and eval take causal LMs, encoder-decoders and sequence classifiers",
            info.name_or_path.clone().unwrap_or_default(),
            info.architecture,
            other.as_str()
        ),
    }
    let n = info.num_labels.unwrap_or(0);
    if let Some(labels) = read_labels(adapter)? {
        if labels.len() != n {
            bail!(
                "{}: {LABELS_NAME} names {} classes, but the model's head has {n}",
                adapter.map_or_else(String::new, |a| a.display().to_string()),
                labels.len()
            );
        }
        return Ok(data::Objective::Classification { labels });
    }
    let configured = base
        .config_json()
        .get("id2label")
        .and_then(|m| names_of(m, n));
    let generic: Vec<String> = (0..n).map(|i| format!("LABEL_{i}")).collect();
    if let Some(labels) = configured.filter(|l| *l != generic) {
        return Ok(data::Objective::Classification { labels });
    }
    let (records, _) = data::read_records(data_path, true)?;
    let mut names: Vec<String> = records
        .iter()
        .filter_map(|(_, r)| match r {
            data::Record::Labeled(_, data::Label::Name(s)) => Some(s.clone()),
            _ => None,
        })
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return Ok(data::Objective::Classification { labels: generic });
    }
    if names.len() != n {
        bail!(
            "{}: {} distinct labels {names:?}, but the model's head has {n} classes",
            data_path.display(),
            names.len()
        );
    }
    Ok(data::Objective::Classification { labels: names })
}

/// Trains and reports.
pub fn run(args: TrainArgs) -> Result<()> {
    let model_path = super::resolve_model(&args.model)?;
    let tok = super::load_tokenizer(&model_path, args.data_args.tokenizer.as_deref())?;
    let base = super::load_base_head(
        &model_path,
        super::parse_dtype(&args.dtype)?,
        args.quant.as_deref(),
        args.num_labels.map(|n| (n, args.seed)),
    )?;
    let config = adapter_config(&args, base.info().task_type)?;
    let mut opts = args.data_args.options(None)?;
    opts.objective = objective(base.as_ref(), &args.data, None)?;
    if opts.packing && opts.objective != data::Objective::CausalLm {
        bail!(
            "--packing packs causal-LM sequences; {} is {}",
            model_path.display(),
            base.info().architecture
        );
    }
    let train_ds = load_sequences(&args.data, &tok, &opts)?;
    let (train_ds, eval_ds) = match (&args.eval_data, args.eval_fraction) {
        (Some(path), _) => (train_ds, Some(load_sequences(path, &tok, &opts)?)),
        (None, Some(f)) if f > 0.0 => {
            let (t, e) = train_ds.split(f, args.seed)?;
            (t, Some(e).filter(|e| !e.examples.is_empty()))
        }
        _ => (train_ds, None),
    };
    let pad_id = tok
        .pad_token_id
        .or(tok.eos_token_ids.first().copied())
        .unwrap_or(0);
    let train = data::sequences(&train_ds, opts.packing, opts.max_len);
    let eval = eval_ds.map(|e| data::sequences(&e, opts.packing, opts.max_len));
    let mut model = get_peft_model(base, config, args.seed)?;
    model.set_gradient_checkpointing(args.gradient_checkpointing)?;
    eprintln!("{}", model.parameter_line());
    let initial_dir = args.out.join("initial_adapter");
    if args.convert_to_lora {
        // The fresh adapter (the same on a resumed run: the initialisation is seeded).
        model.save_adapter("default", &initial_dir)?;
    }
    eprintln!(
        "train: {} sequences ({} target tokens){}",
        train.len(),
        train
            .iter()
            .map(data::Example::target_tokens)
            .sum::<usize>(),
        eval.as_ref()
            .map(|e| format!("; eval: {} sequences", e.len()))
            .unwrap_or_default()
    );
    let mut cfg = TrainConfig {
        lr: args.lr,
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..Default::default()
        },
        warmup_steps: args.warmup_steps,
        schedule: args.schedule,
        max_steps: args.max_steps,
        epochs: args.epochs,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        max_grad_norm: (args.max_grad_norm > 0.0).then_some(args.max_grad_norm),
        seed: args.seed,
        eval_every: args.eval_every,
        save_every: args.save_every,
        log_every: args.log_every,
        pad_id,
        progress: !args.no_progress,
    };
    if let Some(ratio) = args.warmup_ratio {
        cfg.warmup_steps = (ratio * cfg.total_steps(train.len()) as f64).ceil() as usize;
    }
    let report = Trainer::new(&model, cfg, train, eval, &args.out)?.run(args.resume)?;
    if let data::Objective::Classification { labels } = &opts.objective {
        write_labels(&args.out, labels)?;
    }
    let secs = report.seconds.max(1e-9);
    println!(
        "trained steps {}..{} in {:.1} s ({:.0} tokens/s); last loss {:.4}{}",
        report.resumed_from,
        report.final_step,
        report.seconds,
        report.tokens as f64 / secs,
        report.last_loss,
        report
            .eval_loss
            .map(|l| format!("; eval loss {l:.4}, perplexity {:.3}", l.exp()))
            .unwrap_or_default()
    );
    println!("adapter written to {}", args.out.display());
    if args.convert_to_lora {
        let converted = args.out.join("converted");
        model.save_adapter_converted("default", &converted, &initial_dir)?;
        println!(
            "converted to a plain LoRA over the original base: {}",
            converted.display()
        );
    }
    if let Some(mb) = peft::alloc::peak_rss_mb() {
        println!("peak resident memory {mb:.0} MB");
    }
    Ok(())
}
