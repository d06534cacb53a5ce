//! `peft demo`: the README's main job, fully offline. It builds a small LLaMA-style model with
//! seeded random weights, fine-tunes an adapter (LoRA by default; `--method` picks any other)
//! on an embedded character-level text, prints the parameter line and the falling loss, saves
//! the adapter, reloads it onto a fresh copy of the base and checks the outputs are identical,
//! then (for methods with weights to merge) merges in memory and into a saved model folder and
//! checks again. Any failed check is an error.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use clap::Args;
use peft::models::{LlamaConfig, LlamaModel};
use peft::training::{causal_lm_batch_loss, causal_lm_step, CausalLmBatch};
use peft::{get_peft_model, AdapterConfig, ModelInputs, PeftModel, TaskType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The embedded training text.
const CORPUS: &str = "\
a frozen model keeps its weights; a small adapter learns the task.
low rank updates are cheap to train and cheap to store.
the adapter is saved in a few kilobytes and loads on the same base.
merge the adapter and the model runs as fast as before.
train the adapter, save the adapter, load the adapter, merge the adapter.
many tasks can share one base model, each with its own adapter.
";

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
    /// Method to demonstrate: lora, ia3, prompt, p_tuning or prefix.
    #[arg(long, default_value = "lora")]
    pub method: String,
}

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
    fn encode(&self, text: &str) -> Vec<u32> {
        text.chars().filter_map(|c| self.chars.iter().position(|x| *x == c)).map(|i| i as u32).collect()
    }
    fn decode(&self, ids: &[u32]) -> String {
        ids.iter().filter_map(|i| self.chars.get(*i as usize)).collect()
    }
}

fn base_model(vocab: usize, seed: u64) -> Result<LlamaModel> {
    let mut cfg = LlamaConfig::tiny(vocab, 64, 2, 4, 2, 128);
    cfg.initializer_range = 0.1;
    let mut model = LlamaModel::random(cfg, seed, DType::F32, &Device::Cpu)?;
    model.set_name_or_path("peft-demo/tiny-llama (random, seed)");
    Ok(model)
}

fn random_batch(tokens: &[u32], batch: usize, len: usize, rng: &mut StdRng) -> Result<CausalLmBatch> {
    let mut data = Vec::with_capacity(batch * len);
    for _ in 0..batch {
        let start = rng.random_range(0..tokens.len() - len);
        data.extend_from_slice(&tokens[start..start + len]);
    }
    Ok(CausalLmBatch::from_ids(Tensor::from_vec(data, (batch, len), &Device::Cpu)?, None)?)
}

fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

fn sample(model: &PeftModel, vocab: &Vocab, prompt: &str) -> Result<String> {
    let ids = vocab.encode(prompt);
    let stop = vocab.encode("\n");
    let out = peft::generate::greedy_generate(model, &ids, 48, &stop)?;
    Ok(format!("{prompt}{}", vocab.decode(&out)).trim_end().to_string())
}

/// The demo's adapter config and learning rate for `method`, and whether it can be merged.
fn method_config(method: &str) -> Result<(AdapterConfig, f64, bool)> {
    let (json, lr, mergeable) = match method {
        "lora" => (r#"{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": "all-linear"}"#, 1e-2, true),
        "ia3" => (r#"{"peft_type": "IA3"}"#, 5e-2, true),
        "prompt" | "prompt_tuning" => (r#"{"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 16}"#, 5e-2, false),
        "p_tuning" | "ptuning" => (r#"{"peft_type": "P_TUNING", "num_virtual_tokens": 16, "encoder_hidden_size": 64}"#, 1e-2, false),
        "prefix" | "prefix_tuning" => (r#"{"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 16}"#, 3e-2, false),
        other => bail!("--method {other}: expected one of lora, ia3, prompt, p_tuning, prefix"),
    };
    let config = AdapterConfig::from_json_str(json, "demo config")
        .with_context(|| format!("the {method} method is not linked into this build (see `peft methods`)"))?
        .with_task_type(TaskType::CausalLm);
    Ok((config, lr, mergeable))
}

/// Runs the demo.
pub fn run(args: DemoArgs) -> Result<()> {
    if args.steps == 0 {
        bail!("--steps must be at least 1");
    }
    let (config, lr, mergeable) = method_config(&args.method)?;
    let started = Instant::now();
    let tmp;
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("peft-demo-{}", std::process::id()));
            tmp
        }
    };
    let vocab = Vocab::new(CORPUS);
    let tokens = vocab.encode(CORPUS);
    println!(
        "peft demo: {} on a tiny LLaMA-style model ({} characters of text, vocab {})",
        config.peft_type(),
        tokens.len(),
        vocab.chars.len()
    );
    let model = get_peft_model(Box::new(base_model(vocab.chars.len(), args.seed)?), config, args.seed)?;
    println!("{}", model.parameter_line());
    let prompt = "train the ";
    println!("before: {:?}", sample(&model, &vocab, prompt)?);

    let mut rng = StdRng::seed_from_u64(args.seed);
    let eval = random_batch(&tokens, 8, 64, &mut StdRng::seed_from_u64(args.seed ^ 0xe7a1))?;
    let eval_before = causal_lm_batch_loss(&model, &eval)?.to_scalar::<f32>()?;
    let params = ParamsAdamW { lr, weight_decay: 0.0, ..Default::default() };
    let mut opt = AdamW::new(model.trainable_vars(), params)?;
    model.set_training(true);
    let train_started = Instant::now();
    let mut recent = Vec::new();
    for step in 1..=args.steps {
        let batch = random_batch(&tokens, 16, 64, &mut rng)?;
        let stats = causal_lm_step(&model, &mut opt, &batch, Some(1.0))?;
        recent.push(stats.loss);
        if step % 10 == 0 || step == 1 || step == args.steps {
            let mean = recent.iter().sum::<f32>() / recent.len() as f32;
            println!("step {step:>4}  loss {mean:.4}");
            recent.clear();
        }
    }
    model.set_training(false);
    let eval_after = causal_lm_batch_loss(&model, &eval)?.to_scalar::<f32>()?;
    let tokens_seen = args.steps * 16 * 64;
    println!(
        "held-out batch loss {eval_before:.4} -> {eval_after:.4} ({tokens_seen} tokens in {:.1}s)",
        train_started.elapsed().as_secs_f32()
    );
    if eval_after.is_nan() || eval_after >= eval_before * 0.8 {
        bail!("the loss did not fall enough ({eval_before:.4} -> {eval_after:.4})");
    }
    println!("after:  {:?}", sample(&model, &vocab, prompt)?);

    // Save, then reload onto a fresh copy of the base.
    let adapter_dir = out.join("adapter");
    model.save_pretrained(&adapter_dir)?;
    let size = std::fs::metadata(adapter_dir.join(peft::checkpoint::WEIGHTS_NAME))?.len();
    println!("saved adapter to {} ({size} bytes)", adapter_dir.display());
    let inputs = ModelInputs::from_ids(eval.input_ids.clone());
    let trained = model.forward(&inputs)?;
    let reloaded = PeftModel::from_pretrained(Box::new(base_model(vocab.chars.len(), args.seed)?), &adapter_dir, false)?;
    let d = max_diff(&reloaded.forward(&inputs)?, &trained)?;
    println!("reloaded adapter: max |logit difference| = {d:e}");
    if d != 0.0 {
        bail!("the reloaded adapter gives different outputs (max difference {d})");
    }

    if mergeable {
        merge_checks(reloaded, &inputs, &trained, &out)?;
    } else {
        println!("{}: a prompt-learning adapter has no weights to merge", args.method);
    }
    println!("demo passed in {:.1}s", started.elapsed().as_secs_f32());
    Ok(())
}

/// Merges in memory, then merge-and-unloads into a model folder and loads that; both must give
/// the trained outputs.
fn merge_checks(mut model: PeftModel, inputs: &ModelInputs, trained: &Tensor, out: &std::path::Path) -> Result<()> {
    model.merge_adapter()?;
    let d = max_diff(&model.forward(inputs)?, trained)?;
    println!("merged in memory: max |logit difference| = {d:e}");
    if d > 1e-4 {
        bail!("merged outputs differ by {d}");
    }
    model.unmerge_adapter()?;
    let merged_dir = out.join("merged");
    model.merge_and_unload()?.save_pretrained(&merged_dir)?;
    let merged = peft::models::load_model(&merged_dir, DType::F32, &Device::Cpu)
        .with_context(|| format!("loading {}", merged_dir.display()))?;
    let d = max_diff(&merged.forward(inputs, None)?, trained)?;
    println!("merged model folder {}: max |logit difference| = {d:e}", merged_dir.display());
    if d > 1e-4 {
        bail!("the merged model folder differs by {d}");
    }
    Ok(())
}
