//! `peft-vera`: VeRA (vector-based random matrix adaptation, Kopiczko et al. 2024) for peft-rs,
//! checkpoint-compatible with peft's `VeraConfig` (`peft_type` `VERA`).
//!
//! All targeted layers share two frozen random matrices, `vera_A` `[r, max_in]` and `vera_B`
//! `[max_out, r]` (sized by the largest targeted layer; each layer uses their leading
//! `[r, in]` and `[out, r]` parts), and each layer trains two vectors only: the update is
//! `y += λ_b ⊙ (B (λ_d ⊙ (A x)))`, merged as `ΔW = (λ_b ⊙ B)(λ_d ⊙ A)`. The projections are
//! drawn exactly as peft draws them (torch's CPU generator seeded with `projection_prng_key`,
//! `kaiming_uniform_` with gain √2, `vera_A` first), so with `save_projection=false` either
//! library rebuilds the other's; with `save_projection=true` (the default) they are saved as
//! `base_model.vera_A` / `base_model.vera_B` and read back. They are buffers: never trained
//! nor counted, as in peft.
//!
//! `init_weights=true`: `λ_b = 0` (a no-op adapter) and `λ_d = d_initial`; `false`: `λ_b = 1`
//! and `λ_d` standard normal. `vera_dropout` applies to the layer input in training. GPT-2's
//! Conv1D layers are supported as in peft (`fan_in_fan_out` follows the layer layout).
//!
//! Written only against `peft-core`'s public API (the shared tensors through
//! `ParamBuilder::shared_buffer`, their size through `LayerMethod::observe_target_shape`).

use candle_core::Tensor;
use peft_core::delta::map_rows;
use peft_core::json::ConfigFields;
use peft_core::nn::Dropout;
use peft_core::torch_rng::TorchGenerator;
use peft_core::{
    CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike, MethodConfig, MethodRegistration,
    ParamBuilder, PeftError, Result, TargetModules, TargetSpec, TrainedBiases,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "VERA";

/// The `bias` value naming the adapted layers' biases.
const BIAS_ONLY: &str = "vera_only";

/// The checkpoint keys of the shared projections.
const KEY_A: &str = "base_model.vera_A";
const KEY_B: &str = "base_model.vera_B";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "VeRA: shared frozen random projections, two trained scaling vectors per layer",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// The VeRA configuration (peft's `VeraConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct VeraConfig {
    /// Module selection (`target_modules`, `layers_to_transform`, `layers_pattern`,
    /// `modules_to_save`; peft's VeRA has no `exclude_modules`).
    pub targets: TargetSpec,
    /// `r`: the projections' rank (shared by all layers).
    pub r: usize,
    /// `projection_prng_key`: the seed of the projections.
    pub projection_prng_key: u64,
    /// `save_projection`: save the projections with the adapter (else rebuilt from the seed).
    pub save_projection: bool,
    /// `vera_dropout`: dropout on the layer input, in training.
    pub vera_dropout: f64,
    /// `d_initial`: the initial value of `λ_d` with `init_weights`.
    pub d_initial: f64,
    /// `fan_in_fan_out` (peft sets it from the layer layout).
    pub fan_in_fan_out: bool,
    /// `bias`: which base biases train with the adapter (`"none"`, `"all"`, `"vera_only"`).
    pub bias: TrainedBiases,
    /// `init_weights`: `λ_b = 0`, `λ_d = d_initial`; `false`: `λ_b = 1`, `λ_d` random.
    pub init_weights: bool,
    /// `(max_out, max_in)` over the targeted layers, observed before wrapping (not saved).
    pub max_dims: Option<(usize, usize)>,
}

impl Default for VeraConfig {
    /// peft's defaults: `r=256`, key 0, projections saved, `d_initial=0.1`.
    fn default() -> Self {
        VeraConfig {
            targets: TargetSpec::default(),
            r: 256,
            projection_prng_key: 0,
            save_projection: true,
            vera_dropout: 0.0,
            d_initial: 0.1,
            fan_in_fan_out: false,
            bias: TrainedBiases::None,
            init_weights: true,
            max_dims: None,
        }
    }
}

impl VeraConfig {
    /// A config with rank `r`, peft's defaults otherwise.
    pub fn new(r: usize) -> Self {
        VeraConfig {
            r,
            ..VeraConfig::default()
        }
    }

    /// The projections peft draws: `vera_A` then `vera_B` from one generator.
    fn projections(&self, max_in: usize, max_out: usize) -> (Vec<f32>, Vec<f32>) {
        let mut g = TorchGenerator::manual_seed(self.projection_prng_key);
        let a = g.kaiming_uniform((self.r, max_in));
        let b = g.kaiming_uniform((max_out, self.r));
        (a, b)
    }
}

/// Parses a VeRA config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let d = VeraConfig::default();
    let targets = TargetSpec::take_fields(fields, true)?;
    let r = fields.take_positive_usize("r", d.r)?;
    let key = fields.take_seed("projection_prng_key", d.projection_prng_key)?;
    let vera_dropout = fields.take_probability("vera_dropout", 0.0)?;
    Ok(Box::new(VeraConfig {
        targets,
        r,
        projection_prng_key: key,
        save_projection: fields.take_bool("save_projection", true)?,
        vera_dropout,
        d_initial: fields.take_f64("d_initial", d.d_initial)?,
        fan_in_fan_out: fields.take_bool("fan_in_fan_out", false)?,
        bias: TrainedBiases::take(fields, BIAS_ONLY)?,
        init_weights: fields.take_bool("init_weights", true)?,
        max_dims: None,
    }))
}

impl MethodConfig for VeraConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        // VeraConfig has no `exclude_modules` field.
        out.remove("exclude_modules");
        out.insert("r".into(), Value::from(self.r));
        out.insert(
            "projection_prng_key".into(),
            Value::from(self.projection_prng_key),
        );
        out.insert("save_projection".into(), Value::Bool(self.save_projection));
        out.insert("vera_dropout".into(), Value::from(self.vera_dropout));
        out.insert("d_initial".into(), Value::from(self.d_initial));
        out.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        out.insert("bias".into(), Value::from(self.bias.as_str(BIAS_ONLY)));
        out.insert("init_weights".into(), Value::Bool(self.init_weights));
        out
    }

    peft_core::layer_method_casts!();
}

/// VeRA on one linear layer.
#[derive(Debug)]
pub struct VeraLinear {
    /// `vera_A[:, :in]`, `[r, in]` (a view of the shared tensor).
    a: Tensor,
    /// `vera_B[:out, :]`, `[out, r]`.
    b: Tensor,
    /// `vera_lambda_b`, `[out]`.
    lambda_b: Tensor,
    /// `vera_lambda_d`, `[r]`.
    lambda_d: Tensor,
    dropout: Dropout,
}

impl LinearAdapter for VeraLinear {
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        let u = map_rows(x, self.a.dim(1)?, y.dtype(), |x2| {
            let x2 = self.dropout.forward(&x2, training)?;
            let h = x2.matmul(&self.a.t()?)?.broadcast_mul(&self.lambda_d)?;
            Ok(h.matmul(&self.b.t()?)?.broadcast_mul(&self.lambda_b)?)
        })?;
        Ok((y + u)?)
    }

    /// `W + (λ_b ⊙ B)(λ_d ⊙ A)`.
    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let b = self.b.broadcast_mul(&self.lambda_b.unsqueeze(1)?)?;
        let a = self.a.broadcast_mul(&self.lambda_d.unsqueeze(1)?)?;
        Ok(((weight + b.matmul(&a)?)?, bias.cloned()))
    }
}

impl LayerMethod for VeraConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's VeRA mapping: LoRA's, with `q_proj`/`v_proj` for Phi.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        if model_type == "phi" {
            return Some(TargetModules::List(vec!["q_proj".into(), "v_proj".into()]));
        }
        peft_core::low_rank::default_targets(model_type)
    }

    /// peft sets `fan_in_fan_out` to each targeted layer's layout, the last one winning.
    fn observe_weight_layout(&mut self, transposed: bool) {
        self.fan_in_fan_out = transposed;
    }

    /// The projections span the largest targeted input and output (peft's `_find_dim`).
    fn observe_target_shape(&mut self, in_features: usize, out_features: usize) {
        let (o, i) = self.max_dims.unwrap_or((0, 0));
        self.max_dims = Some((o.max(out_features), i.max(in_features)));
    }

    fn trained_biases(&self) -> TrainedBiases {
        self.bias
    }

    fn tuner_class_name(&self) -> String {
        "VeraModel".into()
    }

    fn layer_class_name(&self, _embedding: bool) -> String {
        "vera.Linear".into()
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        let (inp, out, r) = (base.in_features(), base.out_features(), self.r);
        let (max_out, max_in) = self.max_dims.ok_or_else(|| {
            PeftError::InvalidState(format!(
                "VeRA at `{path}`: the projections were not sized before wrapping"
            ))
        })?;
        let device = params.device().clone();
        // Both come from one stream: drawn once, whichever buffer needs it first.
        let drawn = std::cell::OnceCell::new();
        let draw = || drawn.get_or_init(|| self.projections(max_in, max_out));
        let a = params.shared_buffer(KEY_A, &[r, max_in], self.save_projection, || {
            Ok(Tensor::from_slice(&draw().0, (r, max_in), &device)?)
        })?;
        let b = params.shared_buffer(KEY_B, &[max_out, r], self.save_projection, || {
            Ok(Tensor::from_slice(&draw().1, (max_out, r), &device)?)
        })?;
        let (lambda_b_init, lambda_d) = if self.init_weights {
            let d = self.d_initial as f32;
            let dev = device.clone();
            (
                Init::Zeros,
                params.get_with(&[r], "vera_lambda_d", move |_| {
                    Ok(Tensor::full(d, r, &dev)?)
                })?,
            )
        } else {
            (
                Init::Ones,
                params.get(
                    &[r],
                    "vera_lambda_d",
                    Init::Normal {
                        mean: 0.0,
                        std: 1.0,
                    },
                )?,
            )
        };
        Ok(Box::new(VeraLinear {
            a: a.narrow(1, 0, inp)?,
            b: b.narrow(0, 0, out)?,
            lambda_b: params.get(&[out], "vera_lambda_b", lambda_b_init)?,
            lambda_d,
            dropout: Dropout::new(self.vera_dropout, params.seed("vera_dropout")),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The projections are kaiming-uniform with gain √2 and come from one stream, `vera_A`
    /// first: `vera_B` continues where `vera_A` stopped.
    #[test]
    fn projections_share_one_stream() {
        let c = VeraConfig::new(4);
        let (a, b) = c.projections(10, 6);
        assert_eq!((a.len(), b.len()), (40, 24));
        let bound_a = (6.0f32 / 10.0).sqrt();
        let bound_b = (6.0f32 / 4.0).sqrt();
        assert!(a.iter().all(|v| v.abs() <= bound_a));
        assert!(b.iter().all(|v| v.abs() <= bound_b));
        let mut g = TorchGenerator::manual_seed(0);
        let _ = g.uniform(40, 0.0, 1.0);
        let next = g.uniform(1, -bound_b as f64, bound_b as f64);
        assert_eq!(next[0], b[0]);
    }
}
