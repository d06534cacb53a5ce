//! QLoRA and LLM.int8 on a tiny LLaMA against transformers + bitsandbytes + peft.
//! Reference: tools/reference/make_quant_fixtures.py (`tiny_models()`): the f32 model loaded
//! with `BitsAndBytesConfig` (NF4 + double quantization, and int8 with threshold 6), a LoRA
//! adapter (r=4, alpha 12, every linear, non-zero B), logits of a left-padded batch, the loss
//! and two LoRA gradients; and transformers' `save_pretrained` of both quantized models.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::loss::causal_lm_loss;
use peft_core::{AdaptableModel, PeftModel};
use peft_quant::checkpoint::save_quantized_folder;
use peft_quant::{quantize_model, quantized_layers, QuantScheme};

use common::{f32_model, fx_dir, inputs, max_diff, quantized, real};
use peft_lora as _;

fn data() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fx_dir().join("qlora.safetensors"), &Device::Cpu).unwrap()
}

/// A bitsandbytes folder loaded with its layers kept quantized (the factory route every
/// architecture takes).
fn load_quantized_folder(
    dir: &Path,
    device: &Device,
) -> peft_core::Result<Box<dyn AdaptableModel>> {
    let factory = peft_quant::BnbCheckpoint::for_folder(dir, device)?
        .ok_or_else(|| peft_core::PeftError::InvalidState("no quantization_config".into()))?;
    peft_models::load_model_with(dir, DType::F32.into(), device, vec![Box::new(factory)])
}

fn with_adapter(base: Box<dyn AdaptableModel>) -> PeftModel {
    let mut m = PeftModel::new(base);
    m.load_adapter(&fx_dir().join("qlora_adapter"), "default", true)
        .unwrap();
    m
}

#[test]
fn nf4_base_and_qlora_match_transformers_bitsandbytes_peft() {
    let d = data();
    let base = quantized(QuantScheme::NF4);
    let logits = base.forward(&inputs(&d), None).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["nf4.base"], &d));
    assert!(diff < 1e-4, "NF4 base logits differ by {diff}");

    let model = with_adapter(base);
    model.set_training(true);
    let logits = model.forward(&inputs(&d)).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["nf4.adapted"], &d));
    assert!(diff < 1e-4, "QLoRA logits differ by {diff}");
    let loss = causal_lm_loss(&logits, &d["labels"]).unwrap();
    let dl = max_diff(&loss.reshape(1).unwrap(), &d["nf4.loss"]);
    assert!(dl < 1e-5, "loss differs by {dl}");
    let grads = loss.backward().unwrap();
    let vars = model.adapter("default").unwrap().vars();
    let mut checked = 0;
    for (key, want) in d.iter().filter(|(k, _)| k.starts_with("nf4.grad.")) {
        let path = key.trim_start_matches("nf4.grad.");
        let (_, var) = vars.iter().find(|(p, _)| p == path).unwrap_or_else(|| {
            panic!(
                "no var {path}; have {:?}",
                vars.iter().map(|(p, _)| p).collect::<Vec<_>>()
            )
        });
        let g = grads.get(var.as_tensor()).expect("gradient");
        let diff = max_diff(g, want);
        assert!(diff < 1e-4, "{path}: gradient differs by {diff}");
        checked += 1;
    }
    assert_eq!(checked, 2);
    // Every LoRA tensor trains through the frozen 4-bit layers.
    for (path, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{path}: no gradient"));
        let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(
            norm > 0.0 && norm.is_finite(),
            "{path}: gradient norm {norm}"
        );
    }
}

#[test]
fn int8_base_and_lora_match_transformers_bitsandbytes_peft() {
    let d = data();
    let base = quantized(QuantScheme::INT8);
    let logits = base.forward(&inputs(&d), None).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["int8.base"], &d));
    assert!(diff < 1e-4, "int8 base logits differ by {diff}");
    let model = with_adapter(base);
    let logits = model.forward(&inputs(&d)).unwrap();
    let diff = max_diff(&real(&logits, &d), &real(&d["int8.adapted"], &d));
    assert!(diff < 1e-4, "int8 + LoRA logits differ by {diff}");
}

/// Our quantizer on the f32 model writes the very checkpoint transformers wrote, and reading
/// transformers' checkpoint gives the same model.
#[test]
fn quantized_checkpoints_are_bitsandbytes_format_both_ways() {
    let d = data();
    for (scheme, folder, logits_key) in [
        (QuantScheme::NF4, "tiny_llama_nf4", "nf4.base"),
        (QuantScheme::INT8, "tiny_llama_int8", "int8.base"),
    ] {
        let mut ours = quantized(scheme);
        let tmp = tempfile::tempdir().unwrap();
        save_quantized_folder(ours.as_mut(), tmp.path()).unwrap();
        common::assert_same_tensors(
            &tmp.path().join("model.safetensors"),
            &fx_dir().join(folder).join("model.safetensors"),
            folder,
        );
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
                .unwrap();
        let want_cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(fx_dir().join(folder).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(
            cfg["quantization_config"], want_cfg["quantization_config"],
            "{folder}"
        );

        // Loading transformers' folder: same layers, same outputs, no re-quantization.
        let mut loaded = load_quantized_folder(&fx_dir().join(folder), &Device::Cpu).unwrap();
        let a = quantized_layers(ours.as_mut()).unwrap();
        let b = quantized_layers(loaded.as_mut()).unwrap();
        assert_eq!(a.len(), b.len());
        let logits = loaded.forward(&inputs(&d), None).unwrap();
        let diff = max_diff(&real(&logits, &d), &real(&d[logits_key], &d));
        assert!(
            diff < 1e-4,
            "{folder}: logits of the loaded checkpoint differ by {diff}"
        );
    }
}

/// Merging into a quantized base re-quantizes: outputs move a little (measured), and unmerge
/// restores the exact quantized weights.
#[test]
fn merging_into_nf4_requantizes_and_unmerge_restores() {
    let d = data();
    let mut model = with_adapter(quantized(QuantScheme::NF4));
    let before = model.forward(&inputs(&d)).unwrap();
    model.merge_adapter().unwrap();
    let merged = model.forward(&inputs(&d)).unwrap();
    let drift = peft_quant::merge::max_abs_diff(&real(&before, &d), &real(&merged, &d)).unwrap();
    // The fixture's LoRA deltas are larger than the base weights (init_lora_weights=False), so
    // re-quantizing W + BA moves the logits visibly. Yardstick: what NF4 does to the same merged
    // weights from f32 (merge on the f32 base, then quantize) against the f32 merged model.
    let mut dense = with_adapter(f32_model()).merge_and_unload().unwrap();
    let dense_logits = dense.forward(&inputs(&d), None).unwrap();
    quantize_model(dense.as_mut(), QuantScheme::NF4, &[]).unwrap();
    let requant = dense.forward(&inputs(&d), None).unwrap();
    let yardstick =
        peft_quant::merge::max_abs_diff(&real(&dense_logits, &d), &real(&requant, &d)).unwrap();
    eprintln!("merge drift {drift}, NF4 error of the merged f32 model {yardstick}");
    assert!(
        drift > 0.0 && drift < 2.0 * yardstick,
        "merge drift {drift} vs {yardstick}"
    );
    model.unmerge_adapter().unwrap();
    let after = model.forward(&inputs(&d)).unwrap();
    assert_eq!(max_diff(&before, &after), 0.0);
    let mut plain = model.merge_and_unload().unwrap();
    assert_eq!(quantized_layers(plain.as_mut()).unwrap().len(), 14);
}

#[test]
fn damaged_quantized_checkpoints_give_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let src = fx_dir().join("tiny_llama_nf4");
    std::fs::copy(src.join("config.json"), tmp.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(
        tmp.path().join("model.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let err = load_quantized_folder(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("model.safetensors") || err.contains(&tmp.path().display().to_string()),
        "{err}"
    );

    // A config whose quantization method is not bitsandbytes.
    let text = std::fs::read_to_string(src.join("config.json"))
        .unwrap()
        .replace("\"bitsandbytes\"", "\"gptq\"");
    std::fs::write(tmp.path().join("config.json"), text).unwrap();
    std::fs::write(tmp.path().join("model.safetensors"), &bytes).unwrap();
    let err = load_quantized_folder(tmp.path(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("quant_method") && err.contains("gptq"),
        "{err}"
    );

    // Quantizing after adapters were added is refused, naming the module.
    let mut m = with_adapter(f32_model()).unload().unwrap();
    let report = quantize_model(m.as_mut(), QuantScheme::NF4, &["o_proj".into()]).unwrap();
    assert_eq!(report.skipped.len(), 3, "{report}");
}
