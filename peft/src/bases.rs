//! Base models with dense or quantized linear layers, for every architecture: a model folder
//! or GGUF file loaded with the base-layer factories of `peft-quant` (feature `quant`).
//! A bitsandbytes folder (its `config.json` has a `quantization_config`) loads with its layers
//! kept quantized; a dense one can be quantized as it loads (`int8`, `nf4`, `fp4`, ...); a
//! GGUF file can keep its blocks (`gguf`).

use std::path::Path;

use candle_core::{DType, Device};
use peft_core::{AdaptableModel, BaseLayerFactory, PeftError, Result};
use peft_models::Precision;
use peft_quant::{checkpoint, BnbCheckpoint, GgufBlocks, QuantScheme, QuantizeOnLoad};

/// Loads `dir` (a model folder or a `.gguf` file). `quant` names how to keep the linear
/// layers: `None` as stored (a bitsandbytes folder stays quantized), a scheme name
/// (`int8`, `nf4`, `nf4-nodq`, `fp4`, `fp4-nodq`) to quantize a dense checkpoint as it is
/// read, or `gguf` to keep a GGUF file's blocks. Quantized layers compute in f32.
pub fn load_base(
    dir: &Path,
    dtype: Precision,
    device: &Device,
    quant: Option<&str>,
) -> Result<Box<dyn AdaptableModel>> {
    load_base_with_head(dir, dtype, device, quant, None)
}

/// [`load_base`] with the task head `head` instead of the checkpoint's own (a classifier on a
/// bare encoder, as `AutoModelForSequenceClassification` with `num_labels` builds it).
pub fn load_base_with_head(
    dir: &Path,
    dtype: Precision,
    device: &Device,
    quant: Option<&str>,
    head: Option<peft_models::HeadSpec>,
) -> Result<Box<dyn AdaptableModel>> {
    let is_gguf = peft_models::gguf::is_gguf(dir);
    if !dir.is_dir() && !is_gguf {
        return Err(PeftError::bad_input(
            "model path",
            "a model folder or a GGUF file",
            dir.display().to_string(),
        ));
    }
    let mut factories: Vec<Box<dyn BaseLayerFactory>> = Vec::new();
    if dir.is_dir() && checkpoint::is_quantized_folder(dir) {
        if let Some(q) = quant {
            return Err(PeftError::bad_input(
                "--quant",
                format!(
                    "no --quant: {} is already a quantized checkpoint",
                    dir.display()
                ),
                q,
            ));
        }
        if let Some(f) = BnbCheckpoint::for_folder(dir, device)? {
            factories.push(Box::new(f));
        }
    } else if let Some(q) = quant {
        if q == "gguf" {
            if !is_gguf {
                return Err(PeftError::bad_input(
                    "--quant gguf",
                    "a .gguf file",
                    format!("{}: not a .gguf file", dir.display()),
                ));
            }
            factories.push(Box::new(GgufBlocks::new(device)?));
        } else {
            let scheme = QuantScheme::parse(q)?;
            factories.push(Box::new(QuantizeOnLoad::new(scheme, Vec::new())));
        }
    }
    if !factories.is_empty() && dtype != DType::F32.into() {
        return Err(PeftError::bad_input(
            "--dtype",
            "f32 (quantized layers compute in f32)",
            format!("{:?}", dtype.compute),
        ));
    }
    peft_models::load_model_with_head(dir, dtype, device, factories, head)
}
