//! Model-level entry points: quantize a loaded model's linear layers in place
//! ([`quantize_model`]) and list them ([`quantized_layers`]). Loading a model with quantized
//! layers goes through the base-layer factories of [`crate::factory`].

use std::sync::Arc;

use peft_core::{AdaptableModel, DenseLinear, LinearLike, PeftError, Result};

use crate::linear::{QuantLinear, QuantScheme};

/// What [`quantize_model`] did.
#[derive(Debug, Clone, Default)]
pub struct QuantReport {
    /// Module paths quantized.
    pub layers: Vec<String>,
    /// Module paths left dense (output heads, skipped names).
    pub skipped: Vec<String>,
    /// Weight parameters now quantized.
    pub params: usize,
    /// Bytes those weights occupy quantized.
    pub bytes: usize,
}

impl QuantReport {
    /// Bytes per quantized parameter.
    pub fn bytes_per_param(&self) -> f64 {
        if self.params == 0 {
            0.0
        } else {
            self.bytes as f64 / self.params as f64
        }
    }
}

impl std::fmt::Display for QuantReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "quantized {} linear layers ({} parameters, {:.1} MB, {:.4} bytes/parameter); kept dense: {}",
            self.layers.len(),
            self.params,
            self.bytes as f64 / 1e6,
            self.bytes_per_param(),
            if self.skipped.is_empty() {
                "none".to_string()
            } else {
                self.skipped.join(", ")
            }
        )
    }
}

/// Replaces every linear layer of `model` with a quantized one, except the output heads
/// (as transformers keeps `lm_head` dense) and modules whose path ends with a name in `skip`.
/// Must run before adapters are added. Fails, naming the module, when a layer's shape does not
/// suit the scheme (in_features not a multiple of the block size).
pub fn quantize_model(
    model: &mut dyn AdaptableModel,
    scheme: QuantScheme,
    skip: &[String],
) -> Result<QuantReport> {
    crate::backend::check_device(model.device())?;
    let heads = model.info().output_heads.clone();
    let mut report = QuantReport::default();
    model.visit_linears(&mut |path, slot| {
        let keep = heads.iter().any(|h| path == h)
            || skip
                .iter()
                .any(|s| path == s || path.ends_with(&format!(".{s}")));
        if slot.as_any().downcast_ref::<QuantLinear>().is_some() {
            return Ok(());
        }
        if slot.as_any().downcast_ref::<DenseLinear>().is_none() {
            return Err(PeftError::InvalidState(format!(
                "{path}: quantize the base model before adding adapters (found {slot:?})"
            )));
        }
        if keep {
            report.skipped.push(path.to_string());
            return Ok(());
        }
        let weight = slot.weight()?;
        let layer = QuantLinear::quantize(
            &weight,
            slot.bias().cloned(),
            slot.stores_transposed(),
            scheme,
        )
        .map_err(|e| PeftError::InvalidState(format!("{path}: {e}")))?;
        report.params += layer.in_features() * layer.out_features();
        report.bytes += layer.resident_bytes();
        report.layers.push(path.to_string());
        *slot = Arc::new(layer);
        Ok(())
    })?;
    Ok(report)
}

/// The quantized linear layers of `model`: `(path, layer)`.
pub fn quantized_layers(model: &mut dyn AdaptableModel) -> Result<Vec<(String, QuantLinear)>> {
    let mut out = Vec::new();
    model.visit_linears(&mut |path, slot| {
        if let Some(q) = slot.as_any().downcast_ref::<QuantLinear>() {
            out.push((path.to_string(), q.clone()));
        }
        Ok(())
    })?;
    Ok(out)
}
