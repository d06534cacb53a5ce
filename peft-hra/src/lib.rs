//! `peft-hra`: HRA (Householder reflection adaptation, Yuan et al. 2024) for peft-rs,
//! checkpoint-compatible with peft's `HRAConfig` (`peft_type` `HRA`).
//!
//! Each targeted linear layer gets `hra_u`, `[in, r]`: `r` vectors whose reflections
//! `R_i = I - 2 v_i v_iᵀ` (`v_i = u_i / |u_i|`) multiply the weight, `W' = W R_0 R_1 ⋯ R_{r-1}`
//! (with `apply_GS` the vectors are orthonormalised first, Gram–Schmidt in column order, and
//! `W' = W (I - 2 V Vᵀ)`). The forward pass computes `base(x H')` with `H'` the transpose of
//! the product, applying the reflections to the input one by one (`O(in·r)` a row) rather than
//! forming the `[in, in]` matrix peft forms; the result is the same, and it works for any base
//! layer, quantized included. Merging multiplies the weight by the product.
//!
//! `init_weights=true` (peft's default) repeats each of `r/2` random vectors twice, so the
//! reflections cancel and a new adapter is a no-op (with an odd `r` all `r` are random, as in
//! peft, which warns). `init_weights=false`: all random. Both use torch's
//! `kaiming_uniform_(a=√5)` bound. `apply_GS` with the default initialisation is degenerate in
//! peft: each repeated vector leaves only rounding noise after Gram–Schmidt, which is then
//! normalised; the same formula runs here, so such an adapter is as arbitrary as peft's.
//!
//! Written only against `peft-core`'s public API. Not supported: convolution layers
//! (`HRAConv2d`) until a model here has one; GPT-2's Conv1D layers, which peft refuses too.
//! Two HRA adapters active on one layer at once apply their reflections in activation order
//! to the input, where peft multiplies the weight by them in that order (the product's
//! transpose reverses it); a single active adapter, merging and every mix of other methods
//! match peft.

use candle_core::{DType, Tensor};
use peft_core::delta::{map_rows, require_linear_layout};
use peft_core::json::ConfigFields;
use peft_core::{
    CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike, MethodConfig, MethodRegistration,
    ParamBuilder, Result, TargetModules, TargetSpec, TrainedBiases,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "HRA";

/// The `bias` value naming the adapted layers' biases.
const BIAS_ONLY: &str = "hra_only";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "HRA: a chain of Householder reflections multiplying linear weights",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// The HRA configuration (peft's `HRAConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct HraConfig {
    /// Module selection (`target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `modules_to_save`).
    pub targets: TargetSpec,
    /// `r`: the number of reflections per layer.
    pub r: usize,
    /// `apply_GS`: orthonormalise the vectors (Gram–Schmidt) before reflecting.
    pub apply_gs: bool,
    /// `init_weights`: pairs of equal vectors (a no-op adapter) when `r` is even; `false`:
    /// all random.
    pub init_weights: bool,
    /// `bias`: which base biases train with the adapter (`"none"`, `"all"`, `"hra_only"`).
    pub bias: TrainedBiases,
}

impl Default for HraConfig {
    /// peft's defaults: `r=8`, no Gram–Schmidt, the no-op initialisation, no biases.
    fn default() -> Self {
        HraConfig {
            targets: TargetSpec::default(),
            r: 8,
            apply_gs: false,
            init_weights: true,
            bias: TrainedBiases::None,
        }
    }
}

impl HraConfig {
    /// A config with `r` reflections, peft's defaults otherwise.
    pub fn new(r: usize) -> Self {
        HraConfig {
            r,
            ..HraConfig::default()
        }
    }
}

/// Parses an HRA config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let targets = TargetSpec::take_fields(fields, true)?;
    let r = fields.take_positive_usize("r", 8)?;
    Ok(Box::new(HraConfig {
        targets,
        r,
        apply_gs: fields.take_bool("apply_GS", false)?,
        init_weights: fields.take_bool("init_weights", true)?,
        bias: TrainedBiases::take(fields, BIAS_ONLY)?,
    }))
}

impl MethodConfig for HraConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        out.insert("r".into(), Value::from(self.r));
        out.insert("apply_GS".into(), Value::Bool(self.apply_gs));
        out.insert("init_weights".into(), Value::Bool(self.init_weights));
        out.insert("bias".into(), Value::from(self.bias.as_str(BIAS_ONLY)));
        out
    }

    peft_core::layer_method_casts!();
}

/// HRA on one linear layer.
#[derive(Debug)]
pub struct Reflections {
    /// `hra_u`, `[in, r]`.
    u: Tensor,
    apply_gs: bool,
}

impl Reflections {
    /// Builds (or loads) `hra_u` under `params` for a layer with `in_features` inputs.
    pub fn new(
        params: &ParamBuilder,
        in_features: usize,
        r: usize,
        apply_gs: bool,
        init_weights: bool,
    ) -> Result<Self> {
        let u = if init_weights && r.is_multiple_of(2) {
            // peft: `half_u` [in, r/2], kaiming-uniform, then `repeat_interleave(half_u, 2, dim=1)`.
            let half = Init::kaiming_uniform_linear(r / 2);
            let device = params.device().clone();
            params.get_with(&[in_features, r], "hra_u", |rng| {
                let h = half.sample(in_features * (r / 2), rng);
                let full: Vec<f32> = h.iter().flat_map(|&v| [v, v]).collect();
                Ok(Tensor::from_vec(full, (in_features, r), &device)?)
            })?
        } else {
            params.get(&[in_features, r], "hra_u", Init::kaiming_uniform_linear(r))?
        };
        Ok(Reflections { u, apply_gs })
    }

    /// The unit vectors, `[in, r]`: the columns normalised, or orthonormalised in order.
    fn vectors(&self) -> Result<Tensor> {
        let u = self.u.to_dtype(DType::F32)?;
        if !self.apply_gs {
            let norms = u.sqr()?.sum_keepdim(0)?.sqrt()?;
            return Ok(u.broadcast_div(&norms)?);
        }
        let r = u.dim(1)?;
        let mut basis: Vec<Tensor> = Vec::with_capacity(r);
        for i in 0..r {
            let mut ui = u.narrow(1, i, 1)?;
            for w in &basis {
                // ui - (wᵀ ui) w
                let proj = (w * &ui)?.sum_all()?;
                ui = (ui - w.broadcast_mul(&proj)?)?;
            }
            let norm = ui.sqr()?.sum_all()?.sqrt()?;
            basis.push(ui.broadcast_div(&norm)?);
        }
        Ok(Tensor::cat(&basis, 1)?)
    }

    /// `x Hᵀ` for `x` `[n, in]` f32: the reflections applied from the last to the first (each
    /// `x - 2 (x v) vᵀ`), or `x - 2 (x V) Vᵀ` with Gram–Schmidt.
    fn transform(&self, x: &Tensor) -> Result<Tensor> {
        let v = self.vectors()?;
        if self.apply_gs {
            return Ok((x - (x.matmul(&v)?.matmul(&v.t()?)? * 2.0)?)?);
        }
        let mut x = x.clone();
        for i in (0..v.dim(1)?).rev() {
            let vi = v.narrow(1, i, 1)?;
            x = (&x - (x.matmul(&vi)?.matmul(&vi.t()?)? * 2.0)?)?;
        }
        Ok(x)
    }

    /// The product `H`, `[in, in]` f32 (peft's `get_delta_weight`).
    pub fn product(&self) -> Result<Tensor> {
        let n = self.u.dim(0)?;
        let eye = Tensor::eye(n, DType::F32, self.u.device())?;
        // H = (I Hᵀ)ᵀ.
        Ok(self.transform(&eye)?.t()?)
    }
}

impl LinearAdapter for Reflections {
    fn adapt_input(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(map_rows(x, self.u.dim(0)?, x.dtype(), |x2| {
            self.transform(&x2)
        })?))
    }

    /// `W H` (the bias unchanged).
    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Ok((weight.matmul(&self.product()?)?, bias.cloned()))
    }
}

impl LayerMethod for HraConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's HRA mapping is a copy of LoRA's.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        peft_core::low_rank::default_targets(model_type)
    }

    fn trained_biases(&self) -> TrainedBiases {
        self.bias
    }

    fn tuner_class_name(&self) -> String {
        "HRAModel".into()
    }

    fn layer_class_name(&self, _embedding: bool) -> String {
        "hra.HRALinear".into()
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        require_linear_layout(path, base, PEFT_TYPE)?;
        Ok(Box::new(Reflections::new(
            params,
            base.in_features(),
            self.r,
            self.apply_gs,
            self.init_weights,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peft_core::ParamStore;

    fn reflections(r: usize, apply_gs: bool, init_weights: bool) -> Reflections {
        let store = ParamStore::new(5, &candle_core::Device::Cpu, "");
        Reflections::new(&store.root(), 6, r, apply_gs, init_weights).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// The product is orthogonal; the even-rank default is the identity, an odd rank is not.
    #[test]
    fn products_are_orthogonal_and_the_default_is_identity() {
        let eye = Tensor::eye(6, DType::F32, &candle_core::Device::Cpu).unwrap();
        for (r, gs, init, identity) in [
            (4, false, true, true),
            (3, false, true, false),
            (4, false, false, false),
            (3, true, false, false),
        ] {
            let h = reflections(r, gs, init).product().unwrap();
            let hht = h.matmul(&h.t().unwrap()).unwrap();
            assert!(max_diff(&hht, &eye) < 1e-5, "r={r} gs={gs}: H Hᵀ != I");
            assert_eq!(
                max_diff(&h, &eye) < 1e-5,
                identity,
                "r={r} gs={gs} init={init}"
            );
        }
    }

    /// The reflections applied to the input equal `x Hᵀ` with peft's explicit product:
    /// `H = Π (I - 2 v vᵀ)` (or `I - 2 V Vᵀ`).
    #[test]
    fn input_transform_matches_the_explicit_product() {
        let x = Tensor::arange(0f32, 12.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((2, 6))
            .unwrap();
        for gs in [false, true] {
            let refl = reflections(3, gs, false);
            let v = refl.vectors().unwrap();
            let eye = Tensor::eye(6, DType::F32, &candle_core::Device::Cpu).unwrap();
            let h = if gs {
                (&eye - (v.matmul(&v.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap()
            } else {
                let mut h = eye.clone();
                for i in 0..3 {
                    let vi = v.narrow(1, i, 1).unwrap();
                    let rf =
                        (&eye - (vi.matmul(&vi.t().unwrap()).unwrap() * 2.0).unwrap()).unwrap();
                    h = h.matmul(&rf).unwrap();
                }
                h
            };
            let want = x.matmul(&h.t().unwrap()).unwrap();
            let got = refl.adapt_input(&x).unwrap().unwrap();
            assert!(max_diff(&got, &want) < 1e-4, "gs={gs}");
            assert!(max_diff(&refl.product().unwrap(), &h) < 1e-5, "gs={gs}");
        }
    }
}
