//! Model-level entry points: quantize a loaded model's linear layers in place
//! ([`quantize_model`]), list them ([`quantized_layers`]), and load a GGUF file keeping its
//! block-quantized weights ([`load_gguf_quantized`]).

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::{AdaptableModel, DenseLinear, LinearLike, PeftError, Result};
use peft_models::gguf::{gguf_name, GgufFile};
use peft_models::LlamaModel;

use crate::ggml::GgmlWeight;
use crate::kernel::QuantWeight;
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

/// A zero-cost stand-in for a weight that is replaced by a quantized layer right after the
/// model is built (a broadcast scalar: no memory).
pub(crate) fn placeholder(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::zeros((), dtype, device)?.broadcast_as(shape)?)
}

/// Loads a LLaMA-family GGUF file keeping the projection weights in their GGUF block format
/// (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2K..Q6K; F16/F32 are kept as they are stored too), so LoRA
/// trains on it without an f32 copy of the base. Embeddings, norms and the output head are
/// dequantized to f32.
pub fn load_gguf_quantized(path: &Path, device: &Device) -> Result<LlamaModel> {
    crate::backend::check_device(device)?;
    let file = GgufFile::open(path)?;
    let arch = file.architecture()?;
    let cfg = file.llama_config()?;
    let permute = arch == "llama" || arch == "mistral";
    let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
    let is_proj = |name: &str| name.starts_with("model.layers.") && name.contains("_proj.weight");
    let mut quantized: Vec<(String, GgmlWeight)> = Vec::new();
    let mut src = |name: &str, shape: &[usize]| -> Result<Tensor> {
        let gname = gguf_name(name).ok_or_else(|| PeftError::MissingTensor {
            path: path.to_path_buf(),
            key: name.to_string(),
            expected: shape.to_vec(),
        available: 0,
        })?;
        if !file.has_tensor(&gname) {
            return Err(PeftError::MissingTensor {
                path: path.to_path_buf(),
                key: format!("{gname} (for {name})"),
                expected: shape.to_vec(),
                available: 0,
            });
        }
        if is_proj(name) {
            let q = file.qtensor(&gname)?;
            let mut w = GgmlWeight::from_qtensor(&q).map_err(|e| PeftError::BadCheckpoint {
                path: path.to_path_buf(),
                format: "GGUF".into(),
                reason: format!("tensor {gname}: {e}"),
            })?;
            if [w.rows(), w.cols()] != shape {
                return Err(PeftError::ShapeMismatch {
                    path: path.to_path_buf(),
                    key: gname,
                    expected: shape.to_vec(),
                    found: vec![w.rows(), w.cols()],
                });
            }
            if permute && gname.contains(".attn_q.") {
                w = w.reverse_permute(heads)?;
            } else if permute && gname.contains(".attn_k.") {
                w = w.reverse_permute(kv_heads)?;
            }
            quantized.push((name.trim_end_matches(".weight").to_string(), w));
            return placeholder(shape, DType::F32, device);
        }
        let t = file.dequantized(&gname, device)?;
        if t.dims() != shape {
            return Err(PeftError::ShapeMismatch {
                path: path.to_path_buf(),
                key: gname,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    };
    let mut model = LlamaModel::build(cfg, &mut src, DType::F32, device)?;
    model.set_name_or_path(path.display().to_string());
    let mut by_path: std::collections::HashMap<String, GgmlWeight> =
        quantized.into_iter().collect();
    model.visit_linears(&mut |p, slot| {
        if let Some(w) = by_path.remove(p) {
            let bias = slot.bias().cloned();
            *slot = Arc::new(QuantLinear::new(Arc::new(w), bias, None, DType::F32, device)?);
        }
        Ok(())
    })?;
    if let Some(left) = by_path.keys().next() {
        return Err(PeftError::InvalidState(format!(
            "{}: quantized tensor for `{left}` has no linear layer in the model",
            path.display()
        )));
    }
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholder_takes_no_memory() -> Result<()> {
        let t = placeholder(&[4096, 4096], DType::F32, &Device::Cpu)?;
        assert_eq!(t.dims(), &[4096, 4096]);
        assert_eq!(t.stride(), &[0, 0]);
        Ok(())
    }
}
