//! Quantized bases against f32: the NF4 / int8 matmul (forward, and forward + input gradient)
//! against the dense one on the same shapes, and a QLoRA training step (NF4 base + LoRA)
//! against an f32 LoRA step on the same model. Criterion measures each case; a summary with
//! the ratios (median of repeated runs) and the resident bytes per parameter prints first.
//!
//! `cargo bench -p peft-benches --bench quant` (run on a quiet machine).

#![allow(clippy::unwrap_used)] // benchmarks fail loudly by design
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use criterion::{criterion_group, BenchmarkId, Criterion};
use peft::models::{LlamaConfig, LlamaModel};
use peft::quant::{quantize_model, QuantLinear, QuantScheme};
use peft::{get_peft_model, AdapterConfig, DenseLinear, LinearLike, ModelInputs, PeftModel};

const SHAPES: &[(usize, usize, usize)] = &[(512, 576, 1536), (512, 1536, 576), (1, 576, 1536)];

fn randn(shape: &[usize], std: f64) -> Tensor {
    Tensor::randn(0f32, std as f32, shape, &Device::Cpu).unwrap()
}

fn layers(k: usize, n: usize) -> Vec<(&'static str, Arc<dyn LinearLike>)> {
    let w = randn(&[n, k], 0.02);
    let mut out: Vec<(&'static str, Arc<dyn LinearLike>)> =
        vec![("f32", Arc::new(DenseLinear::new(w.clone(), None).unwrap()))];
    for (name, scheme) in [("nf4", QuantScheme::NF4), ("int8", QuantScheme::INT8)] {
        out.push((
            name,
            Arc::new(QuantLinear::quantize(&w, None, false, scheme).unwrap()),
        ));
    }
    out
}

fn fwd(layer: &dyn LinearLike, x: &Tensor) {
    layer.forward(x).unwrap();
}

fn fwd_bwd(layer: &dyn LinearLike, x: &Var) {
    let y = layer.forward(x.as_tensor()).unwrap();
    y.sum_all().unwrap().backward().unwrap();
}

fn median_secs(mut f: impl FnMut(), runs: usize) -> f64 {
    f();
    let mut t: Vec<f64> = (0..runs)
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[runs / 2]
}

/// SmolLM2-shaped layers (hidden 576, ffn 1536, 9 heads / 3 kv heads), 4 of them, vocab 4096.
fn small_llama() -> LlamaModel {
    let cfg = LlamaConfig::tiny(4096, 576, 4, 9, 3, 1536);
    LlamaModel::random(cfg, 0, DType::F32, &Device::Cpu).unwrap()
}

fn lora(base: Box<dyn peft::AdaptableModel>) -> PeftModel {
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "init_lora_weights": false}"#,
        "bench",
    )
    .unwrap();
    get_peft_model(base, config, 0).unwrap()
}

fn step_models() -> Vec<(&'static str, PeftModel)> {
    let f32_model = lora(Box::new(small_llama()));
    let mut q: Box<dyn peft::AdaptableModel> = Box::new(small_llama());
    quantize_model(q.as_mut(), QuantScheme::NF4, &[]).unwrap();
    vec![("f32 LoRA", f32_model), ("NF4 QLoRA", lora(q))]
}

fn train_step(model: &PeftModel, ids: &Tensor) {
    let logits = model.forward(&ModelInputs::from_ids(ids.clone())).unwrap();
    let loss = peft::loss::causal_lm_loss(&logits, ids).unwrap();
    loss.backward().unwrap();
}

fn step_ids() -> Tensor {
    let ids: Vec<u32> = (0..4 * 128u32).map(|i| (i * 7919 + 3) % 4096).collect();
    Tensor::from_vec(ids, (4, 128), &Device::Cpu).unwrap()
}

fn summary() {
    println!(
        "== quantized vs f32 (median of 15 runs; {} kernels)",
        peft::quant::kernel::simd_level()
    );
    for &(m, k, n) in SHAPES {
        let x = randn(&[m, k], 1.0);
        let xv = Var::from_tensor(&x).unwrap();
        let ls = layers(k, n);
        let base_f = median_secs(|| fwd(ls[0].1.as_ref(), &x), 15);
        let base_b = median_secs(|| fwd_bwd(ls[0].1.as_ref(), &xv), 15);
        for (name, layer) in &ls[1..] {
            let f = median_secs(|| fwd(layer.as_ref(), &x), 15);
            let b = median_secs(|| fwd_bwd(layer.as_ref(), &xv), 15);
            let q = layer.as_any().downcast_ref::<QuantLinear>().unwrap();
            println!(
                "matmul m={m} k={k} n={n}: {name} forward {:.3} ms vs f32 {:.3} ms (ratio {:.2}); forward+input grad {:.3} ms vs {:.3} ms (ratio {:.2}); {:.4} bytes/param",
                f * 1e3, base_f * 1e3, f / base_f, b * 1e3, base_b * 1e3, b / base_b,
                q.resident_bytes() as f64 / (k * n) as f64
            );
        }
    }
    let ids = step_ids();
    let models = step_models();
    let times: Vec<f64> = models
        .iter()
        .map(|(_, m)| median_secs(|| train_step(m, &ids), 5))
        .collect();
    println!(
        "training step (4 x 128 tokens, 4 SmolLM2-shaped layers, LoRA r=16 on all linears): f32 LoRA {:.3} s, NF4 QLoRA {:.3} s (ratio {:.2})",
        times[0], times[1], times[1] / times[0]
    );
}

fn matmul(c: &mut Criterion) {
    let mut group = c.benchmark_group("quant_matmul");
    group.sample_size(20);
    for &(m, k, n) in SHAPES {
        let x = randn(&[m, k], 1.0);
        let xv = Var::from_tensor(&x).unwrap();
        for (name, layer) in layers(k, n) {
            let id = format!("{name}/m{m}_k{k}_n{n}");
            group.bench_function(BenchmarkId::new("forward", &id), |b| {
                b.iter(|| fwd(layer.as_ref(), &x))
            });
            group.bench_function(BenchmarkId::new("forward_input_grad", &id), |b| {
                b.iter(|| fwd_bwd(layer.as_ref(), &xv))
            });
        }
    }
    group.finish();
}

fn step(c: &mut Criterion) {
    let mut group = c.benchmark_group("qlora_step");
    group.sample_size(10);
    let ids = step_ids();
    for (name, model) in step_models() {
        group.bench_function(name, |b| b.iter(|| train_step(&model, &ids)));
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // No plots: the plotters backend needs system fonts this machine lacks.
    config = Criterion::default().without_plots();
    targets = matmul, step
}

fn main() {
    summary();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
