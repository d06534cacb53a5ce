//! Criterion micro-benchmarks: a LoRA linear layer's forward and backward against its bare
//! base layer, a frozen layer with f32 against bf16-kept weights, merging, and saving/loading a
//! ~1M-parameter adapter.
//!
//! `cargo bench -p peft-benches --bench lora` (run on a quiet machine).

#![allow(clippy::unwrap_used)] // tests fail loudly by design
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use peft::adapted::{AdaptedLinear, RuntimeState};
use peft::lora::{InitLoraWeights, LoraLinear};
use peft::models::{LlamaConfig, LlamaModel};
use peft::{get_peft_model, AdapterConfig, DenseLinear, LinearLike, ParamStore, PeftModel};

fn randn(shape: &[usize], seed: u64) -> Tensor {
    let store = ParamStore::new(seed, &Device::Cpu, "");
    store
        .root()
        .get(
            shape,
            "x",
            peft::Init::Normal {
                mean: 0.0,
                std: 0.02,
            },
        )
        .unwrap()
}

fn lora_layer(
    dim: usize,
    r: usize,
) -> (
    Arc<dyn LinearLike>,
    Arc<dyn LinearLike>,
    Vec<candle_core::Var>,
) {
    let base: Arc<dyn LinearLike> = DenseLinear::new(randn(&[dim, dim], 1), None)
        .unwrap()
        .into_slot();
    let store = ParamStore::new(2, &Device::Cpu, "");
    let lora = LoraLinear::new(
        &store.root(),
        dim,
        dim,
        r,
        2.0,
        0.0,
        &InitLoraWeights::Random,
        0,
    )
    .unwrap();
    let state = Arc::new(RuntimeState::default());
    state.set_active(vec!["default".into()]);
    let adapted = AdaptedLinear::attach(&base, "default", Arc::new(lora), &state);
    let vars = store.vars().into_iter().map(|(_, v)| v).collect();
    (base, adapted, vars)
}

fn linear(c: &mut Criterion) {
    let mut group = c.benchmark_group("lora_linear");
    for dim in [768usize, 2048] {
        let (base, adapted, vars) = lora_layer(dim, 16);
        let x = randn(&[4 * 256, dim], 3);
        group.bench_with_input(BenchmarkId::new("base_forward", dim), &dim, |b, _| {
            b.iter(|| base.forward(&x).unwrap())
        });
        group.bench_with_input(BenchmarkId::new("lora_forward", dim), &dim, |b, _| {
            b.iter(|| adapted.forward(&x).unwrap())
        });
        group.bench_with_input(
            BenchmarkId::new("lora_forward_backward", dim),
            &dim,
            |b, _| {
                b.iter(|| {
                    let y = adapted.forward(&x).unwrap();
                    let grads = y.sum_all().unwrap().backward().unwrap();
                    assert!(grads.get(vars[0].as_tensor()).is_some());
                })
            },
        );
    }
    group.finish();
}

/// A frozen base layer with f32 weights against the same weights kept in bf16 (widened to f32
/// a block at a time, `--dtype bf16-weights`), forward and input gradient, at the side-by-side
/// job's inference (256 rows) and training (1024 rows) shapes.
fn bf16_weights(c: &mut Criterion) {
    let mut group = c.benchmark_group("frozen_linear_768x2048");
    let w32 = randn(&[2048, 768], 1);
    let layers = [
        ("f32", DenseLinear::new(w32.clone(), None).unwrap()),
        (
            "bf16_weights",
            DenseLinear::new(w32.to_dtype(DType::BF16).unwrap(), None).unwrap(),
        ),
    ];
    for rows in [256usize, 1024] {
        let x = candle_core::Var::from_tensor(&randn(&[rows, 768], 3)).unwrap();
        for (name, layer) in &layers {
            group.bench_with_input(
                BenchmarkId::new(format!("{name}_forward"), rows),
                &rows,
                |b, _| b.iter(|| layer.forward(x.as_tensor()).unwrap()),
            );
            group.bench_with_input(
                BenchmarkId::new(format!("{name}_forward_backward"), rows),
                &rows,
                |b, _| {
                    b.iter(|| {
                        let g = layer
                            .forward(x.as_tensor())
                            .unwrap()
                            .sum_all()
                            .unwrap()
                            .backward()
                            .unwrap();
                        assert!(g.get(x.as_tensor()).is_some());
                    })
                },
            );
        }
    }
    group.finish();
}

/// A LLaMA-shaped model with a ~1M-parameter LoRA adapter (r=16 on q,k,v,o of 8 layers of 768).
fn model_with_adapter() -> PeftModel {
    let cfg = LlamaConfig::tiny(1000, 768, 8, 12, 12, 2048);
    let base = LlamaModel::random(cfg, 0, DType::F32, &Device::Cpu).unwrap();
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}"#,
        "bench",
    )
    .unwrap();
    get_peft_model(Box::new(base), config, 0).unwrap()
}

fn checkpoint(c: &mut Criterion) {
    let mut model = model_with_adapter();
    let adapter_params = model.parameter_counts().0;
    let dir = tempfile::tempdir().unwrap();
    let mut group = c.benchmark_group(format!("adapter_{adapter_params}_params"));
    group.sample_size(20);
    group.bench_function("save_pretrained", |b| {
        b.iter(|| model.save_pretrained(dir.path()).unwrap())
    });
    group.bench_function("load_adapter", |b| {
        let mut i = 0;
        b.iter(|| {
            i += 1;
            model
                .load_adapter(dir.path(), &format!("copy{i}"), false)
                .unwrap();
            model.delete_adapter(&format!("copy{i}")).unwrap();
        })
    });
    group.bench_function("merge_unmerge", |b| {
        b.iter(|| {
            model.merge_adapter().unwrap();
            model.unmerge_adapter().unwrap();
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    // No plots: the plotters backend needs system fonts this machine lacks.
    config = Criterion::default().without_plots();
    targets = linear, bf16_weights, checkpoint
}
criterion_main!(benches);
