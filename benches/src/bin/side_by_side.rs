//! This project's half of `scripts/bench-vs-pytorch.sh`: the same job as
//! `tools/bench/pytorch_side.py`, printed as one JSON line.
//!
//! The job: a LLaMA-shaped model (hidden 768, 12 layers, 12 heads, ffn 2048, vocab 32000, tied
//! embeddings, random weights from one seed), LoRA r=16 alpha 32 on q,k,v,o, batch 4 x 256
//! tokens, AdamW, f32. `train` reports the median step time after warm-up, tokens/s and the
//! process's peak RSS; `infer` the median time of a 1 x 256 forward pass with the adapter
//! unmerged and merged, alternating (`--runs` pairs, 15), the median of the pairs' unmerged /
//! merged ratios, and peak RSS.
//!
//! `cargo run --release -p peft-benches --bin side_by_side -- train|infer [--steps N] [--warmup N]
//! [--bf16-weights] [--dora] [--gradient-checkpointing]` (threads: `RAYON_NUM_THREADS`). `--bf16-weights` keeps the frozen
//! matrices in bf16 and computes in f32 (`--dtype bf16-weights` of the CLI); `--dora` trains the
//! same adapter as DoRA (`use_dora`), for DoRA's overhead over LoRA; `--gradient-checkpointing`
//! recomputes each layer in the backward pass, for its cost in time.

#![allow(clippy::unwrap_used)] // a benchmark fails loudly by design

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use peft::models::{LlamaConfig, LlamaModel, Precision};
use peft::optim::{AdamW, AdamWConfig};
use peft::{get_peft_model, no_grad, AdapterConfig, ModelInputs, PeftModel};

fn model(precision: Precision, dora: bool) -> PeftModel {
    let mut cfg = LlamaConfig::tiny(32000, 768, 12, 12, 12, 2048);
    cfg.tie_word_embeddings = true;
    let base = LlamaModel::random(cfg, 0, precision, &Device::Cpu).unwrap();
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}"#
            .replace('}', &format!(", \"use_dora\": {dora}}}"))
            .as_str(),
        "side-by-side",
    )
    .unwrap();
    get_peft_model(Box::new(base), config, 0).unwrap()
}

fn ids(batch: usize, len: usize, seed: u32) -> Tensor {
    let v: Vec<u32> = (0..(batch * len) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % 32000)
        .collect();
    Tensor::from_vec(v, (batch, len), &Device::Cpu).unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn train(
    steps: usize,
    warmup: usize,
    precision: Precision,
    dora: bool,
    checkpointing: bool,
) -> String {
    let mut model = model(precision, dora);
    model.set_gradient_checkpointing(checkpointing).unwrap();
    model.set_training(true);
    let (trainable, total) = model.parameter_counts();
    let vars = model.trainable_named_vars();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    let (batch, len) = (4, 256);
    let mut times = Vec::new();
    let mut losses = Vec::new();
    for step in 0..warmup + steps {
        let x = ids(batch, len, step as u32);
        let start = Instant::now();
        // The training loss as `peft train` computes it: the frozen tied head and the
        // cross-entropy fused, a chunk of rows at a time (no [B, T, V] logits).
        let loss = model
            .causal_lm_loss(&ModelInputs::from_ids(x.clone()), &x)
            .unwrap();
        let t_fwd = start.elapsed().as_secs_f64();
        let grads = peft::recompute::backward(&loss).unwrap();
        let t_bwd = start.elapsed().as_secs_f64();
        if std::env::var("PHASES").is_ok() {
            eprintln!("forward + loss {t_fwd:.3} backward {:.3}", t_bwd - t_fwd);
        }
        let g: Vec<Option<Tensor>> = vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        opt.step(&g, 1e-4).unwrap();
        let secs = start.elapsed().as_secs_f64();
        losses.push(loss.to_scalar::<f32>().unwrap());
        if step >= warmup {
            times.push(secs);
        }
    }
    let step_s = median(times);
    format!(
        "{{\"side\": \"peft-rs\", \"mode\": \"train\", \"dora\": {dora}, \"gradient_checkpointing\": {checkpointing}, \"dtype\": \"{}\", \"threads\": {}, \"median_step_s\": {step_s:.4}, \"tokens_per_s\": {:.1}, \"peak_rss_mb\": {:.0}, \"trainable\": {trainable}, \"total\": {total}, \"first_loss\": {:.4}, \"last_loss\": {:.4}, \"losses\": [{}]}}",
        precision_name(precision),
        rayon_threads(),
        (batch * len) as f64 / step_s,
        peft::alloc::peak_rss_mb().unwrap_or(0.0),
        losses[0],
        losses[losses.len() - 1],
        losses.iter().map(|l| format!("{l:.5}")).collect::<Vec<_>>().join(", ")
    )
}

fn precision_name(p: Precision) -> &'static str {
    if p == Precision::bf16_matrices() {
        "bf16-weights"
    } else {
        "f32"
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn infer(runs: usize, precision: Precision) -> String {
    let mut model = model(precision, false);
    model.set_training(false);
    let x = ModelInputs::from_ids(ids(1, 256, 7));
    let _guard = no_grad();
    let once = |m: &PeftModel| {
        let s = Instant::now();
        m.forward(&x).unwrap();
        s.elapsed().as_secs_f64()
    };
    once(&model);
    let before = model.forward(&x).unwrap();
    model.merge_adapter().unwrap();
    once(&model);
    let after = model.forward(&x).unwrap();
    let diff = peft::quant::merge::max_abs_diff(&before, &after).unwrap();
    model.unmerge_adapter().unwrap();
    // Unmerged and merged runs alternate, so that a machine's drift hits both alike.
    let (mut unmerged, mut merged) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        unmerged.push(once(&model));
        model.merge_adapter().unwrap();
        merged.push(once(&model));
        model.unmerge_adapter().unwrap();
    }
    // Each pair's ratio, then their median: the VM's drift between pairs cancels.
    let paired = median(unmerged.iter().zip(&merged).map(|(u, m)| u / m).collect());
    let (unmerged, merged) = (median(unmerged), median(merged));
    format!(
        "{{\"side\": \"peft-rs\", \"mode\": \"infer\", \"dtype\": \"{}\", \"threads\": {}, \"unmerged_s\": {unmerged:.4}, \"merged_s\": {merged:.4}, \"unmerged_over_merged_paired\": {paired:.4}, \"merge_max_diff\": {diff:.2e}, \"peak_rss_mb\": {:.0}}}",
        precision_name(precision),
        rayon_threads(),
        peft::alloc::peak_rss_mb().unwrap_or(0.0)
    )
}

fn main() {
    peft::alloc::keep_freed_memory();
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(1).map(String::as_str).unwrap_or("train");
    let precision = if args.iter().any(|a| a == "--bf16-weights") {
        Precision::bf16_matrices()
    } else {
        DType::F32.into()
    };
    let line = match mode {
        "train" => train(
            arg(&args, "--steps", 5),
            arg(&args, "--warmup", 2),
            precision,
            args.iter().any(|a| a == "--dora"),
            args.iter().any(|a| a == "--gradient-checkpointing"),
        ),
        "infer" => infer(arg(&args, "--runs", 15), precision),
        other => {
            eprintln!("side_by_side: expected train or infer, found {other}");
            std::process::exit(2);
        }
    };
    println!("{line}");
}
