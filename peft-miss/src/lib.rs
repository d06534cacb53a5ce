//! `peft-miss`: MiSS (matrix shard sharing, Kang & Yin 2024; peft's successor of Bone) for
//! peft-rs, checkpoint-compatible with peft's `MissConfig` (`peft_type` `MISS`).
//!
//! Each targeted linear layer trains one shard `miss_block` that is shared by every block of
//! `r` input columns: with `init_weights=true` (a zero `[r, out]` shard, peft's default) or
//! `false` (the same, random), `ΔW[o, b·r + i] = miss[i, o]` for every block `b` (a last,
//! partial block takes the leading rows), computed in the forward pass as
//! `(Σ_b x_b) · miss` over the `r`-wide chunks of the input (zero-padded), `O(in + r·out)` a
//! row. `"mini"`: a `[r, mini_r]` shard tiled along the outputs. `"bat"`: a `[out/r, r, r]`
//! shard per row block that also multiplies the frozen weight's blocks,
//! `ΔW_pq = W_pq B_p + B_p`, recomputed from the base weight in each forward pass as peft
//! does. Merging adds `ΔW`. `miss_dropout` applies to the input in training (not with `"bat"`,
//! as in peft).
//!
//! Written only against `peft-core`'s public API. GPT-2's Conv1D layers are refused, as peft
//! refuses them.

use candle_core::{DType, Tensor};
use peft_core::delta::{map_rows, require_linear_layout};
use peft_core::json::ConfigFields;
use peft_core::nn::Dropout;
use peft_core::{
    CommonConfig, Init, LayerMethod, LinearAdapter, LinearLike, MethodConfig, MethodRegistration,
    ParamBuilder, PeftError, Result, TargetModules, TargetSpec, TrainedBiases,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "MISS";

/// The `bias` value naming the adapted layers' biases.
const BIAS_ONLY: &str = "MiSS_only";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "MiSS: one trained weight shard shared by every block of a linear layer",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// MiSS's `init_weights`: the variant and its initialisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MissInit {
    /// `true`: the shared `[r, out]` shard, zero.
    Zero,
    /// `false`: the shared shard, torch's `kaiming_uniform_(a=√5)`.
    Random,
    /// `"bat"`: block-affine shards `[out/r, r, r]`, zero.
    Bat,
    /// `"mini"`: a `[r, mini_r]` shard tiled along the outputs, zero.
    Mini,
}

/// The MiSS configuration (peft's `MissConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct MissConfig {
    /// Module selection (`target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `modules_to_save`).
    pub targets: TargetSpec,
    /// `r`: the shard's width along the input.
    pub r: usize,
    /// `miss_dropout`.
    pub miss_dropout: f64,
    /// `mini_r`: the shard's width along the output with `"mini"`.
    pub mini_r: usize,
    /// `init_weights`.
    pub init: MissInit,
    /// `bias`: which base biases train with the adapter.
    pub bias: TrainedBiases,
}

impl Default for MissConfig {
    /// peft's defaults: `r=64`, `mini_r=1`, a zero shard.
    fn default() -> Self {
        MissConfig {
            targets: TargetSpec::default(),
            r: 64,
            miss_dropout: 0.0,
            mini_r: 1,
            init: MissInit::Zero,
            bias: TrainedBiases::None,
        }
    }
}

/// Parses a MiSS config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let d = MissConfig::default();
    let targets = TargetSpec::take_fields(fields, true)?;
    let r = fields.take_positive_usize("r", d.r)?;
    let mini_r = fields.take_positive_usize("mini_r", d.mini_r)?;
    let miss_dropout = fields.take_probability("miss_dropout", 0.0)?;
    let init = match fields.take_raw("init_weights") {
        None | Some(Value::Null) | Some(Value::Bool(true)) => MissInit::Zero,
        Some(Value::Bool(false)) => MissInit::Random,
        Some(Value::String(s)) if s == "bat" => MissInit::Bat,
        Some(Value::String(s)) if s == "mini" => MissInit::Mini,
        Some(v) => {
            return Err(fields.type_error("init_weights", "true, false, \"bat\" or \"mini\"", &v))
        }
    };
    Ok(Box::new(MissConfig {
        targets,
        r,
        miss_dropout,
        mini_r,
        init,
        bias: TrainedBiases::take(fields, BIAS_ONLY)?,
    }))
}

impl MethodConfig for MissConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        out.insert("r".into(), Value::from(self.r));
        out.insert("miss_dropout".into(), Value::from(self.miss_dropout));
        out.insert("mini_r".into(), Value::from(self.mini_r));
        out.insert(
            "init_weights".into(),
            match self.init {
                MissInit::Zero => Value::Bool(true),
                MissInit::Random => Value::Bool(false),
                MissInit::Bat => Value::from("bat"),
                MissInit::Mini => Value::from("mini"),
            },
        );
        out.insert("bias".into(), Value::from(self.bias.as_str(BIAS_ONLY)));
        out
    }

    peft_core::layer_method_casts!();
}

/// MiSS on one linear layer.
#[derive(Debug)]
pub struct MissLinear {
    /// `miss_block`: `[r, out]`, `[r, mini_r]` or `[out/r, r, r]`.
    block: Tensor,
    init: MissInit,
    r: usize,
    in_features: usize,
    out_features: usize,
    dropout: Dropout,
}

impl MissLinear {
    /// The shared shard `[r, out]` (the `"mini"` shard tiled).
    fn shard(&self) -> Result<Tensor> {
        let b = self.block.to_dtype(DType::F32)?;
        Ok(match self.init {
            MissInit::Mini => b.repeat((1, self.out_features / b.dim(1)?))?,
            _ => b,
        })
    }

    /// `"bat"`'s `ΔW` `[out, in]` for the weight `w` `[out, in]`: `W_pq B_p + B_p` per block.
    fn bat_delta(&self, w: &Tensor) -> Result<Tensor> {
        let (out, inp, r) = (self.out_features, self.in_features, self.r);
        let b = self.block.to_dtype(DType::F32)?; // [out/r, r, r]
        let blocks = w
            .to_dtype(DType::F32)?
            .reshape((out / r, r, inp / r, r))?
            .permute((2, 0, 1, 3))?
            .contiguous()?; // [in/r, out/r, r, r]
        let b4 = b.unsqueeze(0)?.broadcast_as(blocks.shape())?.contiguous()?;
        let result = (blocks.matmul(&b4)? + &b4)?;
        Ok(result
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((out, inp))?)
    }

    /// The shared-shard `ΔW` `[out, in]`: `missᵀ` repeated along the input, truncated.
    fn shard_delta(&self) -> Result<Tensor> {
        let t = self.shard()?.t()?; // [out, r]
        let reps = self.in_features.div_ceil(self.r);
        Ok(t.repeat((1, reps))?.narrow(1, 0, self.in_features)?)
    }
}

impl LinearAdapter for MissLinear {
    fn adapt_output(
        &self,
        base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        let (inp, r) = (self.in_features, self.r);
        let update = map_rows(x, inp, y.dtype(), |x2| {
            if self.init == MissInit::Bat {
                return Ok(x2.matmul(&self.bat_delta(&base.weight()?)?.t()?)?);
            }
            let x2 = self.dropout.forward(&x2, training)?;
            let blocks = inp.div_ceil(r);
            let x2 = if blocks * r != inp {
                x2.pad_with_zeros(1, 0, blocks * r - inp)?
            } else {
                x2
            };
            let rows = x2.dim(0)?;
            let summed = x2.reshape((rows, blocks, r))?.sum(1)?;
            Ok(summed.matmul(&self.shard()?)?)
        })?;
        Ok((y + update)?)
    }

    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dw = if self.init == MissInit::Bat {
            self.bat_delta(weight)?
        } else {
            self.shard_delta()?
        };
        Ok(((weight + dw)?, bias.cloned()))
    }
}

impl LayerMethod for MissConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's MiSS mapping is a copy of LoRA's.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        peft_core::low_rank::default_targets(model_type)
    }

    fn trained_biases(&self) -> TrainedBiases {
        self.bias
    }

    fn tuner_class_name(&self) -> String {
        "MissModel".into()
    }

    fn layer_class_name(&self, _embedding: bool) -> String {
        "miss.MissLinear".into()
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        require_linear_layout(path, base, PEFT_TYPE)?;
        let (inp, out, r) = (base.in_features(), base.out_features(), self.r);
        let refuse = |expected: String| {
            Err(PeftError::config_value(
                "adapter config",
                "r",
                format!("{expected} (layer `{path}`, [{out}, {inp}])"),
                r,
            ))
        };
        if r > inp {
            return refuse(format!("at most in_features = {inp}"));
        }
        let (shape, init) = match self.init {
            MissInit::Zero => (vec![r, out], Init::Zeros),
            MissInit::Random => (vec![r, out], Init::kaiming_uniform_linear(out)),
            MissInit::Bat => {
                if !inp.is_multiple_of(r) || !out.is_multiple_of(r) {
                    return refuse(
                        "a divisor of both in_features and out_features (\"bat\")".into(),
                    );
                }
                (vec![out / r, r, r], Init::Zeros)
            }
            MissInit::Mini => {
                if !out.is_multiple_of(self.mini_r) {
                    return Err(PeftError::config_value(
                        "adapter config",
                        "mini_r",
                        format!("a divisor of out_features = {out} (layer `{path}`)"),
                        self.mini_r,
                    ));
                }
                (vec![r, self.mini_r], Init::Zeros)
            }
        };
        Ok(Box::new(MissLinear {
            block: params.get(&shape, "miss_block", init)?,
            init: self.init,
            r,
            in_features: inp,
            out_features: out,
            dropout: Dropout::new(self.miss_dropout, params.seed("miss_dropout")),
        }))
    }
}
