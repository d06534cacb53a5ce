//! Merging is two-phase: every layer's merged weights are computed before any layer is
//! swapped, so a layer that cannot merge leaves the whole model as it was, and the error names
//! that layer. The method here is a test plugin (written against core's public API, registered
//! through the registry like any third-party method): it scales a layer's output by a learned
//! scalar, and declares its adapters on `v_proj` not mergeable.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod common;

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use peft::json::ConfigFields;
use peft::models::{LlamaConfig, LlamaModel};
use peft::{
    get_peft_model, AdapterConfig, CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike,
    MethodConfig, MethodRegistration, ModelInputs, ParamBuilder, Result, TargetModules, TargetSpec,
};
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
struct ScaleConfig {
    targets: TargetSpec,
}

fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let _ = fields;
    let targets = TargetSpec {
        target_modules: Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()])),
        ..Default::default()
    };
    Ok(Box::new(ScaleConfig { targets }))
}

peft::register_method!(MethodRegistration {
    peft_type: "SCALE_TEST",
    description: "test plugin: a learned output scale, not mergeable on v_proj",
    crate_name: "merge_two_phase test",
    parse,
});

impl MethodConfig for ScaleConfig {
    fn peft_type(&self) -> &'static str {
        "SCALE_TEST"
    }
    fn to_json_fields(&self) -> Map<String, Value> {
        Map::new()
    }
    peft::layer_method_casts!();
}

impl LayerMethod for ScaleConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }
    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }
    fn default_target_modules(&self, _model_type: &str) -> Option<TargetModules> {
        None
    }
    fn wrap_linear(
        &self,
        path: &str,
        _base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        let scale = params.get(
            &[1],
            "scale",
            Init::Uniform {
                low: 1.5,
                high: 2.5,
            },
        )?;
        Ok(Box::new(Scale {
            scale,
            mergeable: !path.ends_with("v_proj"),
        }))
    }
}

#[derive(Debug)]
struct Scale {
    scale: Tensor,
    mergeable: bool,
}

impl LinearAdapter for Scale {
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        _x: &Tensor,
        y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        Ok(y.broadcast_mul(&self.scale)?)
    }
    fn mergeable(&self) -> bool {
        self.mergeable
    }
    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let s = &self.scale.to_dtype(DType::F32)?;
        Ok((
            weight.broadcast_mul(s)?,
            bias.map(|b| b.broadcast_mul(s)).transpose()?,
        ))
    }
}

#[test]
fn a_layer_that_cannot_merge_leaves_every_layer_unmerged() {
    let mut cfg = LlamaConfig::tiny(64, 32, 2, 4, 2, 48);
    cfg.initializer_range = 0.2;
    let base = LlamaModel::random(cfg, 1, DType::F32, &Device::Cpu).unwrap();
    let config = AdapterConfig::from_json_str(r#"{"peft_type": "SCALE_TEST"}"#, "test").unwrap();
    let mut model = get_peft_model(Box::new(base), config, 3).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 2]], &Device::Cpu).unwrap();
    let inputs = ModelInputs::from_ids(ids);
    let before = model.forward(&inputs).unwrap();
    let err = model.merge_adapter().unwrap_err().to_string();
    assert!(
        err.contains("model.layers.0.self_attn.v_proj") && err.contains("cannot merge"),
        "{err}"
    );
    assert!(model.merged_adapters().is_empty());
    let after = model.forward(&inputs).unwrap();
    let diff = max_abs_diff(&before, &after);
    assert_eq!(diff, 0.0, "a failed merge changed the outputs");
    // Disabling the adapters gives the base outputs again: no layer kept merged weights.
    let base_out = {
        let _off = model.disable_adapters();
        model.forward(&inputs).unwrap()
    };
    let effect = max_abs_diff(&before, &base_out);
    assert!(effect > 1e-3, "the adapter has an effect ({effect})");
    let base_again = model.unload().unwrap().forward(&inputs, None).unwrap();
    let diff = max_abs_diff(&base_out, &base_again);
    assert_eq!(diff, 0.0);
}
