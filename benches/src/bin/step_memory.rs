//! Peak memory of one LoRA training step on a 1B LLaMA (TinyLlama-1.1B's shapes: hidden 2048,
//! 22 layers, 32 heads, 4 key/value heads, ffn 5632, vocab 32000; random weights), with and
//! without gradient checkpointing, from the sizes of the allocations themselves: a counting
//! global allocator records the bytes live at each moment, so the figures are the tensors the
//! step holds, not the allocator's or the OS's view. On a machine without a GPU this stands in
//! for the device memory of the same step: run it with `PEFT_KERNELS=portable` and the CPU
//! runs the ops a GPU runs (the fused CPU kernels allocate differently).
//!
//! `cargo run --release -p peft-benches --bin step_memory -- [--gradient-checkpointing]
//! [--batch N] [--seq N] [--layers N]` prints one JSON line: the frozen weights, the adapter
//! with its AdamW state, the step's peak and what the step added on top of the model (the
//! activations kept for the backward pass, the gradients, the recomputation's working set).

#![allow(clippy::unwrap_used)] // a benchmark fails loudly by design

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use peft::models::{LlamaConfig, LlamaModel};
use peft::optim::{AdamW, AdamWConfig};
use peft::{get_peft_model, AdapterConfig, ModelInputs};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);
/// The largest single allocation since the last reset.
static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call forwards to the system allocator unchanged; the counters only observe.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller upholds `alloc`'s contract, passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract).
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller upholds `realloc`'s contract, passed on as is.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let grow = new_size - layout.size();
                let now = LIVE.fetch_add(grow, Ordering::Relaxed) + grow;
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn mb(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn arg(args: &[String], name: &str, default: usize) -> usize {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let checkpointing = args.iter().any(|a| a == "--gradient-checkpointing");
    let (batch, seq) = (arg(&args, "--batch", 1), arg(&args, "--seq", 256));
    let layers = arg(&args, "--layers", 22);
    let dropout: f64 = args
        .iter()
        .position(|a| a == "--dropout")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.05);
    let mut cfg = LlamaConfig::tiny(32000, 2048, layers, 32, 4, 5632);
    cfg.initializer_range = 0.02;
    let base = LlamaModel::random(cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let weights = LIVE.load(Ordering::Relaxed);
    let config = AdapterConfig::from_json_str(
        &r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": {dropout},
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}"#
            .replace("{dropout}", &dropout.to_string()),
        "step_memory",
    )
    .unwrap();
    let mut model = get_peft_model(Box::new(base), config, 0).unwrap();
    model.set_gradient_checkpointing(checkpointing).unwrap();
    model.set_training(true);
    let (trainable, total) = model.parameter_counts();
    let vars = model.trainable_named_vars();
    let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
    let v: Vec<u32> = (0..(batch * seq) as u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 7) % 32000)
        .collect();
    let x = Tensor::from_vec(v, (batch, seq), &Device::Cpu).unwrap();
    // One step first, so the optimizer state exists; the second step is the one measured.
    let mut step = |model: &peft::PeftModel| {
        let loss = model
            .causal_lm_loss(&ModelInputs::from_ids(x.clone()), &x)
            .unwrap();
        let after_forward = (LIVE.load(Ordering::Relaxed), PEAK.load(Ordering::Relaxed));
        let grads = peft::recompute::backward(&loss).unwrap();
        if std::env::var("PHASES").is_ok() {
            let mut sizes: Vec<(usize, Vec<usize>)> = grads
                .get_ids()
                .map(|id| {
                    let g = grads.get_id(*id).unwrap();
                    let (storage, _) = g.storage_and_layout();
                    let held = match &*storage {
                        candle_core::Storage::Cpu(candle_core::CpuStorage::F32(v)) => v.len() * 4,
                        _ => g.elem_count() * g.dtype().size_in_bytes(),
                    };
                    (held, g.dims().to_vec())
                })
                .collect();
            sizes.sort_by_key(|(b, _)| std::cmp::Reverse(*b));
            eprintln!(
                "{} gradients, {:.0} MB; largest {:?}",
                sizes.len(),
                mb(sizes.iter().map(|(b, _)| b).sum()),
                &sizes[..sizes.len().min(6)]
            );
            eprintln!(
                "live/peak MB after forward {:.0}/{:.0}, after backward {:.0}/{:.0}, largest allocation {:.1}",
                mb(after_forward.0),
                mb(after_forward.1),
                mb(LIVE.load(Ordering::Relaxed)),
                mb(PEAK.load(Ordering::Relaxed)),
                mb(LARGEST.load(Ordering::Relaxed))
            );
        }
        let g: Vec<Option<Tensor>> = vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        let pre = LIVE.load(Ordering::Relaxed);
        opt.step(&g, 1e-4).unwrap();
        if std::env::var("PHASES").is_ok() {
            eprintln!(
                "live MB before the update {:.0}, after {:.0}",
                mb(pre),
                mb(LIVE.load(Ordering::Relaxed))
            );
        }
        let value = loss.to_scalar::<f32>().unwrap();
        drop((g, grads));
        if std::env::var("PHASES").is_ok() {
            eprintln!(
                "live MB without the gradients {:.0}",
                mb(LIVE.load(Ordering::Relaxed))
            );
        }
        drop(loss);
        if std::env::var("PHASES").is_ok() {
            eprintln!(
                "live MB after the step {:.0}",
                mb(LIVE.load(Ordering::Relaxed))
            );
        }
        value
    };
    step(&model);
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let recomputed = peft::recompute::recomputed_blocks();
    let start = Instant::now();
    let loss = step(&model);
    let secs = start.elapsed().as_secs_f64();
    let peak = PEAK.load(Ordering::Relaxed);
    println!(
        "{{\"what\": \"LoRA step, peak of live allocations (counting allocator, CPU; stands in for device memory)\", \"kernels\": \"{}\", \"gradient_checkpointing\": {checkpointing}, \"layers\": {layers}, \"batch\": {batch}, \"seq\": {seq}, \"dtype\": \"f32\", \"trainable\": {trainable}, \"total\": {total}, \"frozen_weights_mb\": {:.0}, \"model_and_optimizer_mb\": {:.0}, \"step_peak_mb\": {:.0}, \"step_added_mb\": {:.0}, \"recomputed_blocks\": {}, \"step_s\": {secs:.2}, \"loss\": {loss:.4}}}",
        if peft::kernels::cpu::portable() { "portable" } else { "fused" },
        mb(weights),
        mb(before),
        mb(peak),
        mb(peak - before),
        peft::recompute::recomputed_blocks() - recomputed,
    );
}
