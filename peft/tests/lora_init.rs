//! LoRA initialisations beyond the default: `"orthogonal"` (peft's `orthogonal_init`) starts
//! with neither factor zero and `B A = 0`, so the model starts as the base; it is saved under
//! its name and reloads; an odd rank is refused as peft refuses it.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{Device, Tensor};
use common::assert_close;
use peft::lora::{InitLoraWeights, LoraConfig};
use peft::{AdapterConfig, ModelInputs, PeftModel};

fn inputs() -> ModelInputs {
    ModelInputs::from_ids(Tensor::new(&[[1u32, 17, 45, 99, 3, 64]], &Device::Cpu).unwrap())
}

#[test]
fn orthogonal_init_starts_as_the_base_with_both_factors_non_zero() {
    let config = AdapterConfig::new(
        LoraConfig::new(4, 8.0)
            .with_target_modules(["q_proj", "v_proj", "o_proj"])
            .with_init(InitLoraWeights::Orthogonal),
    );
    let m = peft::get_peft_model(common::base("llama_tiny"), config, 7).unwrap();
    let base = PeftModel::new(common::base("llama_tiny"))
        .forward(&inputs())
        .unwrap();
    let logits = m.forward(&inputs()).unwrap();
    // f32 rounding of B A with both factors O(1) (peft rounds alike).
    assert_close("starts as the base", &logits, &base, 1e-4);
    let vars = m.adapter("default").unwrap().vars();
    for (path, v) in &vars {
        let norm = common::max_abs_diff(v.as_tensor(), &v.as_tensor().zeros_like().unwrap());
        assert!(norm > 0.1, "{path}: a zero factor");
        if let Some(module) = path.strip_suffix(".lora_A.weight") {
            let b = &vars
                .iter()
                .find(|(p, _)| p == &format!("{module}.lora_B.weight"))
                .unwrap()
                .1;
            let product = b.as_tensor().matmul(v.as_tensor()).unwrap();
            assert_close(module, &product, &product.zeros_like().unwrap(), 1e-4);
        }
    }
    // Reproducible, saved under its name, reloads to the same factors.
    let config = || {
        AdapterConfig::new(
            LoraConfig::new(4, 8.0)
                .with_target_modules(["q_proj", "v_proj", "o_proj"])
                .with_init(InitLoraWeights::Orthogonal),
        )
    };
    let again = peft::get_peft_model(common::base("llama_tiny"), config(), 7).unwrap();
    let dir = tempfile::tempdir().unwrap();
    again.save_pretrained(dir.path()).unwrap();
    let saved: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(saved["init_lora_weights"], "orthogonal");
    let loaded = PeftModel::from_pretrained(common::base("llama_tiny"), dir.path(), false).unwrap();
    for ((p, a), (_, b)) in vars.iter().zip(loaded.adapter("default").unwrap().vars()) {
        assert_close(p, a.as_tensor(), b.as_tensor(), 0.0);
    }
    let odd = AdapterConfig::new(
        LoraConfig::new(3, 8.0)
            .with_target_modules(["q_proj"])
            .with_init(InitLoraWeights::Orthogonal),
    );
    let e = peft::get_peft_model(common::base("llama_tiny"), odd, 7)
        .unwrap_err()
        .to_string();
    assert!(e.contains("even"), "{e}");
}
