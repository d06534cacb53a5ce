//! bitsandbytes-format checkpoints, as transformers writes them for a model loaded with
//! `BitsAndBytesConfig` (`save_pretrained`) and reads them back (`from_pretrained`):
//!
//! - 4-bit: `<m>.weight` (uint8 `[out*in/2, 1]`), `<m>.weight.absmax` (uint8 with double
//!   quantization, else f32), `<m>.weight.quant_map` (16 f32), `<m>.weight.nested_absmax`,
//!   `<m>.weight.nested_quant_map` (256 f32), `<m>.weight.quant_state.bitsandbytes__nf4`
//!   (uint8 bytes of a JSON object: quant_type, blocksize, dtype, shape, nested_blocksize,
//!   nested_dtype, nested_offset);
//! - int8: `<m>.weight` (int8 `[out, in]`), `<m>.SCB` (f32 `[out]`), `<m>.weight_format`
//!   (uint8 scalar 0);
//!
//! plus `config.json` with a `quantization_config`. Loading (through
//! [`crate::factory::BnbCheckpoint`], for any architecture) keeps the weights quantized (no
//! f32 copy of the base is ever made), so a quantized folder loads in a fraction of the time
//! and memory of the f32 one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Tensor};
use peft_core::checkpoint::write_atomic;
use peft_core::{AdaptableModel, PeftError, Result};
use safetensors::Dtype as StDtype;
use serde_json::{json, Value};

use crate::blockwise::{Absmax, Blockwise4bit, FourBit, NESTED_BLOCKSIZE};
use crate::int8::Int8Rowwise;
use crate::linear::{QuantLinear, QuantScheme};
use crate::model::quantized_layers;

/// The `quantization_config` transformers writes for `scheme`.
pub fn quantization_config(scheme: QuantScheme) -> Value {
    let (four, eight, kind, dq, threshold) = match scheme {
        QuantScheme::Int8 { threshold } => (false, true, "fp4", false, threshold),
        QuantScheme::FourBit {
            kind, double_quant, ..
        } => (true, false, kind.name(), double_quant, 6.0),
    };
    json!({
        "_load_in_4bit": four,
        "_load_in_8bit": eight,
        "bnb_4bit_compute_dtype": "float32",
        "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": kind,
        "bnb_4bit_use_double_quant": dq,
        "llm_int8_enable_fp32_cpu_offload": false,
        "llm_int8_has_fp16_weight": false,
        "llm_int8_skip_modules": null,
        "llm_int8_threshold": threshold,
        "load_in_4bit": four,
        "load_in_8bit": eight,
        "quant_method": "bitsandbytes"
    })
}

/// Reads the scheme from a `config.json`'s `quantization_config`; `None` when there is none.
pub fn scheme_of_config(config: &Value, source: &str) -> Result<Option<QuantScheme>> {
    let Some(q) = config.get("quantization_config") else {
        return Ok(None);
    };
    let method = q.get("quant_method").and_then(Value::as_str).unwrap_or("");
    if method != "bitsandbytes" {
        return Err(PeftError::Unsupported {
            source_name: source.to_string(),
            key: "quantization_config.quant_method".into(),
            value: format!("\"{method}\""),
            reason: "only bitsandbytes (int8 / nf4 / fp4) checkpoints are read".into(),
        });
    }
    let flag = |k: &str| q.get(k).and_then(Value::as_bool).unwrap_or(false);
    if flag("load_in_8bit") {
        let threshold = q
            .get("llm_int8_threshold")
            .and_then(Value::as_f64)
            .unwrap_or(6.0) as f32;
        return Ok(Some(QuantScheme::Int8 { threshold }));
    }
    if flag("load_in_4bit") {
        let kind = match q.get("bnb_4bit_quant_type").and_then(Value::as_str) {
            Some("nf4") => FourBit::Nf4,
            Some("fp4") | None => FourBit::Fp4,
            Some(other) => {
                return Err(PeftError::config_value(
                    source,
                    "quantization_config.bnb_4bit_quant_type",
                    "\"nf4\" or \"fp4\"",
                    format!("\"{other}\""),
                ))
            }
        };
        return Ok(Some(QuantScheme::FourBit {
            kind,
            blocksize: 64,
            double_quant: flag("bnb_4bit_use_double_quant"),
        }));
    }
    Err(PeftError::MissingKey {
        source_name: source.to_string(),
        key: "quantization_config.load_in_4bit / load_in_8bit".into(),
        expected: "one of them true".into(),
    })
}

/// Whether `dir` is a model folder whose `config.json` has a `quantization_config`.
pub fn is_quantized_folder(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .is_some_and(|v| v.get("quantization_config").is_some())
}

/// Writes `model` (whose linear layers were quantized with one NF4/FP4/int8 scheme) as a
/// bitsandbytes-format folder: `config.json` with `quantization_config` and
/// `model.safetensors`. The files are written whole or not at all.
pub fn save_quantized_folder(model: &mut dyn AdaptableModel, dir: &Path) -> Result<()> {
    let layers = quantized_layers(model)?;
    let mut scheme: Option<QuantScheme> = None;
    for (path, layer) in &layers {
        let s = layer.scheme().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "{path}: {} layers cannot be written as a bitsandbytes checkpoint",
                layer.quant_weight().format_name()
            ))
        })?;
        match scheme {
            None => scheme = Some(s),
            Some(prev) if std::mem::discriminant(&prev) != std::mem::discriminant(&s) => {
                return Err(PeftError::InvalidState(format!(
                    "{path}: mixed quantization schemes ({prev} and {s}) in one model"
                )))
            }
            _ => {}
        }
    }
    let Some(scheme) = scheme else {
        return Err(PeftError::InvalidState(
            "the model has no quantized layers to save (quantize it first)".into(),
        ));
    };
    let by_path: BTreeMap<&str, &QuantLinear> =
        layers.iter().map(|(p, l)| (p.as_str(), l)).collect();
    let mut tensors: Vec<(String, RawEntry)> = Vec::new();
    for (name, t) in model.named_tensors()? {
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        match by_path.get(module) {
            Some(layer) if name.ends_with(".weight") => {
                tensors.extend(layer_tensors(module, layer)?);
            }
            _ => tensors.push((name, RawEntry::from_tensor(&t)?)),
        }
    }
    let mut config = model.config_json();
    if let Value::Object(map) = &mut config {
        map.insert("quantization_config".into(), quantization_config(scheme));
    }
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::tensor::serialize(
        tensors.iter().map(|(n, t)| (n.as_str(), t)),
        Some(metadata),
    )
    .map_err(|e| PeftError::InvalidState(format!("serialising safetensors: {e}")))?;
    write_atomic(&dir.join("model.safetensors"), &bytes)?;
    let config = peft_core::json::to_python_json(&config);
    write_atomic(&dir.join("config.json"), config.as_bytes())
}

/// One tensor to write, as stored bytes.
#[derive(Debug)]
pub struct RawEntry {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl RawEntry {
    fn u8(bytes: &[u8], shape: &[usize]) -> Self {
        RawEntry {
            dtype: StDtype::U8,
            shape: shape.to_vec(),
            data: bytes.to_vec(),
        }
    }

    fn f32(values: &[f32]) -> Self {
        RawEntry {
            dtype: StDtype::F32,
            shape: vec![values.len()],
            data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }
    }

    fn from_tensor(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (
                StDtype::F32,
                flat.to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::BF16 => (
                StDtype::BF16,
                flat.to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            DType::F16 => (
                StDtype::F16,
                flat.to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
            other => {
                let f = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                tracing::debug!("storing a {other:?} tensor as f32");
                (
                    StDtype::F32,
                    f.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            }
        };
        Ok(RawEntry { dtype, shape, data })
    }
}

impl safetensors::View for &RawEntry {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// The bitsandbytes tensors of one quantized layer.
fn layer_tensors(module: &str, layer: &QuantLinear) -> Result<Vec<(String, RawEntry)>> {
    let qw = layer.quant_weight();
    let any = qw.as_any();
    let key = format!("{module}.weight");
    if let Some(w) = any.downcast_ref::<Int8Rowwise>() {
        let cb = RawEntry {
            dtype: StDtype::I8,
            shape: vec![qw.rows(), qw.cols()],
            data: w.cb().iter().map(|&v| v as u8).collect(),
        };
        return Ok(vec![
            (key.clone(), cb),
            (format!("{module}.SCB"), RawEntry::f32(w.scb())),
            (format!("{key}_format"), RawEntry::u8(&[0], &[])),
        ]);
    }
    let Some(w) = any.downcast_ref::<Blockwise4bit>() else {
        return Err(PeftError::InvalidState(format!(
            "{module}: {} cannot be written as a bitsandbytes checkpoint",
            qw.format_name()
        )));
    };
    let kind = w.kind();
    let mut out = vec![
        (
            key.clone(),
            RawEntry::u8(w.packed(), &[w.packed().len(), 1]),
        ),
        (format!("{key}.quant_map"), RawEntry::f32(&kind.code())),
    ];
    // Python's json.dumps layout (", " and ": "), as bitsandbytes writes it.
    let mut state = format!(
        "{{\"quant_type\": \"{}\", \"blocksize\": {}, \"dtype\": \"float32\", \"shape\": [{}, {}]",
        kind.name(),
        w.blocksize(),
        qw.rows(),
        qw.cols()
    );
    match w.absmax() {
        Absmax::Plain(v) => out.push((format!("{key}.absmax"), RawEntry::f32(v))),
        Absmax::Nested {
            q,
            absmax2,
            code,
            offset,
        } => {
            out.push((format!("{key}.absmax"), RawEntry::u8(q, &[q.len()])));
            out.push((format!("{key}.nested_absmax"), RawEntry::f32(absmax2)));
            out.push((format!("{key}.nested_quant_map"), RawEntry::f32(&code[..])));
            state.push_str(&format!(
                ", \"nested_blocksize\": {NESTED_BLOCKSIZE}, \"nested_dtype\": \"float32\", \"nested_offset\": {}",
                peft_core::json::to_python_json(&json!(f64::from(*offset)))
            ));
        }
    }
    state.push('}');
    let state_json = state;
    let bytes = state_json.as_bytes();
    out.push((
        format!("{key}.quant_state.bitsandbytes__{}", kind.name()),
        RawEntry::u8(bytes, &[bytes.len()]),
    ));
    Ok(out)
}
