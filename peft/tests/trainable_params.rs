//! Norm parameters are slots a method can make trainable (the seam LN tuning and bias tuning
//! need): every architecture lists them through `visit_params` under their Hugging Face names,
//! a `Var` put in the slot is what the forward pass reads, and it receives a gradient through
//! the norm (the fused RMS norm and layer norm included).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{fixtures, max_abs_diff};
use peft::{AdaptableModel, ModelInputs};

fn inputs(model: &dyn AdaptableModel) -> ModelInputs {
    let ids = Tensor::new(&[[3u32, 7, 11, 5, 2], [9, 4, 1, 8, 6]], &Device::Cpu).unwrap();
    let mut inputs = ModelInputs::from_ids(ids);
    if model.info().is_encoder_decoder {
        inputs.decoder_input_ids =
            Some(Tensor::new(&[[0u32, 4, 6], [0, 2, 9]], &Device::Cpu).unwrap());
    }
    inputs
}

#[test]
fn norm_weights_train_when_a_method_makes_them_vars() {
    for name in ["llama_tiny", "gpt2_tiny", "t5_tiny", "bert_seqcls"] {
        let dir = fixtures().join("models").join(name);
        let mut model = peft::models::load_model(&dir, DType::F32, &Device::Cpu).unwrap();
        let before = model.forward(&inputs(model.as_ref()), None).unwrap();
        // The norm modules, as `named_modules()` lists them (LayerNorm, T5LayerNorm, ...RMSNorm).
        let norms: Vec<String> = model
            .modules()
            .into_iter()
            .filter(|m| matches!(m.kind, peft::ModuleKind::Other(c) if c.contains("Norm")))
            .map(|m| format!("{}.weight", m.path))
            .collect();
        let mut vars: Vec<(String, Var)> = Vec::new();
        model
            .visit_params(&mut |path, t| {
                if norms.iter().any(|n| n == path) {
                    let var = Var::from_tensor(&(t.clone() * 1.5).unwrap()).unwrap();
                    *t = var.as_tensor().clone();
                    vars.push((path.to_string(), var));
                }
                Ok(())
            })
            .unwrap();
        assert!(
            vars.len() >= 3,
            "{name}: norm weights {:?}",
            vars.iter().map(|(p, _)| p).collect::<Vec<_>>()
        );
        let names: Vec<String> = model
            .named_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        for (path, _) in &vars {
            assert!(names.contains(path), "{name}: {path} is not a named tensor");
        }
        let logits = model.forward(&inputs(model.as_ref()), None).unwrap();
        let changed = max_abs_diff(&logits, &before);
        assert!(
            changed > 1e-4,
            "{name}: the forward pass does not read the replaced norms ({changed})"
        );
        let grads = logits
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .backward()
            .unwrap();
        for (path, var) in &vars {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: {path} got no gradient"));
            let norm: f32 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(
                norm > 0.0 && norm.is_finite(),
                "{name}: {path}: gradient norm {norm}"
            );
        }
        // A replacement of another shape is refused, naming the parameter.
        let err = model
            .visit_params(&mut |_, t| {
                *t = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
                Ok(())
            })
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("replaced by one of shape [3]"),
            "{name}: {err}"
        );
    }
}
