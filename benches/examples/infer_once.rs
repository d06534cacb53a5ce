//! One 1 x 256 forward pass of the side-by-side job's model (`side_by_side.rs`), LoRA r=16 alpha
//! 32 on q,k,v,o, unmerged or merged, for counting its instructions with callgrind:
//!
//! ```text
//! cargo build --release -p peft-benches --example infer_once
//! RAYON_NUM_THREADS=1 valgrind --tool=callgrind --collect-atstart=no \
//!     --toggle-collect='*measured_forward*' target/release/examples/infer_once unmerged|merged
//! ```
//!
//! Only the forward is counted (model set-up is most of the run's time under valgrind).

#![allow(clippy::unwrap_used)] // a benchmark fails loudly by design

use candle_core::{DType, Device, Tensor};
use peft::models::{LlamaConfig, LlamaModel, Precision};
use peft::{get_peft_model, no_grad, AdapterConfig, ModelInputs, PeftModel};

#[inline(never)]
fn measured_forward(model: &PeftModel, inputs: &ModelInputs) -> Tensor {
    model.forward(inputs).unwrap()
}

fn main() {
    let merged = match std::env::args().nth(1).as_deref() {
        Some("merged") => true,
        Some("unmerged") => false,
        other => {
            eprintln!("infer_once: expected merged or unmerged, found {other:?}");
            std::process::exit(2);
        }
    };
    let mut cfg = LlamaConfig::tiny(32000, 768, 12, 12, 12, 2048);
    cfg.tie_word_embeddings = true;
    let base = LlamaModel::random(cfg, 0, Precision::from(DType::F32), &Device::Cpu).unwrap();
    let config = AdapterConfig::from_json_str(
        r#"{"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "init_lora_weights": false}"#,
        "infer-once",
    )
    .unwrap();
    let mut model = get_peft_model(Box::new(base), config, 0).unwrap();
    model.set_training(false);
    let _guard = no_grad();
    if merged {
        model.merge_adapter().unwrap();
    }
    let ids: Vec<u32> = (0..256u32)
        .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(7) >> 7) % 32000)
        .collect();
    let inputs = ModelInputs::from_ids(Tensor::from_vec(ids, (1, 256), &Device::Cpu).unwrap());
    let logits = measured_forward(&model, &inputs);
    println!("logits {:?}", logits.dims());
}
