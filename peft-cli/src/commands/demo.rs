//! `peft demo`: the README's main job, fully offline. It builds a small model with seeded
//! random weights (LLaMA-style by default; `--model-type` picks GPT-2, T5 or BERT), fine-tunes
//! an adapter (LoRA by default; `--method` picks any other) on an embedded character-level
//! task, prints the parameter line and the falling loss, saves the adapter, reloads it onto a
//! fresh copy of the base and checks the outputs are identical, then (for methods with weights
//! to merge) merges in memory and into a saved model folder and checks again. Any failed check
//! is an error.
//!
//! Tasks: language modelling of the text (LLaMA, GPT-2), copying a window of it through the
//! encoder and decoder (T5), and telling which line a window comes from (BERT, sequence
//! classification).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Args;
use peft::models::{
    BertConfig, BertModel, Gpt2Config, Gpt2Model, LlamaConfig, LlamaModel, T5Config, T5Model,
};
use peft::training::{train_step, Batch, CausalLmBatch, ClassificationBatch, Seq2SeqBatch};
use peft::{get_peft_model, AdaptableModel, AdapterConfig, ModelInputs, PeftModel, TaskType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// The embedded training text.
const CORPUS: &str = "\
a frozen model keeps its weights; a small adapter learns the task.
low rank updates are cheap to train and cheap to store.
the adapter is saved in a few kilobytes and loads on the same base.
merge the adapter and the model runs as fast as before.
train the adapter, save the adapter, load the adapter, merge the adapter.
many tasks can share one base model, each with its own adapter.
";

const WINDOW: usize = 32;

/// Arguments of `peft demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Where to write the adapter and the merged model (default: a temporary folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Training steps.
    #[arg(long, default_value_t = 150)]
    pub steps: usize,
    /// Seed for the base model, the adapter and the batches.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Method to demonstrate: lora, ia3, loha, lokr, hra, oft, vera, fourierft, miss, c3a, prompt, p_tuning or prefix.
    #[arg(long, default_value = "lora")]
    pub method: String,
    /// Model to demonstrate on: llama, gpt2, t5 (sequence-to-sequence) or bert (classification).
    #[arg(long, default_value = "llama")]
    pub model_type: String,
}

/// Characters as token ids; id 0 is reserved (padding, decoder start).
struct Vocab {
    chars: Vec<char>,
}

impl Vocab {
    fn new(text: &str) -> Self {
        let mut chars: Vec<char> = text.chars().collect();
        chars.sort_unstable();
        chars.dedup();
        Vocab { chars }
    }
    fn size(&self) -> usize {
        self.chars.len() + 1
    }
    fn encode(&self, text: &str) -> Vec<u32> {
        text.chars()
            .filter_map(|c| self.chars.iter().position(|x| *x == c))
            .map(|i| i as u32 + 1)
            .collect()
    }
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter()
            .filter_map(|i| i.checked_sub(1).and_then(|i| self.chars.get(i as usize)))
            .collect()
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Llama,
    Gpt2,
    T5,
    Bert,
}

impl Kind {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "llama" => Kind::Llama,
            "gpt2" => Kind::Gpt2,
            "t5" => Kind::T5,
            "bert" => Kind::Bert,
            other => bail!("--model-type {other}: expected llama, gpt2, t5 or bert"),
        })
    }

    fn task(self) -> TaskType {
        match self {
            Kind::Llama | Kind::Gpt2 => TaskType::CausalLm,
            Kind::T5 => TaskType::Seq2SeqLm,
            Kind::Bert => TaskType::SeqCls,
        }
    }
}

fn base_model(
    kind: Kind,
    vocab: usize,
    labels: usize,
    seed: u64,
) -> Result<Box<dyn AdaptableModel>> {
    let device = Device::Cpu;
    let map = |v: serde_json::Value| v.as_object().cloned().unwrap_or_default();
    Ok(match kind {
        Kind::Llama => {
            let mut cfg = LlamaConfig::tiny(vocab, 64, 2, 4, 2, 128);
            cfg.initializer_range = 0.1;
            Box::new(LlamaModel::random(cfg, seed, DType::F32, &device)?)
        }
        Kind::Gpt2 => {
            let cfg = map(
                json!({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": vocab,
                "n_positions": 128, "initializer_range": 0.1}),
            );
            Box::new(Gpt2Model::random(
                Gpt2Config::from_map(cfg, "demo")?,
                seed,
                DType::F32,
                &device,
            )?)
        }
        Kind::T5 => {
            let cfg = map(
                json!({"model_type": "t5", "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                "num_heads": 4, "vocab_size": vocab, "relative_attention_num_buckets": 16,
                "relative_attention_max_distance": 64, "decoder_start_token_id": 0, "feed_forward_proj": "relu",
                "tie_word_embeddings": false, "initializer_range": 0.2}),
            );
            Box::new(T5Model::random(
                T5Config::from_map(cfg, "demo")?,
                seed,
                DType::F32,
                &device,
            )?)
        }
        Kind::Bert => {
            let cfg = map(
                json!({"model_type": "bert", "architectures": ["BertForSequenceClassification"],
                "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
                "vocab_size": vocab, "max_position_embeddings": 128, "num_labels": labels, "initializer_range": 0.1}),
            );
            Box::new(BertModel::random(
                BertConfig::from_map(cfg, "demo", None)?,
                seed,
                DType::F32,
                &device,
            )?)
        }
    })
}

/// The demo's adapter config and learning rate for `method`, and whether it can be merged.
fn method_config(method: &str, task: TaskType) -> Result<(AdapterConfig, f64, bool)> {
    let (json, lr, mergeable) = match method {
        "lora" => (
            r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}"#,
            1e-2,
            true,
        ),
        "ia3" => (r#"{"peft_type": "IA3"}"#, 5e-2, true),
        "loha" => (
            r#"{"peft_type": "LOHA", "r": 8, "alpha": 16, "target_modules": "all-linear"}"#,
            1e-2,
            true,
        ),
        "lokr" => (
            r#"{"peft_type": "LOKR", "r": 8, "alpha": 16, "target_modules": "all-linear"}"#,
            1e-2,
            true,
        ),
        "hra" => (
            r#"{"peft_type": "HRA", "r": 8, "target_modules": "all-linear"}"#,
            1e-2,
            true,
        ),
        "oft" => (
            r#"{"peft_type": "OFT", "oft_block_size": 16, "target_modules": "all-linear"}"#,
            1e-2,
            true,
        ),
        "vera" => (
            r#"{"peft_type": "VERA", "r": 64, "target_modules": "all-linear"}"#,
            2e-2,
            true,
        ),
        "fourierft" => (
            r#"{"peft_type": "FOURIERFT", "n_frequency": 200, "init_weights": true, "target_modules": "all-linear"}"#,
            5e-2,
            true,
        ),
        "miss" => (
            r#"{"peft_type": "MISS", "r": 16, "target_modules": "all-linear"}"#,
            1e-2,
            true,
        ),
        "c3a" => (
            r#"{"peft_type": "C3A", "block_size": 16, "init_weights": true, "target_modules": "all-linear"}"#,
            1e-1,
            true,
        ),
        "prompt" | "prompt_tuning" => (
            r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 16}"#,
            5e-2,
            false,
        ),
        "p_tuning" | "ptuning" => (
            r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 16, "encoder_hidden_size": 64}"#,
            1e-2,
            false,
        ),
        "prefix" | "prefix_tuning" => (
            r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 16}"#,
            3e-2,
            false,
        ),
        other => bail!(
            "--method {other}: expected one of lora, ia3, loha, lokr, hra, oft, vera, fourierft, miss, c3a, prompt, p_tuning, prefix"
        ),
    };
    let config = AdapterConfig::from_json_str(json, "demo config")
        .with_context(|| {
            format!("the {method} method is not linked into this build (see `peft methods`)")
        })?
        .with_task_type(task);
    Ok((config, lr, mergeable))
}

/// Draws a batch of the demo task for `kind`.
fn batch(
    kind: Kind,
    lines: &[Vec<u32>],
    tokens: &[u32],
    n: usize,
    rng: &mut StdRng,
) -> Result<Batch> {
    let dev = Device::Cpu;
    let window = |len: usize, rng: &mut StdRng| -> Vec<u32> {
        let start = rng.random_range(0..tokens.len() - len);
        tokens[start..start + len].to_vec()
    };
    Ok(match kind {
        Kind::Llama | Kind::Gpt2 => {
            let data: Vec<u32> = (0..n).flat_map(|_| window(2 * WINDOW, rng)).collect();
            Batch::CausalLm(CausalLmBatch::from_ids(
                Tensor::from_vec(data, (n, 2 * WINDOW), &dev)?,
                None,
            )?)
        }
        Kind::T5 => {
            let (mut src, mut tgt) = (Vec::new(), Vec::new());
            for _ in 0..n {
                let w = window(WINDOW, rng);
                src.extend_from_slice(&w);
                tgt.extend(w.iter().map(|&t| i64::from(t)));
            }
            Batch::Seq2Seq(Seq2SeqBatch {
                input_ids: Tensor::from_vec(src, (n, WINDOW), &dev)?,
                attention_mask: None,
                labels: Tensor::from_vec(tgt, (n, WINDOW), &dev)?,
            })
        }
        Kind::Bert => {
            let (mut ids, mut labels) = (Vec::new(), Vec::new());
            for _ in 0..n {
                let label = rng.random_range(0..lines.len());
                let line = &lines[label];
                let start = rng.random_range(0..line.len() - WINDOW);
                ids.extend_from_slice(&line[start..start + WINDOW]);
                labels.push(label as i64);
            }
            Batch::Classification(ClassificationBatch {
                input_ids: Tensor::from_vec(ids, (n, WINDOW), &dev)?,
                attention_mask: None,
                labels: Tensor::from_vec(labels, n, &dev)?,
            })
        }
    })
}

fn model_inputs(batch: &Batch, start: Option<u32>) -> Result<ModelInputs> {
    Ok(match batch {
        Batch::CausalLm(b) => ModelInputs::from_ids(b.input_ids.clone()),
        Batch::Classification(b) => ModelInputs::from_ids(b.input_ids.clone()),
        Batch::Seq2Seq(b) => ModelInputs {
            input_ids: Some(b.input_ids.clone()),
            decoder_input_ids: Some(peft::training::shift_right(
                &b.labels,
                start.unwrap_or(0),
                0,
            )?),
            ..Default::default()
        },
    })
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// A short qualitative look at the model: a continuation, or the accuracy of a batch.
fn sample(kind: Kind, model: &PeftModel, vocab: &Vocab, eval: &Batch) -> Result<String> {
    let prompt = "train the adapter, ";
    Ok(match (kind, eval) {
        (Kind::Llama | Kind::Gpt2, _) => {
            let out = peft::generate::greedy_generate(
                model,
                &vocab.encode(prompt),
                40,
                &vocab.encode("\n"),
            )?;
            format!("{:?}", format!("{prompt}{}", vocab.decode(&out)).trim_end())
        }
        (Kind::T5, _) => {
            let out = peft::generate::greedy_generate(model, &vocab.encode(prompt), 24, &[])?;
            format!("{prompt:?} -> {:?}", vocab.decode(&out))
        }
        (Kind::Bert, Batch::Classification(b)) => {
            let logits = model.forward(&ModelInputs::from_ids(b.input_ids.clone()))?;
            let predicted: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            let labels: Vec<i64> = b.labels.to_vec1()?;
            let right = predicted
                .iter()
                .zip(&labels)
                .filter(|(p, l)| i64::from(**p) == **l)
                .count();
            format!("held-out accuracy {right}/{}", labels.len())
        }
        _ => String::new(),
    })
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let kind = Kind::parse(&args.model_type)?;
    let (config, lr, mergeable) = method_config(&args.method, kind.task())?;
    let started = Instant::now();
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("peft-demo-{}", std::process::id())));
    let vocab = Vocab::new(CORPUS);
    let tokens = vocab.encode(CORPUS);
    let lines: Vec<Vec<u32>> = CORPUS.lines().map(|l| vocab.encode(l)).collect();
    println!(
        "peft demo: {} on a tiny {} model ({} characters of text, vocab {})",
        config.peft_type(),
        args.model_type,
        tokens.len(),
        vocab.size()
    );
    let fresh_base = || base_model(kind, vocab.size(), lines.len(), args.seed);
    let model = get_peft_model(fresh_base()?, config, args.seed)?;
    let start = model.base_model().info().decoder_start_token_id;
    println!("{}", model.parameter_line());
    let eval = batch(
        kind,
        &lines,
        &tokens,
        32,
        &mut StdRng::seed_from_u64(args.seed ^ 0xe7a1),
    )?;
    println!("before: {}", sample(kind, &model, &vocab, &eval)?);

    let eval_before = eval.loss(&model)?.to_scalar::<f32>()?;
    let mut opt = AdamW::new(
        model.trainable_vars(),
        ParamsAdamW {
            lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    model.set_training(true);
    let train_started = Instant::now();
    let mut recent = Vec::new();
    for step in 1..=args.steps {
        let stats = train_step(
            &model,
            &mut opt,
            &batch(kind, &lines, &tokens, 16, &mut rng)?,
            Some(1.0),
        )?;
        recent.push(stats.loss);
        if step % 10 == 0 || step == 1 || step == args.steps {
            println!(
                "step {step:>4}  loss {:.4}",
                recent.iter().sum::<f32>() / recent.len() as f32
            );
            recent.clear();
        }
    }
    model.set_training(false);
    let eval_after = eval.loss(&model)?.to_scalar::<f32>()?;
    println!(
        "held-out batch loss {eval_before:.4} -> {eval_after:.4} ({:.1}s of training)",
        train_started.elapsed().as_secs_f32()
    );
    // Prompt-learning methods steer a random base less than weight adapters do.
    let required = if mergeable { 0.8 } else { 0.9 };
    if eval_after.is_nan() || eval_after >= eval_before * required {
        bail!("the loss did not fall enough ({eval_before:.4} -> {eval_after:.4}; at least {:.0}% was required)", 100.0 * (1.0 - required));
    }
    println!("after:  {}", sample(kind, &model, &vocab, &eval)?);

    // Save, then reload onto a fresh copy of the base.
    let adapter_dir = out.join("adapter");
    model.save_pretrained(&adapter_dir)?;
    let size = std::fs::metadata(adapter_dir.join(peft::checkpoint::WEIGHTS_NAME))?.len();
    println!("saved adapter to {} ({size} bytes)", adapter_dir.display());
    let inputs = model_inputs(&eval, start)?;
    let trained = model.forward(&inputs)?;
    let reloaded = PeftModel::from_pretrained(fresh_base()?, &adapter_dir, false)?;
    let d = max_diff(&reloaded.forward(&inputs)?, &trained)?;
    println!("reloaded adapter: max |output difference| = {d:e}");
    if d != 0.0 {
        bail!("the reloaded adapter gives different outputs (max difference {d})");
    }
    if mergeable {
        merge_checks(reloaded, &inputs, &trained, &out)?;
    } else {
        println!(
            "{}: a prompt-learning adapter has no weights to merge",
            args.method
        );
    }
    println!("demo passed in {:.1}s", started.elapsed().as_secs_f32());
    Ok(())
}

/// Merges in memory, then merge-and-unloads into a model folder and loads that; both must give
/// the trained outputs.
fn merge_checks(
    mut model: PeftModel,
    inputs: &ModelInputs,
    trained: &Tensor,
    out: &Path,
) -> Result<()> {
    model.merge_adapter()?;
    let d = max_diff(&model.forward(inputs)?, trained)?;
    println!("merged in memory: max |output difference| = {d:e}");
    if d > 1e-4 {
        bail!("merged outputs differ by {d}");
    }
    model.unmerge_adapter()?;
    let merged_dir = out.join("merged");
    model.merge_and_unload()?.save_pretrained(&merged_dir)?;
    let merged = peft::models::load_model(&merged_dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", merged_dir.display()))?;
    let d = max_diff(&merged.forward(inputs, None)?, trained)?;
    println!(
        "merged model folder {}: max |output difference| = {d:e}",
        merged_dir.display()
    );
    if d > 1e-4 {
        bail!("the merged model folder differs by {d}");
    }
    Ok(())
}
