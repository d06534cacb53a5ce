//! `peft-ia3`: IA3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations") for
//! peft-rs, checkpoint-compatible with peft's `IA3Config` (`peft_type` `IA3`).
//!
//! IA3 learns one vector per targeted linear layer: attention layers rescale their output
//! (`y = base(x) * l`, `l` stored `[out, 1]`), feed-forward layers rescale their input
//! (`y = base(x * l)`, `l` stored `[1, in]`). Vectors start at one, so the adapter starts as a
//! no-op; merging multiplies them into the weights.
//!
//! This crate is written only against `peft-core`'s public API, exactly as a third party
//! would write a method: see this crate's README for the recipe.

pub mod config;

use candle_core::{DType, Tensor};
use peft_core::{
    Init, LayerMethod, LinearAdapter, LinearLike, MethodRegistration, ModelInfo, ParamBuilder,
    PeftError, Result, TargetModules, TargetSpec, TaskType,
};

pub use config::{FeedforwardModules, Ia3Config};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "IA3";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "IA3: learned vectors rescaling attention outputs and feed-forward inputs",
    crate_name: env!("CARGO_PKG_NAME"),
    parse: config::parse,
});

fn names(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// peft's `TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING` and
/// `TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING` (peft 0.21): `(targets, feed-forward)`.
pub fn default_modules(model_type: &str) -> Option<(Vec<String>, Vec<String>)> {
    let (targets, ff): (&[&str], &[&str]) = match model_type {
        "t5" => (&["k", "v", "wo"], &["wo"]),
        "mt5" => (&["k", "v", "wi_1"], &[]),
        "gpt2" | "gpt_bigcode" => (&["c_attn", "mlp.c_proj"], &["mlp.c_proj"]),
        "bloom" => (
            &["query_key_value", "mlp.dense_4h_to_h"],
            &["mlp.dense_4h_to_h"],
        ),
        "roberta" | "bert" => (&["key", "value", "output.dense"], &["output.dense"]),
        "opt" => (&["q_proj", "k_proj", "fc2"], &["fc2"]),
        "gptj" => (&["q_proj", "v_proj", "fc_out"], &["fc_out"]),
        "gpt_neox" | "RefinedWebModel" | "RefinedWeb" | "falcon" => {
            (&["query_key_value", "dense_4h_to_h"], &["dense_4h_to_h"])
        }
        "gpt_neo" => (&["q_proj", "v_proj", "c_proj"], &["c_proj"]),
        "bart" => (&["q_proj", "v_proj", "fc2"], &["fc2"]),
        "llama" | "mistral" => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        "llama4" | "gemma" | "gemma2" | "gemma3_text" | "qwen2" | "qwen3" => {
            (&["q_proj", "v_proj", "down_proj"], &["down_proj"])
        }
        "mixtral" => (&["k_proj", "v_proj", "w2"], &["w2"]),
        "deberta-v2" => (
            &["key_proj", "value_proj", "output.dense"],
            &["output.dense"],
        ),
        "deberta" => (&["in_proj", "output.dense"], &["output.dense"]),
        "phi" => (&["q_proj", "v_proj", "fc2"], &["fc2"]),
        _ => return None,
    };
    Some((names(targets), names(ff)))
}

/// IA3 on one linear layer.
#[derive(Debug)]
pub struct Ia3Linear {
    /// `[out, 1]` for attention layers, `[1, in]` for feed-forward layers.
    l: Tensor,
    feedforward: bool,
}

impl Ia3Linear {
    /// Builds (or loads) `ia3_l` under `params`.
    pub fn new(
        params: &ParamBuilder,
        base: &dyn LinearLike,
        feedforward: bool,
        init_ones: bool,
    ) -> Result<Self> {
        let shape = if feedforward {
            [1, base.in_features()]
        } else {
            [base.out_features(), 1]
        };
        let init = if init_ones {
            Init::Ones
        } else {
            Init::Normal {
                mean: 0.0,
                std: 1.0,
            }
        };
        Ok(Ia3Linear {
            l: params.get(&shape, "ia3_l", init)?,
            feedforward,
        })
    }

    fn scale(&self, t: &Tensor) -> Result<Tensor> {
        let v = self.l.flatten_all()?;
        let scaled = t.to_dtype(DType::F32)?.broadcast_mul(&v)?;
        Ok(scaled.to_dtype(t.dtype())?)
    }
}

impl LinearAdapter for Ia3Linear {
    fn adapt_input(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if self.feedforward {
            Ok(Some(self.scale(x)?))
        } else {
            Ok(None)
        }
    }

    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        _x: &Tensor,
        y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        if self.feedforward {
            Ok(y)
        } else {
            self.scale(&y)
        }
    }

    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = weight.broadcast_mul(&self.l)?;
        let b = match (self.feedforward, bias) {
            (false, Some(b)) => Some(b.mul(&self.l.flatten_all()?)?),
            (_, b) => b.cloned(),
        };
        Ok((w, b))
    }
}

impl LayerMethod for Ia3Config {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        default_modules(model_type).map(|(t, _)| TargetModules::List(t))
    }

    fn observe_weight_layout(&mut self, transposed: bool) {
        // As peft: the config follows the layers' layout (Conv1D stores [in, out]).
        self.fan_in_fan_out = transposed;
    }

    fn condense_long_target_lists(&self) -> bool {
        // peft skips this for IA3: targets and feed-forward modules are coupled.
        false
    }

    fn prepare(&mut self, info: &ModelInfo, _task_type: Option<TaskType>) -> Result<()> {
        if self.feedforward_modules.is_none() {
            let (_, ff) =
                default_modules(&info.model_type).ok_or_else(|| PeftError::MissingKey {
                    source_name: "adapter config".into(),
                    key: "feedforward_modules".into(),
                    expected: format!(
                        "feed-forward module names: IA3 has no defaults for model_type `{}`",
                        info.model_type
                    ),
                })?;
            self.feedforward_modules = Some(FeedforwardModules::List(ff));
        }
        Ok(())
    }

    fn combined_config(
        &self,
        inputs: &[&dyn peft_core::MethodConfig],
        how: &mut peft_core::Combination,
    ) -> Result<Box<dyn peft_core::MethodConfig>> {
        match how.kind {
            None | Some(peft_core::CombinationType::Linear) => {
                how.kind = Some(peft_core::CombinationType::Linear)
            }
            Some(other) => {
                return Err(PeftError::InvalidState(format!(
                    "IA3 adapters combine linearly only (peft's IA3 add_weighted_adapter has no combination_type); got {other}"
                )))
            }
        }
        let configs = inputs
            .iter()
            .map(|c| {
                c.as_any()
                    .downcast_ref::<Ia3Config>()
                    .ok_or_else(|| PeftError::InvalidState(format!("{} is not IA3", c.peft_type())))
            })
            .collect::<Result<Vec<_>>>()?;
        let union = peft_core::combine::union_target_modules;
        let targets: Vec<Option<&TargetModules>> = configs
            .iter()
            .map(|c| c.targets.target_modules.as_ref())
            .collect();
        let mut new = configs[0].clone();
        new.targets.target_modules = Some(union(&targets, "target_modules")?);
        // feedforward_modules unite as target_modules do (a list, or a regex).
        let feedforward: Vec<Option<TargetModules>> = configs
            .iter()
            .map(|c| {
                c.feedforward_modules.as_ref().map(|f| match f {
                    FeedforwardModules::List(names) => TargetModules::List(names.clone()),
                    FeedforwardModules::Regex(r) => TargetModules::Regex(r.clone()),
                })
            })
            .collect();
        let feedforward: Vec<Option<&TargetModules>> =
            feedforward.iter().map(Option::as_ref).collect();
        new.feedforward_modules = Some(match union(&feedforward, "feedforward_modules")? {
            TargetModules::Regex(r) => FeedforwardModules::Regex(r),
            TargetModules::List(names) => FeedforwardModules::List(names),
            TargetModules::AllLinear => {
                return Err(PeftError::InvalidState(
                    "feedforward_modules cannot be \"all-linear\"".into(),
                ))
            }
        });
        Ok(Box::new(new))
    }

    /// peft: `ia3_l = Σ w_i ia3_l_i` over the adapters that adapt the module.
    fn combine_module(
        &self,
        _path: &str,
        parts: &[peft_core::CombinePart<'_>],
        target: &std::collections::BTreeMap<String, Tensor>,
        _how: &peft_core::Combination,
    ) -> Result<std::collections::BTreeMap<String, Tensor>> {
        let current = target.get("ia3_l").ok_or_else(|| {
            PeftError::InvalidState("the combined adapter has no ia3_l here".into())
        })?;
        let mut sum = current.zeros_like()?;
        for part in parts {
            let l = part.params.get("ia3_l").ok_or_else(|| {
                PeftError::InvalidState(format!("adapter `{}` has no ia3_l here", part.adapter))
            })?;
            if l.dims() != current.dims() {
                return Err(PeftError::InvalidState(format!(
                    "adapter `{}`: ia3_l is {:?} here but the combined one is {:?} (a feed-forward module in one adapter and not in another?)",
                    part.adapter,
                    l.dims(),
                    current.dims()
                )));
            }
            sum = (sum + (l.to_dtype(DType::F32)? * part.weight)?)?;
        }
        Ok([("ia3_l".to_string(), sum)].into_iter().collect())
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        let feedforward = self.is_feedforward(path);
        Ok(Box::new(Ia3Linear::new(
            params,
            base,
            feedforward,
            self.init_ia3_weights,
        )?))
    }
}
