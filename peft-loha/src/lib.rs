//! `peft-loha`: LoHa (low-rank Hadamard product, from LyCORIS and the FedPara paper) for
//! peft-rs, checkpoint-compatible with peft's `LoHaConfig` (`peft_type` `LOHA`).
//!
//! Each targeted linear layer gets two low-rank pairs and adds
//! `ΔW = (w1_a w1_b) ⊙ (w2_a w2_b) · alpha / r` to its weight: `hada_w1_a`, `hada_w2_a` are
//! `[out, r]`, `hada_w1_b`, `hada_w2_b` are `[r, in]`. `hada_w2_b` starts at zero, so a new
//! adapter is a no-op (`init_weights=false`: all four random). Training can skip the whole
//! update (`module_dropout`) or zero rows of it (`rank_dropout`, the kept rows rescaled by one
//! over their mean), as peft does. Merging adds `ΔW` to the weight.
//!
//! Written only against `peft-core`'s public API (see `peft-ia3`'s README for the recipe).
//! Not supported: convolution layers (`hada_t1`/`hada_t2`, `use_effective_conv2d`) until a model
//! here has one; GPT-2's Conv1D layers, which peft refuses too.

use candle_core::Tensor;
use peft_core::delta::DeltaWeight;
use peft_core::json::ConfigFields;
use peft_core::low_rank::LycorisSettings;
use peft_core::{
    CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike, MethodConfig, MethodRegistration,
    ParamBuilder, Result, TargetModules, TargetSpec,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "LOHA";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "LoHa: Hadamard product of two low-rank updates (LyCORIS) on linear layers",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// The LoHa configuration (peft's `LoHaConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LohaConfig {
    /// Module selection (`target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `modules_to_save`).
    pub targets: TargetSpec,
    /// `r`, `alpha`, the drops and the per-module patterns.
    pub settings: LycorisSettings,
    /// `init_weights`: `hada_w2_b` starts at zero (a no-op adapter); `false`: all random.
    pub init_weights: bool,
}

impl Default for LohaConfig {
    fn default() -> Self {
        LohaConfig {
            targets: TargetSpec::default(),
            settings: LycorisSettings::default(),
            init_weights: true,
        }
    }
}

impl LohaConfig {
    /// A config with rank `r` and `alpha`, peft's defaults otherwise.
    pub fn new(r: usize, alpha: f64) -> Self {
        let mut c = LohaConfig::default();
        c.settings.r = r;
        c.settings.alpha = serde_json::Number::from_f64(alpha).unwrap_or_else(|| 8.into());
        c
    }
}

/// Parses a LoHa config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let targets = TargetSpec::take_fields(fields, true)?;
    let settings = LycorisSettings::take(fields)?;
    let init_weights = fields.take_bool("init_weights", true)?;
    Ok(Box::new(LohaConfig {
        targets,
        settings,
        init_weights,
    }))
}

impl MethodConfig for LohaConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        self.settings.write(&mut out);
        out.insert("init_weights".into(), Value::Bool(self.init_weights));
        out
    }

    peft_core::layer_method_casts!();
}

/// LoHa's factors on one linear layer.
#[derive(Debug)]
pub struct Hadamard {
    w1_a: Tensor,
    w1_b: Tensor,
    w2_a: Tensor,
    w2_b: Tensor,
    scaling: f64,
}

impl Hadamard {
    /// Builds (or loads) the four factors under `params`: torch's `kaiming_uniform_(a=√5)` for
    /// each (bound `1/√fan_in`), `hada_w2_b` zero when `init_weights`.
    pub fn new(
        params: &ParamBuilder,
        base: &dyn LinearLike,
        r: usize,
        scaling: f64,
        init_weights: bool,
    ) -> Result<Self> {
        let (out, inp) = (base.out_features(), base.in_features());
        let ka = Init::kaiming_uniform_linear(r);
        let kb = Init::kaiming_uniform_linear(inp);
        Ok(Hadamard {
            w1_a: params.get(&[out, r], "hada_w1_a", ka)?,
            w1_b: params.get(&[r, inp], "hada_w1_b", kb)?,
            w2_a: params.get(&[out, r], "hada_w2_a", ka)?,
            w2_b: params.get(
                &[r, inp],
                "hada_w2_b",
                if init_weights { Init::Zeros } else { kb },
            )?,
            scaling,
        })
    }
}

impl DeltaWeight for Hadamard {
    /// `(w1_a w1_b) ⊙ (w2_a w2_b) · scaling`.
    fn delta_weight(&self) -> Result<Tensor> {
        let w1 = self.w1_a.matmul(&self.w1_b)?;
        let w2 = self.w2_a.matmul(&self.w2_b)?;
        Ok(((w1 * w2)? * self.scaling)?)
    }
}

impl LayerMethod for LohaConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's LoHa mapping is a copy of LoRA's.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        peft_core::low_rank::default_targets(model_type)
    }

    fn tuner_class_name(&self) -> String {
        "LoHaModel".into()
    }

    fn layer_class_name(&self, embedding: bool) -> String {
        format!("loha.{}", if embedding { "Embedding" } else { "Linear" })
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        self.settings.wrap_delta(
            PEFT_TYPE,
            path,
            base,
            params,
            ("hada_drops", true),
            |r, scaling| Hadamard::new(params, base, r, scaling, self.init_weights),
        )
    }
}
