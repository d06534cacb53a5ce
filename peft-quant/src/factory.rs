//! Base-layer factories ([`peft_core::BaseLayerFactory`]) for quantized bases. A model declares
//! its linear layers once; these factories decide, per layer, to build it quantized:
//!
//! - [`BnbCheckpoint`]: the layers a bitsandbytes checkpoint (as transformers saves it) stores
//!   quantized, read as stored (no f32 copy);
//! - [`QuantizeOnLoad`]: every hidden projection of a dense checkpoint, quantized as it is read
//!   (one layer in f32 at a time), skipping what transformers skips: output heads and the
//!   architecture's full-precision modules (T5's `wo`);
//! - [`GgufBlocks`]: the hidden projections of a GGUF file, kept in their GGML blocks.
//!
//! They know no model: paths, shapes and roles come from the declaration, tensors from the
//! [`WeightSource`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use peft_core::{
    BaseLayerFactory, LinearRole, LinearSlot, LinearSpec, PeftError, Result, StoredTensor,
    WeightSource,
};
use safetensors::Dtype as StDtype;
use serde_json::Value;

use crate::blockwise::{Absmax, Blockwise4bit, FourBit, NESTED_BLOCKSIZE};
use crate::ggml::GgmlWeight;
use crate::int8::Int8Rowwise;
use crate::linear::{QuantLinear, QuantScheme};
use crate::QuantWeight;

/// Loads the quantized layers of a bitsandbytes checkpoint (a model folder whose
/// `config.json` has a `quantization_config`). A layer counts as quantized when the folder
/// holds its bitsandbytes tensors (`<m>.SCB` for int8, `<m>.weight.quant_map` for 4-bit);
/// every other layer passes to the dense fallback, as transformers loads them.
#[derive(Debug, Clone)]
pub struct BnbCheckpoint {
    dir: PathBuf,
    scheme: QuantScheme,
    device: Device,
    loaded: usize,
}

impl BnbCheckpoint {
    /// The factory for `dir`, or `None` when its `config.json` has no `quantization_config`.
    pub fn for_folder(dir: &Path, device: &Device) -> Result<Option<Self>> {
        crate::backend::check_device(device)?;
        let path = dir.join("config.json");
        let source = path.display().to_string();
        let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
        let config: Value = serde_json::from_str(&text).map_err(|e| PeftError::Json {
            source_name: source.clone(),
            message: e.to_string(),
        })?;
        let scheme = crate::checkpoint::scheme_of_config(&config, &source)?;
        Ok(scheme.map(|scheme| BnbCheckpoint {
            dir: dir.to_path_buf(),
            scheme,
            device: device.clone(),
            loaded: 0,
        }))
    }

    /// The scheme the checkpoint's config names.
    pub fn scheme(&self) -> QuantScheme {
        self.scheme
    }

    fn bad(&self, reason: impl Into<String>) -> PeftError {
        PeftError::BadCheckpoint {
            path: self.dir.clone(),
            format: "bitsandbytes checkpoint".into(),
            reason: reason.into(),
        }
    }

    /// The stored bytes of `name`, checking the dtype (and element count when given).
    fn raw<'s>(
        &self,
        src: &'s dyn WeightSource,
        name: &str,
        dtype: StDtype,
        count: Option<usize>,
    ) -> Result<&'s [u8]> {
        let Some(StoredTensor::Safetensors {
            dtype: dt,
            shape,
            data,
        }) = src.stored(name)?
        else {
            return Err(self.bad(format!("missing tensor `{name}`")));
        };
        if dt != dtype {
            return Err(self.bad(format!(
                "tensor `{name}`: expected dtype {dtype:?}, found {dt:?}"
            )));
        }
        let n: usize = shape.iter().product();
        if let Some(c) = count {
            if n != c {
                return Err(self.bad(format!(
                    "tensor `{name}`: expected {c} values, found {n} (shape {shape:?})"
                )));
            }
        }
        Ok(data)
    }

    fn f32s(&self, src: &dyn WeightSource, name: &str, count: usize) -> Result<Vec<f32>> {
        Ok(f32s(self.raw(src, name, StDtype::F32, Some(count))?))
    }

    fn four_bit(
        &self,
        src: &dyn WeightSource,
        module: &str,
        kind: FourBit,
        [rows, cols]: [usize; 2],
    ) -> Result<Blockwise4bit> {
        let key = format!("{module}.weight");
        let state_key = format!("{key}.quant_state.bitsandbytes__{}", kind.name());
        let state: Value = serde_json::from_slice(self.raw(src, &state_key, StDtype::U8, None)?)
            .map_err(|e| self.bad(format!("`{state_key}` is not JSON: {e}")))?;
        let blocksize = state.get("blocksize").and_then(Value::as_u64).unwrap_or(64) as usize;
        let stored_shape: Vec<usize> = state
            .get("shape")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_u64().map(|x| x as usize))
                    .collect()
            })
            .unwrap_or_default();
        if stored_shape != [rows, cols] {
            return Err(PeftError::ShapeMismatch {
                path: self.dir.clone(),
                key: format!("{state_key} shape"),
                expected: vec![rows, cols],
                found: stored_shape,
            });
        }
        let blocks = (rows * cols).div_ceil(blocksize);
        let packed = self
            .raw(src, &key, StDtype::U8, Some((rows * cols).div_ceil(2)))?
            .to_vec();
        if self.f32s(src, &format!("{key}.quant_map"), 16)? != kind.code() {
            return Err(self.bad(format!("`{key}.quant_map` is not the {} code", kind.name())));
        }
        let absmax = match state.get("nested_offset").and_then(Value::as_f64) {
            Some(offset) => {
                let nb = state
                    .get("nested_blocksize")
                    .and_then(Value::as_u64)
                    .unwrap_or(NESTED_BLOCKSIZE as u64) as usize;
                if nb != NESTED_BLOCKSIZE {
                    return Err(self.bad(format!(
                        "`{state_key}`: nested_blocksize {nb}, expected {NESTED_BLOCKSIZE}"
                    )));
                }
                let q = self.raw(src, &format!("{key}.absmax"), StDtype::U8, Some(blocks))?;
                let absmax2 =
                    self.f32s(src, &format!("{key}.nested_absmax"), blocks.div_ceil(nb))?;
                let code2 = self.f32s(src, &format!("{key}.nested_quant_map"), 256)?;
                let mut code = Box::new([0f32; 256]);
                code.copy_from_slice(&code2);
                Absmax::Nested {
                    q: q.to_vec(),
                    absmax2,
                    code,
                    offset: offset as f32,
                }
            }
            None => Absmax::Plain(self.f32s(src, &format!("{key}.absmax"), blocks)?),
        };
        Blockwise4bit::from_parts(rows, cols, kind, blocksize, packed, absmax)
            .map_err(|e| self.bad(format!("{module}: {e}")))
    }

    fn int8(
        &self,
        src: &dyn WeightSource,
        module: &str,
        [rows, cols]: [usize; 2],
        threshold: f32,
    ) -> Result<Int8Rowwise> {
        let key = format!("{module}.weight");
        let cb = self.raw(src, &key, StDtype::I8, Some(rows * cols))?;
        let cb = cb.iter().map(|&b| b as i8).collect();
        let scb = self.f32s(src, &format!("{module}.SCB"), rows)?;
        Int8Rowwise::from_parts(rows, cols, cb, scb, threshold)
    }
}

impl BaseLayerFactory for BnbCheckpoint {
    fn name(&self) -> String {
        format!("bitsandbytes {}", self.scheme)
    }

    fn linear(
        &mut self,
        spec: &LinearSpec,
        src: &mut dyn WeightSource,
    ) -> Result<Option<LinearSlot>> {
        let m = &spec.path;
        let marker = match self.scheme {
            QuantScheme::Int8 { .. } => format!("{m}.SCB"),
            QuantScheme::FourBit { .. } => format!("{m}.weight.quant_map"),
        };
        if !src.contains(&marker) {
            return Ok(None);
        }
        // transformers quantizes `[out, in]` weights; a Conv1D's `[in, out]` is transposed
        // first, so every quantized layer is stored `[out, in]`.
        let shape = [spec.out_features, spec.in_features];
        let weight: Arc<dyn crate::QuantWeight> = match self.scheme {
            QuantScheme::Int8 { threshold } => Arc::new(self.int8(src, m, shape, threshold)?),
            QuantScheme::FourBit { kind, .. } => Arc::new(self.four_bit(src, m, kind, shape)?),
        };
        let bias = spec
            .read_bias(src)?
            .map(|b| b.to_dtype(DType::F32))
            .transpose()?;
        self.loaded += 1;
        let layer = QuantLinear::new(weight, bias, Some(self.scheme), DType::F32, &self.device)?;
        Ok(Some(Arc::new(layer)))
    }

    fn finish(&mut self) -> Result<()> {
        if self.loaded == 0 {
            return Err(self.bad(format!(
                "config.json names {} quantization, but no layer of the model is stored quantized",
                self.scheme
            )));
        }
        Ok(())
    }
}

/// Quantizes each hidden projection of a dense checkpoint as the model is built (so no f32
/// copy of the whole base ever exists), as transformers does when loading with a
/// `BitsAndBytesConfig`: output heads, the architecture's full-precision modules and the
/// modules named in `skip` (transformers' `llm_int8_skip_modules`: an exact path or a dotted
/// suffix) stay dense.
#[derive(Debug, Clone)]
pub struct QuantizeOnLoad {
    scheme: QuantScheme,
    skip: Vec<String>,
}

impl QuantizeOnLoad {
    /// A factory quantizing with `scheme`, leaving the `skip` modules dense.
    pub fn new(scheme: QuantScheme, skip: Vec<String>) -> Self {
        QuantizeOnLoad { scheme, skip }
    }
}

impl BaseLayerFactory for QuantizeOnLoad {
    fn name(&self) -> String {
        format!("quantize to {}", self.scheme)
    }

    fn linear(
        &mut self,
        spec: &LinearSpec,
        src: &mut dyn WeightSource,
    ) -> Result<Option<LinearSlot>> {
        let p = &spec.path;
        let skipped = self
            .skip
            .iter()
            .any(|s| p == s || p.ends_with(&format!(".{s}")));
        if spec.role != LinearRole::Hidden || spec.keep_full_precision || skipped {
            return Ok(None);
        }
        let dense = spec.dense(src)?;
        let weight = dense.weight()?;
        crate::backend::check_device(weight.device())?;
        let layer = QuantLinear::quantize(
            &weight,
            dense.bias().cloned(),
            dense.stores_transposed(),
            self.scheme,
        )
        .map_err(|e| PeftError::InvalidState(format!("{p}: {e}")))?;
        Ok(Some(Arc::new(layer)))
    }
}

/// Keeps the hidden projections of a GGUF file in their GGML blocks (Q4_0, Q4_1, Q5_x, Q8_0,
/// K-quants; F16/F32 kept as stored too), llama.cpp's q/k row permutation undone on the
/// blocks. Output heads, embeddings and norms are dequantized by the source as usual.
#[derive(Debug, Clone)]
pub struct GgufBlocks {
    device: Device,
}

impl GgufBlocks {
    /// The factory for models on `device` (the CPU).
    pub fn new(device: &Device) -> Result<Self> {
        crate::backend::check_device(device)?;
        Ok(GgufBlocks {
            device: device.clone(),
        })
    }
}

impl BaseLayerFactory for GgufBlocks {
    fn name(&self) -> String {
        "GGUF blocks".into()
    }

    fn linear(
        &mut self,
        spec: &LinearSpec,
        src: &mut dyn WeightSource,
    ) -> Result<Option<LinearSlot>> {
        if spec.role != LinearRole::Hidden || spec.transposed {
            return Ok(None);
        }
        let name = format!("{}.weight", spec.path);
        let Some(StoredTensor::Ggml {
            tensor,
            unpermute_heads,
        }) = src.stored(&name)?
        else {
            return Ok(None);
        };
        let bad = |reason: String| PeftError::BadCheckpoint {
            path: PathBuf::from(src.origin()),
            format: "GGUF".into(),
            reason,
        };
        let mut w = GgmlWeight::from_qtensor(&tensor).map_err(|e| bad(format!("{name}: {e}")))?;
        let expected = [spec.out_features, spec.in_features];
        if [w.rows(), w.cols()] != expected {
            return Err(PeftError::ShapeMismatch {
                path: PathBuf::from(src.origin()),
                key: name,
                expected: expected.to_vec(),
                found: vec![w.rows(), w.cols()],
            });
        }
        if let Some(heads) = unpermute_heads {
            w = w.reverse_permute(heads)?;
        }
        let bias = spec.read_bias(src)?;
        let layer = QuantLinear::new(Arc::new(w), bias, None, DType::F32, &self.device)?;
        Ok(Some(Arc::new(layer)))
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}
