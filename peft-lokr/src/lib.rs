//! `peft-lokr`: LoKr (low-rank Kronecker product, from LyCORIS) for peft-rs,
//! checkpoint-compatible with peft's `LoKrConfig` (`peft_type` `LOKR`).
//!
//! Each targeted linear layer `[out, in]` factors its sizes as `out = a·b`, `in = c·d` (peft's
//! `factorization`, near the square root or at `decompose_factor`) and adds
//! `ΔW = (w1 ⊗ w2) · alpha / r`, `w1` `[a, c]` and `w2` `[b, d]`. Each factor is a full matrix
//! (`lokr_w1`, `lokr_w2`) or, when `r` is below half its larger side, a low-rank product
//! (`lokr_w2_a` `[b, r]` · `lokr_w2_b` `[r, d]`; `w1` only with `decompose_both`). peft's
//! initialisations: `init_weights=true` zeroes `w1` (or `w1_a`), `"lycoris"` zeroes `w2` (or
//! `w2_b`), `false` draws everything. Training drops as LoHa does (`module_dropout`,
//! `rank_dropout`, rescaled with `rank_dropout_scale`). Merging adds `ΔW`.
//!
//! Written only against `peft-core`'s public API. Not supported: convolution layers
//! (`lokr_t2`, `use_effective_conv2d`) until a model here has one; GPT-2's Conv1D layers, which
//! peft refuses too.

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
pub const PEFT_TYPE: &str = "LOKR";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "LoKr: Kronecker product of two (low-rank) factors (LyCORIS) on linear layers",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// `init_weights`: which factor starts at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LokrInit {
    /// `true`: `w1` (or `w1_a`) zero, the rest random.
    Default,
    /// `"lycoris"`: `w2` (or `w2_b`) zero, as the LyCORIS library does.
    Lycoris,
    /// `false`: everything random (the adapter changes the model from the start).
    Random,
}

/// The LoKr configuration (peft's `LoKrConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct LokrConfig {
    /// Module selection.
    pub targets: TargetSpec,
    /// `r`, `alpha`, the drops and the per-module patterns.
    pub settings: LycorisSettings,
    /// `decompose_both`: `w1` low-rank too when the rank allows.
    pub decompose_both: bool,
    /// `decompose_factor` (`-1`: factor near the square root).
    pub decompose_factor: i64,
    /// `rank_dropout_scale`: rescale the rows rank dropout keeps.
    pub rank_dropout_scale: bool,
    /// `init_weights`.
    pub init_weights: LokrInit,
}

impl Default for LokrConfig {
    fn default() -> Self {
        LokrConfig {
            targets: TargetSpec::default(),
            settings: LycorisSettings::default(),
            decompose_both: false,
            decompose_factor: -1,
            rank_dropout_scale: false,
            init_weights: LokrInit::Default,
        }
    }
}

/// Parses a LoKr config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let targets = TargetSpec::take_fields(fields, true)?;
    let settings = LycorisSettings::take(fields)?;
    let init_weights = match fields.take_raw("init_weights") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => LokrInit::Default,
        Some(Value::Bool(false)) => LokrInit::Random,
        Some(Value::String(s)) if s == "lycoris" => LokrInit::Lycoris,
        Some(v) => return Err(fields.type_error("init_weights", "true, false or \"lycoris\"", &v)),
    };
    let decompose_factor = match fields.take_raw("decompose_factor") {
        None | Some(Value::Null) => -1,
        Some(v) => v
            .as_i64()
            .filter(|f| *f == -1 || *f > 0)
            .ok_or_else(|| fields.type_error("decompose_factor", "-1 or a positive integer", &v))?,
    };
    Ok(Box::new(LokrConfig {
        targets,
        settings,
        decompose_both: fields.take_bool("decompose_both", false)?,
        decompose_factor,
        rank_dropout_scale: fields.take_bool("rank_dropout_scale", false)?,
        init_weights,
    }))
}

impl MethodConfig for LokrConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        self.settings.write(&mut out);
        out.insert("decompose_both".into(), Value::Bool(self.decompose_both));
        out.insert(
            "decompose_factor".into(),
            Value::from(self.decompose_factor),
        );
        out.insert(
            "rank_dropout_scale".into(),
            Value::Bool(self.rank_dropout_scale),
        );
        out.insert(
            "init_weights".into(),
            match self.init_weights {
                LokrInit::Default => Value::Bool(true),
                LokrInit::Random => Value::Bool(false),
                LokrInit::Lycoris => Value::from("lycoris"),
            },
        );
        out
    }

    peft_core::layer_method_casts!();
}

/// peft's `factorization(dimension, factor)`: `(m, n)` with `m·n = dimension`, `m ≤ n`, `m` the
/// largest divisor up to `factor` that keeps `m + n` from growing (`factor = -1`: no cap, so
/// the pair nearest the square root).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        return (m, dimension / m);
    }
    let cap = if factor == -1 {
        dimension
    } else {
        factor.max(0) as usize
    };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > cap {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// One Kronecker factor: full, or a low-rank product.
#[derive(Debug)]
enum Factor {
    Full(Tensor),
    LowRank(Tensor, Tensor),
}

impl Factor {
    /// `name` `[rows, cols]` when `full`, else `name_a` `[rows, r]` · `name_b` `[r, cols]`; the
    /// zero goes to the full matrix or to `zero_part` (`'a'` or `'b'`) when `zero`.
    #[allow(clippy::too_many_arguments)]
    fn new(
        params: &ParamBuilder,
        name: &str,
        (rows, cols): (usize, usize),
        r: usize,
        full: bool,
        zero: bool,
        zero_part: char,
    ) -> Result<Self> {
        let init = |zeroed: bool, fan_in: usize| {
            if zeroed {
                Init::Zeros
            } else {
                Init::kaiming_uniform_linear(fan_in)
            }
        };
        if full {
            return Ok(Factor::Full(params.get(
                &[rows, cols],
                name,
                init(zero, cols),
            )?));
        }
        Ok(Factor::LowRank(
            params.get(
                &[rows, r],
                &format!("{name}_a"),
                init(zero && zero_part == 'a', r),
            )?,
            params.get(
                &[r, cols],
                &format!("{name}_b"),
                init(zero && zero_part == 'b', cols),
            )?,
        ))
    }

    fn matrix(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(w) => w.clone(),
            Factor::LowRank(a, b) => a.matmul(b)?,
        })
    }
}

/// LoKr's factors on one linear layer.
#[derive(Debug)]
pub struct Kronecker {
    w1: Factor,
    w2: Factor,
    scaling: f64,
}

impl DeltaWeight for Kronecker {
    /// `kron(w1, w2) · scaling`: entry `(i·b + j, k·d + l)` is `w1[i, k] · w2[j, l]`.
    fn delta_weight(&self) -> Result<Tensor> {
        let w1 = self.w1.matrix()?;
        let w2 = self.w2.matrix()?;
        let (a, c) = w1.dims2()?;
        let (b, d) = w2.dims2()?;
        let kron = w1
            .reshape((a, 1, c, 1))?
            .broadcast_mul(&w2.reshape((1, b, 1, d))?)?
            .reshape((a * b, c * d))?;
        Ok((kron * self.scaling)?)
    }
}

impl LokrConfig {
    /// The factors for `base` at rank `r` (peft's `update_layer` for `nn.Linear`).
    fn factors(
        &self,
        base: &dyn LinearLike,
        r: usize,
        scaling: f64,
        params: &ParamBuilder,
    ) -> Result<Kronecker> {
        let (in_m, in_n) = factorization(base.in_features(), self.decompose_factor);
        let (out_l, out_k) = factorization(base.out_features(), self.decompose_factor);
        let below_half = |x: usize, y: usize| (r as f64) < (x.max(y) as f64) / 2.0;
        let full1 = !(self.decompose_both && below_half(out_l, in_m));
        let full2 = !below_half(out_k, in_n);
        let (zero1, zero2) = match self.init_weights {
            LokrInit::Default => (true, false),
            LokrInit::Lycoris => (false, true),
            LokrInit::Random => (false, false),
        };
        Ok(Kronecker {
            w1: Factor::new(params, "lokr_w1", (out_l, in_m), r, full1, zero1, 'a')?,
            w2: Factor::new(params, "lokr_w2", (out_k, in_n), r, full2, zero2, 'b')?,
            scaling,
        })
    }
}

impl LayerMethod for LokrConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's LoKr mapping is a copy of LoRA's.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        peft_core::low_rank::default_targets(model_type)
    }

    fn tuner_class_name(&self) -> String {
        "LoKrModel".into()
    }

    fn layer_class_name(&self, embedding: bool) -> String {
        format!("lokr.{}", if embedding { "Embedding" } else { "Linear" })
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
            ("lokr_drops", self.rank_dropout_scale),
            |r, scaling| self.factors(base, r, scaling, params),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Tensor};
    use peft_core::layers::DenseLinear;
    use peft_core::ParamStore;

    /// Which of a 64×64 layer's factors are zero at rank 2 with both factors decomposed.
    fn zeroed_factors(init: LokrInit) -> Vec<(String, bool)> {
        let config = LokrConfig {
            decompose_both: true,
            init_weights: init,
            ..LokrConfig::default()
        };
        let base = DenseLinear::new(
            Tensor::zeros((64, 64), DType::F32, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap();
        let store = ParamStore::new(3, &Device::Cpu, "");
        config.factors(&base, 2, 1.0, &store.root()).unwrap();
        store
            .vars()
            .into_iter()
            .map(|(name, var)| {
                let max = var.as_tensor().abs().unwrap().max_all().unwrap();
                (name, max.to_scalar::<f32>().unwrap() == 0.0)
            })
            .collect()
    }

    #[test]
    fn init_weights_zero_the_factor_peft_zeroes() {
        let zero = |v: &[(String, bool)]| -> Vec<String> {
            v.iter()
                .filter(|(_, z)| *z)
                .map(|(n, _)| n.clone())
                .collect()
        };
        let default = zeroed_factors(LokrInit::Default);
        assert_eq!(default.len(), 4, "{default:?}");
        assert_eq!(zero(&default), vec!["lokr_w1_a".to_string()]);
        assert_eq!(
            zero(&zeroed_factors(LokrInit::Lycoris)),
            vec!["lokr_w2_b".to_string()]
        );
        assert!(zero(&zeroed_factors(LokrInit::Random)).is_empty());
    }

    #[test]
    fn factorization_matches_peft_docstring() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
    }
}
