//! `peft-c3a`: C3A (circular convolution adaptation, Chen et al. 2024) for peft-rs,
//! checkpoint-compatible with peft's `C3AConfig` (`peft_type` `C3A`).
//!
//! Each targeted linear layer trains `c3a_kernel` `[out/b, in/b, b]`: one length-`b` kernel per
//! `b × b` block of the weight update, whose block is the circulant matrix peft's FFTs apply,
//! `ΔW[m·b + k, n·b + t] = w[m, n, (t - k) mod b] / in` (peft's
//! `fft(ifft(x) ⊙ fft(w)).real / in`, a circular correlation). Here `ΔW` is gathered from the
//! kernel (differentiably) and applied as a weight update; merging adds it.
//!
//! `init_weights`: `"xavier_uniform"` / `false` (peft's default), `"kaiming_uniform"`,
//! `"gaussian"`, or `true` (zero: a no-op adapter). `block_size_pattern` overrides `block_size`
//! per module (peft's `.*\.{key}$` rule); the block size must divide both dimensions.
//!
//! Written only against `peft-core`'s public API (a `DeltaWeight` in core's `DeltaLinear`). GPT-2's
//! Conv1D layers are refused, as peft refuses them.

use candle_core::{DType, Tensor};
use peft_core::delta::{require_linear_layout, DeltaLinear, DeltaWeight, Drops};
use peft_core::json::ConfigFields;
use peft_core::targets::pattern_value_dotted;
use peft_core::{
    CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike, MethodConfig, MethodRegistration,
    ParamBuilder, PeftError, Result, TargetModules, TargetSpec, TrainedBiases,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "C3A";

/// The `bias` value naming the adapted layers' biases.
const BIAS_ONLY: &str = "c3a_only";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "C3A: block-circulant weight updates (circular convolutions) on linear layers",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// C3A's `init_weights`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum C3aInit {
    /// `true`: zero.
    Zero,
    /// `"xavier_uniform"` (`false` reads as this too, as in peft).
    XavierUniform,
    /// `"kaiming_uniform"`.
    KaimingUniform,
    /// `"gaussian"`: standard normal.
    Gaussian,
}

/// The C3A configuration (peft's `C3AConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct C3aConfig {
    /// Module selection (`target_modules`, `layers_to_transform`, `layers_pattern`,
    /// `modules_to_save`; peft's C3A has no `exclude_modules`).
    pub targets: TargetSpec,
    /// `block_size`.
    pub block_size: usize,
    /// `block_size_pattern`, in file order.
    pub block_size_pattern: Vec<(String, usize)>,
    /// `init_weights`.
    pub init: C3aInit,
    /// `init_weights` was written `false` (kept for the file).
    pub init_written_false: bool,
    /// `bias`.
    pub bias: TrainedBiases,
}

impl Default for C3aConfig {
    /// peft's defaults: blocks of 256, Xavier-uniform kernels.
    fn default() -> Self {
        C3aConfig {
            targets: TargetSpec::default(),
            block_size: 256,
            block_size_pattern: Vec::new(),
            init: C3aInit::XavierUniform,
            init_written_false: false,
            bias: TrainedBiases::None,
        }
    }
}

/// Parses a C3A config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let d = C3aConfig::default();
    let targets = TargetSpec::take_fields(fields, true)?;
    let block_size = fields.take_positive_usize("block_size", d.block_size)?;
    let block_size_pattern =
        fields.take_positive_usize_map("block_size_pattern", "a positive integer")?;
    let (init, init_written_false) = match fields.take_raw("init_weights") {
        None | Some(Value::Null) => (C3aInit::XavierUniform, false),
        Some(Value::Bool(true)) => (C3aInit::Zero, false),
        Some(Value::Bool(false)) => (C3aInit::XavierUniform, true),
        Some(Value::String(s)) if s == "xavier_uniform" => (C3aInit::XavierUniform, false),
        Some(Value::String(s)) if s == "kaiming_uniform" => (C3aInit::KaimingUniform, false),
        Some(Value::String(s)) if s == "gaussian" => (C3aInit::Gaussian, false),
        Some(v) => {
            return Err(fields.type_error(
                "init_weights",
                "true, false, \"xavier_uniform\", \"kaiming_uniform\" or \"gaussian\"",
                &v,
            ))
        }
    };
    Ok(Box::new(C3aConfig {
        targets,
        block_size,
        block_size_pattern,
        init,
        init_written_false,
        bias: TrainedBiases::take(fields, BIAS_ONLY)?,
    }))
}

impl MethodConfig for C3aConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        // C3AConfig has no `exclude_modules` field.
        out.remove("exclude_modules");
        out.insert("block_size".into(), Value::from(self.block_size));
        out.insert(
            "block_size_pattern".into(),
            Value::Object(
                self.block_size_pattern
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::from(*v)))
                    .collect(),
            ),
        );
        out.insert(
            "init_weights".into(),
            match (self.init, self.init_written_false) {
                (C3aInit::Zero, _) => Value::Bool(true),
                (C3aInit::XavierUniform, true) => Value::Bool(false),
                (C3aInit::XavierUniform, false) => Value::from("xavier_uniform"),
                (C3aInit::KaimingUniform, _) => Value::from("kaiming_uniform"),
                (C3aInit::Gaussian, _) => Value::from("gaussian"),
            },
        );
        out.insert("bias".into(), Value::from(self.bias.as_str(BIAS_ONLY)));
        out
    }

    peft_core::layer_method_casts!();
}

/// C3A's kernels on one linear layer.
#[derive(Debug)]
pub struct Circulant {
    /// `c3a_kernel`, `[out/b, in/b, b]`.
    kernel: Tensor,
    /// `(t - k) mod b` for `k, t < b`, flattened row-major (`k` the output row in a block).
    index: Tensor,
}

impl DeltaWeight for Circulant {
    /// `ΔW[m·b + k, n·b + t] = w[m, n, (t - k) mod b] / in`.
    fn delta_weight(&self) -> Result<Tensor> {
        let (m, n, b) = self.kernel.dims3()?;
        let w = self.kernel.to_dtype(DType::F32)?;
        let blocks = w
            .index_select(&self.index, 2)?
            .reshape((m, n, b, b))?
            .permute((0, 2, 1, 3))?
            .contiguous()?
            .reshape((m * b, n * b))?;
        Ok((blocks / (n * b) as f64)?)
    }
}

impl LayerMethod for C3aConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's C3A mapping: LoRA's, with `mlp.c_proj` for GPT-2 and GPTBigCode.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        if matches!(model_type, "gpt2" | "gpt_bigcode") {
            return Some(TargetModules::List(vec!["mlp.c_proj".into()]));
        }
        peft_core::low_rank::default_targets(model_type)
    }

    fn trained_biases(&self) -> TrainedBiases {
        self.bias
    }

    fn tuner_class_name(&self) -> String {
        "C3AModel".into()
    }

    fn layer_class_name(&self, _embedding: bool) -> String {
        "c3a.C3ALinear".into()
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        require_linear_layout(path, base, PEFT_TYPE)?;
        let (inp, out) = (base.in_features(), base.out_features());
        let b = pattern_value_dotted(&self.block_size_pattern, path)
            .copied()
            .unwrap_or(self.block_size);
        if !inp.is_multiple_of(b) || !out.is_multiple_of(b) {
            return Err(PeftError::config_value(
                "adapter config",
                "block_size",
                format!("a divisor of both dimensions of `{path}` ([{out}, {inp}])"),
                b,
            ));
        }
        let init = match self.init {
            C3aInit::Zero => Init::Zeros,
            C3aInit::Gaussian => Init::Normal {
                mean: 0.0,
                std: 1.0,
            },
            C3aInit::XavierUniform => {
                let a = (3.0f64).sqrt() * (2.0 / (inp + out) as f64).sqrt();
                Init::Uniform { low: -a, high: a }
            }
            C3aInit::KaimingUniform => {
                let a = (1.0 / inp as f64).sqrt();
                Init::Uniform { low: -a, high: a }
            }
        };
        let kernel = params.get(&[out / b, inp / b, b], "c3a_kernel", init)?;
        let index: Vec<u32> = (0..b)
            .flat_map(|k| (0..b).map(move |t| ((t + b - k) % b) as u32))
            .collect();
        let index = Tensor::from_vec(index, b * b, params.device())?;
        Ok(Box::new(DeltaLinear::new(
            Circulant { kernel, index },
            Drops::none(),
        )))
    }
}
