//! Converting a PiSSA/OLoRA adapter to a plain LoRA over the original base (peft's
//! `subtract_mutated_init`, behind `save_pretrained(path_initial_model_for_weight_conversion=)`).
//!
//! PiSSA and OLoRA train over a residual base `W_res = W - s B₀ A₀`. After training the model
//! computes `W_res + s B A = W + s (B A - B₀ A₀)`, and `B A - B₀ A₀ = [B | -B₀] [A ; A₀]`: a LoRA
//! of twice the rank over the original `W`, with twice the alpha so that the scaling stays `s`.

use std::collections::BTreeMap;

use candle_core::Tensor;
use peft_core::{MethodConfig, PeftError, Result};

use crate::config::{InitLoraWeights, LoraConfig};

/// The config peft writes to the initial adapter's folder: the same, with
/// `init_lora_weights=true`.
pub fn initial_config(config: &LoraConfig) -> Box<dyn MethodConfig> {
    Box::new(LoraConfig {
        init_lora_weights: InitLoraWeights::Default,
        ..config.clone()
    })
}

/// A JSON number for `x`, an integer when whole (as Python prints `2 * 8`).
fn number(x: f64) -> serde_json::Number {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        serde_json::Number::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).unwrap_or_else(|| serde_json::Number::from(0))
    }
}

/// The converted adapter's config and tensors (see the module docs).
pub fn convert(
    config: &LoraConfig,
    trained: &[(String, Tensor)],
    initial: &[(String, Tensor)],
) -> Result<peft_core::ConvertedAdapter> {
    if config.use_rslora && (!config.rank_pattern.is_empty() || !config.alpha_pattern.is_empty()) {
        return Err(PeftError::InvalidState(
            "Passing `path_initial_model_for_weight_conversion` to `save_pretrained` is not \
             supported when using `rank_pattern` or `alpha_pattern` at the same time as \
             `use_rslora=True`."
                .into(),
        ));
    }
    if !matches!(
        config.init_lora_weights,
        InitLoraWeights::Pissa { .. } | InitLoraWeights::Olora | InitLoraWeights::Default
    ) {
        tracing::warn!(
            "converting against an initial adapter only makes sense for PiSSA/OLoRA/LoRA \
             adapters, not init_lora_weights={}",
            config.init_lora_weights.to_json()
        );
    }
    let initial: BTreeMap<&str, &Tensor> = initial.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let initial_of = |key: &str| -> Result<Tensor> {
        initial
            .get(key)
            .map(|t| (*t).clone())
            .ok_or_else(|| PeftError::MissingKey {
                source_name: "the initial adapter".into(),
                key: key.to_string(),
                expected: "the adapter's value right after initialisation, saved before training"
                    .into(),
            })
    };
    let mut out = Vec::with_capacity(trained.len());
    for (key, t) in trained {
        let value = if key.ends_with("lora_magnitude_vector") {
            return Err(PeftError::InvalidState(format!(
                "{key}: a DoRA adapter cannot be converted to a plain LoRA (its magnitude is \
                 normalised over the rewritten base; peft's conversion drops it)"
            )));
        } else if key.ends_with("lora_A.weight") || key.ends_with("lora_embedding_A") {
            let a0 = initial_of(key)?
                .to_device(t.device())?
                .to_dtype(t.dtype())?;
            check_shape(key, &a0, t)?;
            Tensor::cat(&[t, &a0], 0)?
        } else if key.ends_with("lora_B.weight") || key.ends_with("lora_embedding_B") {
            let b0 = initial_of(key)?
                .to_device(t.device())?
                .to_dtype(t.dtype())?;
            check_shape(key, &b0, t)?;
            Tensor::cat(&[t, &b0.neg()?], 1)?
        } else if key.ends_with("lora_B.bias") {
            let b0 = initial_of(key)?
                .to_device(t.device())?
                .to_dtype(t.dtype())?;
            check_shape(key, &b0, t)?;
            (t - b0)?
        } else {
            // modules_to_save copies and trained biases do not depend on the base.
            t.clone()
        };
        out.push((key.clone(), value));
    }
    let factor = if config.use_rslora { 2f64.sqrt() } else { 2.0 };
    let converted = LoraConfig {
        r: config.r * 2,
        lora_alpha: number(config.alpha() * factor),
        init_lora_weights: InitLoraWeights::Default,
        rank_pattern: config
            .rank_pattern
            .iter()
            .map(|(k, r)| (k.clone(), r * 2))
            .collect(),
        alpha_pattern: config
            .alpha_pattern
            .iter()
            .map(|(k, a)| (k.clone(), number(a.as_f64().unwrap_or(0.0) * 2.0)))
            .collect(),
        ..config.clone()
    };
    Ok((Box::new(converted), out))
}

fn check_shape(key: &str, initial: &Tensor, trained: &Tensor) -> Result<()> {
    if initial.dims() != trained.dims() {
        return Err(PeftError::ShapeMismatch {
            path: "the initial adapter".into(),
            key: key.to_string(),
            expected: trained.dims().to_vec(),
            found: initial.dims().to_vec(),
        });
    }
    Ok(())
}
