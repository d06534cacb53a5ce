//! `peft-lora`: LoRA for peft-rs, checkpoint-compatible with Python peft's `LoraConfig`.
//!
//! LoRA freezes a layer's weight `W` and learns a low-rank update: `y = W x + B A x * scaling`
//! with `A: [r, in]`, `B: [out, r]`, `scaling = lora_alpha / r` (or `lora_alpha / sqrt(r)`
//! with rsLoRA). This crate supplies only what is specific to LoRA (the config, the layers,
//! the per-architecture default targets) and registers `peft_type` `LORA` with `peft-core`'s
//! registry; core does the matching, injection, counting, saving, loading and merging.

pub mod combine;
pub mod config;
pub mod convert;
mod fused;
pub mod layer;

use peft_core::layers::{EmbeddingLike, LinearLike};
use peft_core::{
    EmbeddingAdapter, LayerMethod, LinearAdapter, MethodRegistration, ParamBuilder, PeftError,
    Result, TargetModules, TargetSpec,
};

pub use config::{InitLoraWeights, LoraBias, LoraConfig};
pub use layer::{LoraEmbedding, LoraLinear};
use peft_core::low_rank::LowRank as _;

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "LORA";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "LoRA: trainable low-rank updates B·A on chosen linear and embedding layers",
    crate_name: env!("CARGO_PKG_NAME"),
    parse: config::parse,
});

/// peft's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` (peft 0.21), which the other
/// low-rank methods share ([`peft_core::low_rank::default_targets`]).
pub fn default_target_modules(model_type: &str) -> Option<TargetModules> {
    peft_core::low_rank::default_targets(model_type)
}

impl LoraConfig {
    fn check_init_for(&self, params: &ParamBuilder) -> Result<()> {
        if let InitLoraWeights::Other(name) = &self.init_lora_weights {
            let loadable = params.is_loading() && self.init_lora_weights.loadable();
            if !loadable {
                return Err(PeftError::Unsupported {
                    source_name: "adapter config".into(),
                    key: "init_lora_weights".into(),
                    value: format!("\"{name}\""),
                    reason: if params.is_loading() {
                        "this initialisation rewrites the base weights in a way not reproduced here; save the \
                         adapter from peft with `path_initial_model_for_weight_conversion` to get a plain LoRA checkpoint"
                            .into()
                    } else {
                        match name.as_str() {
                            "eva" => "EVA initialises A from activations of training data (peft's \
                                      `initialize_lora_eva_weights` over a data loader), which is not \
                                      implemented; initialise in peft and load the adapter"
                                .into(),
                            "loftq" => "LoftQ (quantization-aware initialisation) is not implemented; \
                                        initialise with peft's `replace_lora_weights_loftq` and load the adapter"
                                .into(),
                            _ => "only true, false, \"gaussian\", \"orthogonal\", \"pissa\", \
                                  \"pissa_niter_N\" and \"olora\" can initialise a new adapter here"
                                .into(),
                        }
                    },
                });
            }
        }
        Ok(())
    }
}

impl LayerMethod for LoraConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        default_target_modules(model_type)
    }

    fn observe_weight_layout(&mut self, transposed: bool) {
        if self.fan_in_fan_out != transposed {
            tracing::warn!(
                "fan_in_fan_out is {} but a target layer stores its weight {}; setting fan_in_fan_out to {transposed}",
                self.fan_in_fan_out,
                if transposed { "[in, out] (Conv1D)" } else { "[out, in]" }
            );
            self.fan_in_fan_out = transposed;
        }
    }

    fn trained_biases(&self) -> peft_core::TrainedBiases {
        match self.bias {
            LoraBias::None => peft_core::TrainedBiases::None,
            LoraBias::All => peft_core::TrainedBiases::All,
            LoraBias::LoraOnly => peft_core::TrainedBiases::TargetsOnly,
        }
    }

    fn tuner_class_name(&self) -> String {
        "LoraModel".into()
    }

    fn layer_class_name(&self, embedding: bool) -> String {
        if embedding {
            "lora.Embedding"
        } else {
            "lora.Linear"
        }
        .to_string()
    }

    fn hotswap_config(
        &self,
        new: &dyn peft_core::MethodConfig,
        resized: &[String],
    ) -> Result<Box<dyn peft_core::MethodConfig>> {
        let new = new.as_any().downcast_ref::<LoraConfig>().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "Incompatible PEFT types found: LORA and {}",
                new.peft_type()
            ))
        })?;
        // peft's CONFIG_KEYS_TO_CHECK for LoRA: what changes outputs besides the weights.
        let old_json = peft_core::MethodConfig::to_json_fields(self);
        let new_json = peft_core::MethodConfig::to_json_fields(new);
        for key in ["use_rslora", "lora_dropout", "alpha_pattern", "use_dora"] {
            if old_json.get(key) != new_json.get(key) {
                return Err(PeftError::InvalidState(format!(
                    "Configs are incompatible for hot-swapping: for {key}, {} != {}",
                    old_json.get(key).cloned().unwrap_or_default(),
                    new_json.get(key).cloned().unwrap_or_default()
                )));
            }
        }
        // A module padded (or zero-filled) to the loaded rank keeps the new adapter's scaling:
        // record the loaded rank and the alpha that gives that scaling at it, so that the saved
        // adapter reloads to the same outputs.
        let mut swapped = new.clone();
        let mut ranks = Vec::new();
        let mut alphas = Vec::new();
        for path in resized {
            let loaded_rank = &self.rank_and_alpha(path).0;
            let (r, alpha) = new.rank_and_alpha(path);
            if r == *loaded_rank {
                continue;
            }
            let scaling = new.scaling(r, alpha);
            let alpha_at = if new.use_rslora {
                scaling * (*loaded_rank as f64).sqrt()
            } else {
                scaling * *loaded_rank as f64
            };
            ranks.push((path.clone(), *loaded_rank));
            alphas.push((
                path.clone(),
                serde_json::Number::from_f64(alpha_at).ok_or_else(|| {
                    PeftError::InvalidState(format!("{path}: alpha {alpha_at} is not finite"))
                })?,
            ));
        }
        ranks.append(&mut swapped.rank_pattern);
        alphas.append(&mut swapped.alpha_pattern);
        swapped.rank_pattern = ranks;
        swapped.alpha_pattern = alphas;
        Ok(Box::new(swapped))
    }

    fn conversion_initial_config(&self) -> Result<Box<dyn peft_core::MethodConfig>> {
        Ok(convert::initial_config(self))
    }

    fn convert_from_initial(
        &self,
        trained: &[(String, candle_core::Tensor)],
        initial: &[(String, candle_core::Tensor)],
    ) -> Result<peft_core::ConvertedAdapter> {
        convert::convert(self, trained, initial)
    }

    fn combined_config(
        &self,
        inputs: &[&dyn peft_core::MethodConfig],
        how: &mut peft_core::Combination,
    ) -> Result<Box<dyn peft_core::MethodConfig>> {
        combine::combined_config(inputs, how)
    }

    fn combine_module(
        &self,
        path: &str,
        parts: &[peft_core::CombinePart<'_>],
        target: &std::collections::BTreeMap<String, candle_core::Tensor>,
        how: &peft_core::Combination,
    ) -> Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        combine::combine_module(path, parts, target, how)
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        self.check_init_for(params)?;
        let (r, alpha) = self.rank_and_alpha(path);
        let layer = if self.init_lora_weights.rewrites_base() {
            LoraLinear::decomposed(
                params,
                path,
                base,
                r,
                self.scaling(r, alpha),
                self.lora_dropout,
                &self.init_lora_weights,
                params.seed("lora_dropout"),
            )?
        } else {
            LoraLinear::new(
                params,
                base.in_features(),
                base.out_features(),
                r,
                self.scaling(r, alpha),
                self.lora_dropout,
                &self.init_lora_weights,
                params.seed("lora_dropout"),
            )?
        };
        let layer = if self.lora_bias {
            if base.bias().is_none() {
                tracing::warn!(
                    "{path}: lora_bias=true on a layer without a bias; the adapter cannot be merged"
                );
            }
            layer.with_lora_bias(params, &self.init_lora_weights)?
        } else {
            layer
        };
        Ok(Box::new(if self.use_dora {
            // peft initialises DoRA's magnitude after PiSSA/OLoRA, over the residual.
            match layer.rewritten_base(base)? {
                Some(residual) => layer.with_dora(params, residual.as_ref())?,
                None => layer.with_dora(params, base)?,
            }
        } else {
            layer
        }))
    }

    fn wrap_tied_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        embedding: &str,
        root: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        let params = root.pp(path);
        self.check_init_for(&params)?;
        if self.use_dora || self.lora_bias || self.init_lora_weights.rewrites_base() {
            return Err(PeftError::UnsupportedModule {
                path: path.to_string(),
                kind: "an output head tied to the input embedding".into(),
                method: "LoRA with ensure_weight_tying and DoRA, lora_bias or a decomposing init"
                    .into(),
                supported: "plain LoRA factors (peft ties lora_A and lora_B only)".into(),
            });
        }
        let (r, alpha) = self.rank_and_alpha(path);
        let (r_embedding, _) = self.rank_and_alpha(embedding);
        if r != r_embedding {
            return Err(PeftError::InvalidState(format!(
                "{path} is tied to {embedding} but their ranks differ ({r} vs {r_embedding}); \
                 tied adapters share their factors"
            )));
        }
        let emb = root.pp(embedding);
        // The embedding's factors (created here or by its own adapter: the same parameters).
        let (a_e, b_e) = LoraEmbedding::factors(
            &emb,
            base.out_features(),
            base.in_features(),
            r,
            &self.init_lora_weights,
        )?;
        params.alias("lora_A.weight", &emb.path("lora_embedding_B"), true)?;
        params.alias("lora_B.weight", &emb.path("lora_embedding_A"), true)?;
        Ok(Box::new(LoraLinear::from_factors(
            b_e.t()?.contiguous()?,
            a_e.t()?.contiguous()?,
            self.scaling(r, alpha),
            self.lora_dropout,
            params.seed("lora_dropout"),
        )))
    }

    fn wrap_embedding(
        &self,
        path: &str,
        base: &dyn EmbeddingLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn EmbeddingAdapter>> {
        self.check_init_for(params)?;
        if matches!(self.init_lora_weights, InitLoraWeights::Loftq { .. }) {
            return Err(PeftError::UnsupportedModule {
                path: path.to_string(),
                kind: "an embedding".into(),
                method: "LoRA with init_lora_weights=\"loftq\"".into(),
                supported: "linear layers (peft's LoftQ fails on embeddings)".into(),
            });
        }
        if self.lora_bias {
            return Err(PeftError::UnsupportedModule {
                path: path.to_string(),
                kind: "an embedding".into(),
                method: "LoRA with lora_bias=true".into(),
                supported: "linear layers (peft refuses lora_bias on embeddings too)".into(),
            });
        }
        let (r, alpha) = self.rank_and_alpha(path);
        let layer = LoraEmbedding::new(
            params,
            base.num_embeddings(),
            base.embedding_dim(),
            r,
            self.scaling(r, alpha),
            &self.init_lora_weights,
            base.padding_idx(),
        )?;
        Ok(Box::new(if self.use_dora {
            layer.with_dora(params, base)?
        } else {
            layer
        }))
    }
}
