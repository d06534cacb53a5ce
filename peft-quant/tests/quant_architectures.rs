//! Quantized bases for every architecture (GPT-2, T5, BERT SEQ_CLS) against transformers +
//! bitsandbytes + peft. Reference: tools/reference/make_quant_arch_fixtures.py (torch 2.15,
//! transformers 5.24, peft 0.21.2, bitsandbytes 0.50.2): each tiny f32 model, transformers'
//! `save_pretrained` of it loaded with NF4 + double quantization and with int8, logits of a
//! left-padded batch for both, and a LoRA adapter (r=4, alpha 12, non-zero B, every quantized
//! layer) with its NF4 logits, loss and two gradients, and its int8 logits.
//!
//! Each base is built two ways through the base-layer factories: from transformers' quantized
//! folder ([`BnbCheckpoint`]) and from the f32 folder quantized as it loads ([`QuantizeOnLoad`]);
//! both must give transformers' logits.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use peft_core::loss::{causal_lm_loss, cross_entropy};
use peft_core::{AdaptableModel, BaseLayerFactory, ModelInputs, PeftModel};
use peft_quant::{quantized_layers, BnbCheckpoint, QuantScheme, QuantizeOnLoad};

use common::max_diff;
use peft_lora as _;

fn fx(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

struct Case {
    arch: &'static str,
    /// Layers transformers quantized.
    quantized: usize,
    data: HashMap<String, Tensor>,
}

impl Case {
    fn new(arch: &'static str, quantized: usize) -> Self {
        let data =
            candle_core::safetensors::load(fx(&format!("qlora_{arch}.safetensors")), &Device::Cpu)
                .unwrap();
        Case {
            arch,
            quantized,
            data,
        }
    }

    fn inputs(&self) -> ModelInputs {
        let d = &self.data;
        let mut inputs = ModelInputs::from_ids(d["input_ids"].clone())
            .with_mask(Some(d["attention_mask"].clone()));
        inputs.decoder_input_ids = d.get("decoder_input_ids").cloned();
        inputs
    }

    /// Logits at real positions: a decoder-only model's padded query rows are implementation
    /// noise in transformers; T5's decoder rows and BERT's pooled logits are all real.
    fn real(&self, logits: &Tensor) -> Tensor {
        if self.arch != "gpt2" {
            return logits.clone();
        }
        let mask = self.data["attention_mask"]
            .to_dtype(DType::F32)
            .unwrap()
            .unsqueeze(2)
            .unwrap();
        logits.broadcast_mul(&mask).unwrap()
    }

    fn check(&self, logits: &Tensor, key: &str, what: &str) {
        let want = &self.data[key];
        assert_eq!(logits.dims(), want.dims(), "{}: {what}", self.arch);
        let diff = max_diff(&self.real(logits), &self.real(want));
        assert!(
            diff < 1e-4,
            "{}: {what} logits differ from {key} by {diff}",
            self.arch
        );
    }

    fn load(&self, folder: &str, factory: Box<dyn BaseLayerFactory>) -> Box<dyn AdaptableModel> {
        let mut model = peft_models::load_model_with(
            &fx(folder),
            DType::F32.into(),
            &Device::Cpu,
            vec![factory],
        )
        .unwrap();
        let layers = quantized_layers(model.as_mut()).unwrap();
        assert_eq!(layers.len(), self.quantized, "{folder}: quantized layers");
        model
    }

    /// transformers' saved quantized folder, layers kept as stored.
    fn checkpoint_base(&self, tag: &str) -> Box<dyn AdaptableModel> {
        let folder = format!("tiny_{}_{tag}", self.arch);
        let factory = BnbCheckpoint::for_folder(&fx(&folder), &Device::Cpu)
            .unwrap()
            .unwrap();
        self.load(&folder, Box::new(factory))
    }

    /// The f32 folder quantized as it loads.
    fn quantized_on_load(&self, scheme: QuantScheme) -> Box<dyn AdaptableModel> {
        // BERT's reference was quantized with `llm_int8_skip_modules=["classifier"]`, which
        // QuantizeOnLoad does for any output head.
        self.load(
            &format!("tiny_{}", self.arch),
            Box::new(QuantizeOnLoad::new(scheme, vec![])),
        )
    }

    fn with_adapter(&self, base: Box<dyn AdaptableModel>) -> PeftModel {
        let mut m = PeftModel::new(base);
        m.load_adapter(
            &fx(&format!("qlora_{}_adapter", self.arch)),
            "default",
            true,
        )
        .unwrap();
        m
    }

    /// The task loss transformers computes from `labels`.
    fn loss(&self, logits: &Tensor) -> Tensor {
        let labels = &self.data["labels"];
        match self.arch {
            "gpt2" => causal_lm_loss(logits, labels).unwrap(),
            _ => {
                let v = logits.dim(candle_core::D::Minus1).unwrap();
                let rows = logits.elem_count() / v;
                let targets = labels.flatten_all().unwrap().to_dtype(DType::I64).unwrap();
                cross_entropy(&logits.reshape((rows, v)).unwrap(), &targets)
                    .unwrap()
                    .0
            }
        }
    }
}

fn cases() -> [Case; 3] {
    // GPT-2: c_attn, c_proj, c_fc, mlp.c_proj per block. T5: q, k, v, o of every attention and
    // wi of every block (wo stays f32: `_keep_in_fp32_modules`). BERT: six per layer + pooler.
    [
        Case::new("gpt2", 8),
        Case::new("t5", 28),
        Case::new("bert", 13),
    ]
}

#[test]
fn nf4_bases_and_qlora_match_transformers_for_every_architecture() {
    for case in cases() {
        let base = case.checkpoint_base("nf4");
        case.check(
            &base.forward(&case.inputs(), None).unwrap(),
            "nf4.base",
            "NF4 checkpoint",
        );
        let on_load = case.quantized_on_load(QuantScheme::NF4);
        case.check(
            &on_load.forward(&case.inputs(), None).unwrap(),
            "nf4.base",
            "NF4 on load",
        );

        let model = case.with_adapter(base);
        model.set_training(true);
        let logits = model.forward(&case.inputs()).unwrap();
        case.check(&logits, "nf4.adapted", "QLoRA");
        let loss = case.loss(&logits);
        let dl = max_diff(&loss.reshape(1).unwrap(), &case.data["nf4.loss"]);
        assert!(dl < 1e-5, "{}: loss differs by {dl}", case.arch);
        let grads = loss.backward().unwrap();
        let vars = model.adapter("default").unwrap().vars();
        let mut checked = 0;
        for (key, want) in case.data.iter().filter(|(k, _)| k.starts_with("nf4.grad.")) {
            let path = key.trim_start_matches("nf4.grad.");
            let (_, var) = vars.iter().find(|(p, _)| p == path).unwrap_or_else(|| {
                panic!(
                    "no var {path}; have {:?}",
                    vars.iter().map(|(p, _)| p).collect::<Vec<_>>()
                )
            });
            let diff = max_diff(grads.get(var.as_tensor()).expect("gradient"), want);
            assert!(
                diff < 1e-4,
                "{}: {path}: gradient differs by {diff}",
                case.arch
            );
            checked += 1;
        }
        assert_eq!(checked, 2, "{}", case.arch);
        for (path, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{path}: no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{}: {path}: gradient norm {norm}",
                case.arch
            );
        }
    }
}

#[test]
fn int8_bases_and_lora_match_transformers_for_every_architecture() {
    for case in cases() {
        let base = case.checkpoint_base("int8");
        case.check(
            &base.forward(&case.inputs(), None).unwrap(),
            "int8.base",
            "int8 checkpoint",
        );
        let on_load = case.quantized_on_load(QuantScheme::INT8);
        case.check(
            &on_load.forward(&case.inputs(), None).unwrap(),
            "int8.base",
            "int8 on load",
        );
        let model = case.with_adapter(base);
        case.check(
            &model.forward(&case.inputs()).unwrap(),
            "int8.adapted",
            "int8 + LoRA",
        );
    }
}

#[test]
fn a_quantized_config_with_no_quantized_layer_is_refused() {
    // The f32 GPT-2 weights under an NF4 config: the factory finds nothing to load as NF4.
    let tmp = tempfile::tempdir().unwrap();
    let src = fx("tiny_gpt2");
    std::fs::copy(
        src.join("model.safetensors"),
        tmp.path().join("model.safetensors"),
    )
    .unwrap();
    let config = std::fs::read_to_string(fx("tiny_gpt2_nf4").join("config.json")).unwrap();
    std::fs::write(tmp.path().join("config.json"), config).unwrap();
    let factory = BnbCheckpoint::for_folder(tmp.path(), &Device::Cpu)
        .unwrap()
        .unwrap();
    let err = peft_models::load_model_with(
        tmp.path(),
        DType::F32.into(),
        &Device::Cpu,
        vec![Box::new(factory)],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("no layer of the model is stored quantized"),
        "{err}"
    );
    assert!(err.contains(&tmp.path().display().to_string()), "{err}");
}

/// `peft quantize` for every architecture: the f32 folder quantized as it loads and written
/// with `save_quantized_folder` is, tensor for tensor and byte for byte, the folder
/// transformers wrote, with the same `quantization_config` (BERT's reference names the
/// classifier in `llm_int8_skip_modules`, which this side skips as an output head).
#[test]
fn quantized_folders_are_transformers_bytes_for_every_architecture() {
    for case in cases() {
        for (scheme, tag) in [(QuantScheme::NF4, "nf4"), (QuantScheme::INT8, "int8")] {
            let mut ours = case.quantized_on_load(scheme);
            let tmp = tempfile::tempdir().unwrap();
            peft_quant::checkpoint::save_quantized_folder(ours.as_mut(), tmp.path()).unwrap();
            let folder = fx(&format!("tiny_{}_{tag}", case.arch));
            let what = format!("{} {tag}", case.arch);
            common::assert_same_tensors(
                &tmp.path().join("model.safetensors"),
                &folder.join("model.safetensors"),
                &what,
            );
            let read = |p: std::path::PathBuf| -> serde_json::Value {
                serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
            };
            let mut cfg = read(tmp.path().join("config.json"))["quantization_config"].clone();
            let mut want_cfg = read(folder.join("config.json"))["quantization_config"].clone();
            if case.arch == "bert" {
                cfg.as_object_mut().unwrap().remove("llm_int8_skip_modules");
                want_cfg
                    .as_object_mut()
                    .unwrap()
                    .remove("llm_int8_skip_modules");
            }
            assert_eq!(cfg, want_cfg, "{} {tag}: quantization_config", case.arch);
        }
    }
}
