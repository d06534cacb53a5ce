//! `peft-fourierft`: FourierFT (Gao et al. 2024) for peft-rs, checkpoint-compatible with peft's
//! `FourierFTConfig` (`peft_type` `FOURIERFT`).
//!
//! Each targeted layer trains `n_frequency` spectral coefficients `fourierft_spectrum` at
//! locations drawn as peft draws them (the first `n_frequency` entries of torch's
//! `randperm(out·in)` seeded with `random_loc_seed`, reproduced exactly by
//! `peft_core::torch_rng`), and its update is the real part of the 2-D inverse DFT of that
//! sparse spectrum, times `scaling`: `ΔW[j, l] = scaling/(out·in) · Σ_k s_k cos(2π(j r_k/out +
//! l c_k/in))`. Rather than a dense inverse FFT, the forward pass computes
//! `x ΔWᵀ = scaling/(out·in) · ((x P_in) ⊙ [s, s]) P_out` with `P_in = [cos | sin]` `[in, 2n]`
//! and `P_out = [cos; -sin]` `[2n, out]` (the angle tables, shared by every layer of the same
//! shape, whose locations coincide since the seed is global): a rank-`2n` product, exact to
//! rounding. Merging adds `ΔW`.
//!
//! `init_weights=false` (peft's default): the spectrum is standard normal; `true`: zero (a no-op
//! adapter). `n_frequency_pattern` overrides `n_frequency` per module (peft's `.*\.{key}$`).
//! GPT-2's Conv1D layers are supported as in peft.
//!
//! Written only against `peft-core`'s public API.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use candle_core::{DType, Device, Tensor};
use peft_core::delta::map_rows;
use peft_core::json::ConfigFields;
use peft_core::targets::pattern_value_dotted;
use peft_core::torch_rng::TorchGenerator;
use peft_core::{
    CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike, MethodConfig, MethodRegistration,
    ParamBuilder, PeftError, Result, TargetModules, TargetSpec, TrainedBiases,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "FOURIERFT";

/// The `bias` value naming the adapted layers' biases.
const BIAS_ONLY: &str = "fourier_only";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "FourierFT: a trained sparse spectrum of each linear layer's weight update",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// The FourierFT configuration (peft's `FourierFTConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct FourierftConfig {
    /// Module selection (`target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `modules_to_save`).
    pub targets: TargetSpec,
    /// `n_frequency`: trained coefficients per layer.
    pub n_frequency: usize,
    /// `n_frequency_pattern`: per-module overrides, in file order.
    pub n_frequency_pattern: Vec<(String, usize)>,
    /// `scaling`.
    pub scaling: f64,
    /// `random_loc_seed`: the seed of the frequency locations.
    pub random_loc_seed: u64,
    /// `fan_in_fan_out` (peft sets it from the layer layout).
    pub fan_in_fan_out: bool,
    /// `bias`: which base biases train with the adapter (`"none"`, `"all"`, `"fourier_only"`).
    pub bias: TrainedBiases,
    /// `init_weights`: a zero spectrum; `false` (the default): standard normal.
    pub init_weights: bool,
}

impl Default for FourierftConfig {
    /// peft's defaults: 1000 frequencies, scaling 150, seed 777, random spectrum.
    fn default() -> Self {
        FourierftConfig {
            targets: TargetSpec::default(),
            n_frequency: 1000,
            n_frequency_pattern: Vec::new(),
            scaling: 150.0,
            random_loc_seed: 777,
            fan_in_fan_out: false,
            bias: TrainedBiases::None,
            init_weights: false,
        }
    }
}

/// Parses a FourierFT config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let d = FourierftConfig::default();
    let targets = TargetSpec::take_fields(fields, true)?;
    let n_frequency = fields.take_positive_usize("n_frequency", d.n_frequency)?;
    let n_frequency_pattern =
        fields.take_positive_usize_map("n_frequency_pattern", "a positive integer")?;
    let random_loc_seed = fields.take_seed("random_loc_seed", d.random_loc_seed)?;
    Ok(Box::new(FourierftConfig {
        targets,
        n_frequency,
        n_frequency_pattern,
        scaling: fields.take_f64("scaling", d.scaling)?,
        random_loc_seed,
        fan_in_fan_out: fields.take_bool("fan_in_fan_out", false)?,
        bias: TrainedBiases::take(fields, BIAS_ONLY)?,
        init_weights: fields.take_bool("init_weights", false)?,
    }))
}

impl MethodConfig for FourierftConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        out.insert("n_frequency".into(), Value::from(self.n_frequency));
        out.insert(
            "n_frequency_pattern".into(),
            Value::Object(
                self.n_frequency_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect(),
            ),
        );
        out.insert("scaling".into(), Value::from(self.scaling));
        out.insert("random_loc_seed".into(), Value::from(self.random_loc_seed));
        out.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        out.insert("bias".into(), Value::from(self.bias.as_str(BIAS_ONLY)));
        out.insert("init_weights".into(), Value::Bool(self.init_weights));
        out
    }

    peft_core::layer_method_casts!();
}

/// The angle tables of one layer shape and location set.
#[derive(Debug)]
struct Tables {
    /// `[in, 2n]`: `cos(2π c_k l / in)` then `sin(…)`.
    p_in: Tensor,
    /// `[2n, out]`: `cos(2π r_k j / out)` then `-sin(…)`.
    p_out: Tensor,
}

type TableKey = (usize, usize, u64, usize, String);

/// Tables shared by the layers (of any adapter) with the same shape, seed and count.
fn tables(out: usize, inp: usize, seed: u64, n: usize, device: &Device) -> Result<Arc<Tables>> {
    static CACHE: OnceLock<Mutex<HashMap<TableKey, Weak<Tables>>>> = OnceLock::new();
    let key = (out, inp, seed, n, format!("{device:?}"));
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = cache.get(&key).and_then(Weak::upgrade) {
        return Ok(t);
    }
    let locations = TorchGenerator::manual_seed(seed).randperm_prefix((out * inp) as u64, n);
    let (o, i) = (out as u64, inp as u64);
    let mut p_in = vec![0f32; inp * 2 * n];
    let mut p_out = vec![0f32; 2 * n * out];
    for (k, &loc) in locations.iter().enumerate() {
        let (r, c) = (loc / i, loc % i);
        for l in 0..i {
            // The angle's numerator reduced modulo the period first, for accuracy.
            let a = 2.0 * PI * ((c * l) % i) as f64 / i as f64;
            p_in[l as usize * 2 * n + k] = a.cos() as f32;
            p_in[l as usize * 2 * n + n + k] = a.sin() as f32;
        }
        for j in 0..o {
            let a = 2.0 * PI * ((r * j) % o) as f64 / o as f64;
            p_out[k * out + j as usize] = a.cos() as f32;
            p_out[(n + k) * out + j as usize] = -(a.sin() as f32);
        }
    }
    let t = Arc::new(Tables {
        p_in: Tensor::from_vec(p_in, (inp, 2 * n), device)?,
        p_out: Tensor::from_vec(p_out, (2 * n, out), device)?,
    });
    cache.retain(|_, w| w.strong_count() > 0);
    cache.insert(key, Arc::downgrade(&t));
    Ok(t)
}

/// FourierFT on one linear layer.
#[derive(Debug)]
pub struct Spectrum {
    /// `fourierft_spectrum`, `[n]`.
    spectrum: Tensor,
    tables: Arc<Tables>,
    /// `scaling / (out · in)`.
    factor: f64,
}

impl Spectrum {
    /// `[s, s] · factor`, `[2n]`.
    fn doubled(&self) -> Result<Tensor> {
        let s = self.spectrum.to_dtype(DType::F32)?;
        Ok((Tensor::cat(&[&s, &s], 0)? * self.factor)?)
    }
}

impl LinearAdapter for Spectrum {
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        let u = map_rows(x, self.tables.p_in.dim(0)?, y.dtype(), |x2| {
            let h = x2
                .matmul(&self.tables.p_in)?
                .broadcast_mul(&self.doubled()?)?;
            Ok(h.matmul(&self.tables.p_out)?)
        })?;
        Ok((y + u)?)
    }

    /// `W + ΔW`, `ΔW = P_outᵀ diag([s, s]) P_inᵀ · factor`.
    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let scaled = self
            .tables
            .p_out
            .t()?
            .broadcast_mul(&self.doubled()?.unsqueeze(0)?)?;
        let dw = scaled.matmul(&self.tables.p_in.t()?)?;
        Ok(((weight + dw)?, bias.cloned()))
    }
}

impl LayerMethod for FourierftConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's FourierFT mapping is a copy of LoRA's.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        peft_core::low_rank::default_targets(model_type)
    }

    /// peft sets `fan_in_fan_out` to each targeted layer's layout, the last one winning.
    fn observe_weight_layout(&mut self, transposed: bool) {
        self.fan_in_fan_out = transposed;
    }

    fn trained_biases(&self) -> TrainedBiases {
        self.bias
    }

    fn tuner_class_name(&self) -> String {
        "FourierFTModel".into()
    }

    fn layer_class_name(&self, _embedding: bool) -> String {
        "fourierft.FourierFTLinear".into()
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        let (inp, out) = (base.in_features(), base.out_features());
        let n = pattern_value_dotted(&self.n_frequency_pattern, path)
            .copied()
            .unwrap_or(self.n_frequency);
        if n > inp * out {
            return Err(PeftError::config_value(
                "adapter config",
                "n_frequency",
                format!(
                    "at most the {out} x {inp} = {} weights of `{path}`",
                    inp * out
                ),
                n,
            ));
        }
        let init = if self.init_weights {
            Init::Zeros
        } else {
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            }
        };
        Ok(Box::new(Spectrum {
            spectrum: params.get(&[n], "fourierft_spectrum", init)?,
            tables: tables(out, inp, self.random_loc_seed, n, params.device())?,
            factor: self.scaling / (out * inp) as f64,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The factored update equals the real part of the dense inverse DFT of the spectrum,
    /// computed here term by term: `ΔW[j,l] = f Σ_k s_k cos(2π(j r_k/out + l c_k/in))`.
    #[test]
    fn factored_update_is_the_inverse_dft() {
        let (out, inp, n) = (6, 5, 7);
        let t = tables(out, inp, 3, n, &Device::Cpu).unwrap();
        let s: Vec<f32> = (0..n).map(|k| k as f32 * 0.3 - 1.0).collect();
        let layer = Spectrum {
            spectrum: Tensor::new(s.clone(), &Device::Cpu).unwrap(),
            tables: t,
            factor: 2.0,
        };
        let zero = Tensor::zeros((out, inp), DType::F32, &Device::Cpu).unwrap();
        let (dw, _) = layer.merge(&zero, None, &zero).unwrap();
        let dw: Vec<Vec<f32>> = dw.to_vec2().unwrap();
        let locs = TorchGenerator::manual_seed(3).randperm_prefix((out * inp) as u64, n);
        for (j, row) in dw.iter().enumerate() {
            for (l, &got) in row.iter().enumerate() {
                let want: f64 = locs
                    .iter()
                    .zip(&s)
                    .map(|(&loc, &sk)| {
                        let (r, c) = ((loc / inp as u64) as f64, (loc % inp as u64) as f64);
                        let a = 2.0 * PI * (j as f64 * r / out as f64 + l as f64 * c / inp as f64);
                        sk as f64 * a.cos()
                    })
                    .sum::<f64>()
                    * 2.0;
                assert!(
                    (got as f64 - want).abs() < 1e-5,
                    "[{j}, {l}]: {got} vs {want}"
                );
            }
        }
    }
}
