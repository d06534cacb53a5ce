//! GGUF model files (llama.cpp's format) as frozen bases: the LLaMA-family architecture read
//! from the file's metadata, the weights dequantized to f32/bf16 under their Hugging Face names
//! (with llama.cpp's interleaved q/k rows put back in Hugging Face's rotary layout, as
//! transformers does when it loads `gguf_file=`), and the tokenizer rebuilt from the file's own
//! `tokenizer.ggml.*` metadata (see [`crate::tokenizer`]).

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::quantized::gguf_file::{Content, Value as GValue};
use candle_core::{Device, Tensor};
use peft_core::{BaseLayerFactory, ModelBuilder, PeftError, Result, StoredTensor, WeightSource};
use serde_json::{Map, Value};

use crate::llama::{LlamaConfig, LlamaModel};

/// Architectures (`general.architecture`) this crate loads from GGUF.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2"];

/// An open GGUF file: its metadata and tensor directory, tensors read on demand.
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: Mutex<BufReader<File>>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.content.tensor_infos.len())
            .finish()
    }
}

fn bad(path: &Path, reason: impl Into<String>) -> PeftError {
    PeftError::BadCheckpoint {
        path: path.to_path_buf(),
        format: "gguf".into(),
        reason: reason.into(),
    }
}

/// Whether `path` names a GGUF file (by extension or by its magic bytes).
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

impl GgufFile {
    /// Opens `path` and reads its header (metadata and tensor directory).
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).map_err(|e| PeftError::io(path, e))?;
        let mut reader = BufReader::new(file);
        let content = Content::read(&mut reader).map_err(|e| bad(path, e.to_string()))?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            content,
            reader: Mutex::new(reader),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value.
    pub fn metadata(&self, key: &str) -> Option<&GValue> {
        self.content.metadata.get(key)
    }

    fn missing(&self, key: &str, expected: &str) -> PeftError {
        PeftError::MissingKey {
            source_name: self.path.display().to_string(),
            key: key.into(),
            expected: expected.into(),
        }
    }

    fn wrong_type(&self, key: &str, expected: &str, found: &GValue) -> PeftError {
        PeftError::config_value(
            &self.path.display().to_string(),
            key,
            expected,
            format!("{:?}", found.value_type()),
        )
    }

    /// A required unsigned integer.
    pub fn u64(&self, key: &str) -> Result<u64> {
        let v = self
            .metadata(key)
            .ok_or_else(|| self.missing(key, "an unsigned integer"))?;
        v.to_u64()
            .or_else(|_| v.to_u32().map(u64::from))
            .or_else(|_| {
                v.to_i32()
                    .ok()
                    .and_then(|x| u64::try_from(x).ok())
                    .ok_or_else(|| self.wrong_type(key, "an unsigned integer", v))
            })
    }

    /// An optional unsigned integer.
    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(_) => self.u64(key).map(Some),
        }
    }

    /// An optional float.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_f32()
                .map(f64::from)
                .or_else(|_| v.to_f64())
                .map(Some)
                .map_err(|_| self.wrong_type(key, "a float", v)),
        }
    }

    /// An optional string.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.as_str()))
                .map_err(|_| self.wrong_type(key, "a string", v)),
        }
    }

    /// An optional boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => v
                .to_bool()
                .map(Some)
                .map_err(|_| self.wrong_type(key, "a boolean", v)),
        }
    }

    /// An optional array of strings.
    pub fn opt_strings(&self, key: &str) -> Result<Option<Vec<String>>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => {
                let items = v
                    .to_vec()
                    .map_err(|_| self.wrong_type(key, "an array of strings", v))?;
                items
                    .iter()
                    .map(|x| {
                        x.to_string()
                            .cloned()
                            .map_err(|_| self.wrong_type(key, "an array of strings", x))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
        }
    }

    /// An optional array of integers.
    pub fn opt_ints(&self, key: &str) -> Result<Option<Vec<i64>>> {
        match self.metadata(key) {
            None => Ok(None),
            Some(v) => {
                let items = v
                    .to_vec()
                    .map_err(|_| self.wrong_type(key, "an array of integers", v))?;
                items
                    .iter()
                    .map(|x| {
                        x.to_i32()
                            .map(i64::from)
                            .or_else(|_| x.to_i64())
                            .or_else(|_| x.to_u32().map(i64::from))
                            .map_err(|_| self.wrong_type(key, "an array of integers", x))
                    })
                    .collect::<Result<Vec<_>>>()
                    .map(Some)
            }
        }
    }

    /// `general.architecture`, checked against the supported ones.
    pub fn architecture(&self) -> Result<String> {
        let arch = self
            .opt_str("general.architecture")?
            .ok_or_else(|| self.missing("general.architecture", "the model architecture"))?
            .to_string();
        if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
            return Err(PeftError::Unsupported {
                source_name: self.path.display().to_string(),
                key: "general.architecture".into(),
                value: format!("\"{arch}\""),
                reason: format!("GGUF loading covers {}", GGUF_ARCHITECTURES.join(", ")),
            });
        }
        Ok(arch)
    }

    /// Whether the file holds tensor `name` (a GGUF name such as `blk.0.attn_q.weight`).
    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// The `config.json` transformers derives from this file's metadata (the same fields and
    /// values its GGUF loader writes).
    pub fn hf_config(&self) -> Result<Map<String, Value>> {
        let arch = self.architecture()?;
        let key = |k: &str| format!("{arch}.{k}");
        let req = |k: &str| self.u64(&key(k));
        let hidden = req("embedding_length")?;
        let heads = req("attention.head_count")?;
        let kv_heads = self
            .opt_u64(&key("attention.head_count_kv"))?
            .unwrap_or(heads);
        let vocab = match self.opt_u64(&key("vocab_size"))? {
            Some(v) => v,
            None => self
                .opt_strings("tokenizer.ggml.tokens")?
                .map(|t| t.len() as u64)
                .ok_or_else(|| {
                    self.missing(
                        &key("vocab_size"),
                        "the vocabulary size (or tokenizer.ggml.tokens)",
                    )
                })?,
        };
        if heads == 0 || hidden % heads != 0 {
            return Err(PeftError::config_value(
                &self.path.display().to_string(),
                &key("attention.head_count"),
                format!("a divisor of embedding_length {hidden}"),
                heads.to_string(),
            ));
        }
        let model_type = if arch == "mistral" {
            "llama"
        } else {
            arch.as_str()
        };
        let mut m = Map::new();
        m.insert("model_type".into(), Value::from(model_type));
        m.insert(
            "architectures".into(),
            Value::from(vec![format!(
                "{}ForCausalLM",
                if model_type == "qwen2" {
                    "Qwen2"
                } else {
                    "Llama"
                }
            )]),
        );
        m.insert("vocab_size".into(), Value::from(vocab));
        m.insert("hidden_size".into(), Value::from(hidden));
        m.insert(
            "intermediate_size".into(),
            Value::from(req("feed_forward_length")?),
        );
        m.insert("num_hidden_layers".into(), Value::from(req("block_count")?));
        m.insert("num_attention_heads".into(), Value::from(heads));
        m.insert("num_key_value_heads".into(), Value::from(kv_heads));
        m.insert("head_dim".into(), Value::from(hidden / heads));
        m.insert("hidden_act".into(), Value::from("silu"));
        if let Some(ctx) = self.opt_u64(&key("context_length"))? {
            m.insert("max_position_embeddings".into(), Value::from(ctx));
        }
        if let Some(eps) = self.opt_f64(&key("attention.layer_norm_rms_epsilon"))? {
            m.insert("rms_norm_eps".into(), Value::from(eps));
        }
        let theta = self.opt_f64(&key("rope.freq_base"))?.unwrap_or(10000.0);
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), Value::from(theta));
        match self.opt_str(&key("rope.scaling.type"))? {
            None | Some("none") => {
                rope.insert("rope_type".into(), Value::from("default"));
            }
            Some("linear") => {
                rope.insert("rope_type".into(), Value::from("linear"));
                let factor = self.opt_f64(&key("rope.scaling.factor"))?.unwrap_or(1.0);
                rope.insert("factor".into(), Value::from(factor));
            }
            Some(other) => {
                return Err(PeftError::Unsupported {
                    source_name: self.path.display().to_string(),
                    key: key("rope.scaling.type"),
                    value: format!("\"{other}\""),
                    reason: "only plain and linear RoPE scaling are read from GGUF".into(),
                })
            }
        }
        m.insert("rope_parameters".into(), Value::Object(rope));
        m.insert(
            "tie_word_embeddings".into(),
            Value::Bool(!self.has_tensor("output.weight")),
        );
        for (hf, gg) in [
            ("bos_token_id", "tokenizer.ggml.bos_token_id"),
            ("eos_token_id", "tokenizer.ggml.eos_token_id"),
            ("pad_token_id", "tokenizer.ggml.padding_token_id"),
        ] {
            if let Some(id) = self.opt_u64(gg)? {
                m.insert(hf.into(), Value::from(id));
            }
        }
        Ok(m)
    }

    /// The resolved LLaMA-family config.
    pub fn llama_config(&self) -> Result<LlamaConfig> {
        LlamaConfig::from_map(self.hf_config()?, &self.path.display().to_string())
    }

    /// Reads GGUF tensor `name` as stored (block-quantized or not), without dequantizing.
    pub fn qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| bad(&self.path, "reader poisoned by an earlier panic"))?;
        self.content
            .tensor(&mut *reader, name, &Device::Cpu)
            .map_err(|e| bad(&self.path, format!("tensor {name}: {e}")))
    }

    /// Reads GGUF tensor `name` dequantized to f32 (shape in row-major order, as candle and
    /// PyTorch see it).
    pub fn dequantized(&self, name: &str, device: &Device) -> Result<Tensor> {
        let mut reader = self
            .reader
            .lock()
            .map_err(|_| bad(&self.path, "reader poisoned by an earlier panic"))?;
        let q = self
            .content
            .tensor(&mut *reader, name, device)
            .map_err(|e| bad(&self.path, format!("tensor {name}: {e}")))?;
        q.dequantize(device)
            .map_err(|e| bad(&self.path, format!("tensor {name}: {e}")))
    }
}

/// The GGUF name of a LLaMA-family Hugging Face tensor name (`None` if it has no counterpart).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{suffix}"))
}

/// Undoes llama.cpp's q/k row permutation (`convert_hf_to_gguf.py`'s `permute`): rows of each
/// head go back from interleaved pairs to the two rotary halves.
pub fn reverse_permute(w: &Tensor, heads: usize) -> Result<Tensor> {
    let dims = w.dims().to_vec();
    let out = dims[0];
    if heads == 0 || !out.is_multiple_of(2 * heads) {
        return Err(PeftError::bad_input(
            "q/k projection rows",
            format!("a multiple of 2 x {heads} heads"),
            out.to_string(),
        ));
    }
    let half = out / heads / 2;
    let mut shape = vec![heads, half, 2];
    shape.extend_from_slice(&dims[1..]);
    Ok(w.reshape(shape)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

/// A GGUF file as a [`WeightSource`]: tensors under their Hugging Face names, dequantized to
/// the build's precision with llama.cpp's q/k row permutation undone; the stored blocks are
/// there for factories that keep them ([`StoredTensor::Ggml`]).
pub struct GgufSource {
    file: GgufFile,
    precision: crate::Precision,
    device: Device,
    /// Head counts of q and k when the architecture's q/k rows are permuted (llama, mistral).
    permute: Option<(usize, usize)>,
}

impl std::fmt::Debug for GgufSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSource")
            .field("path", &self.file.path())
            .finish()
    }
}

impl GgufSource {
    /// Opens `path`; returns the source and the LLaMA-family config its metadata describes.
    pub fn open(
        path: &Path,
        dtype: impl Into<crate::Precision>,
        device: &Device,
    ) -> Result<(Self, LlamaConfig)> {
        let precision = crate::weights::float_precision(dtype.into());
        let file = GgufFile::open(path)?;
        let arch = file.architecture()?;
        let cfg = file.llama_config()?;
        let permute = (arch == "llama" || arch == "mistral")
            .then_some((cfg.num_attention_heads, cfg.num_key_value_heads));
        Ok((
            GgufSource {
                file,
                precision,
                device: device.clone(),
                permute,
            },
            cfg,
        ))
    }

    /// The GGUF name of `name`, checked to exist.
    fn gguf_tensor(&self, name: &str, shape: &[usize]) -> Result<String> {
        let path = self.file.path();
        let available = self.file.content.tensor_infos.len();
        let gname = gguf_name(name).ok_or_else(|| PeftError::MissingTensor {
            path: path.to_path_buf(),
            key: name.to_string(),
            expected: shape.to_vec(),
            available,
        })?;
        if !self.file.has_tensor(&gname) {
            return Err(PeftError::MissingTensor {
                path: path.to_path_buf(),
                key: format!("{gname} (for {name})"),
                expected: shape.to_vec(),
                available,
            });
        }
        Ok(gname)
    }

    /// The head count whose permutation llama.cpp applied to `gname`'s rows, if any.
    fn unpermute_heads(&self, gname: &str) -> Option<usize> {
        let (heads, kv_heads) = self.permute?;
        if gname.contains(".attn_q.") {
            Some(heads)
        } else if gname.contains(".attn_k.") {
            Some(kv_heads)
        } else {
            None
        }
    }
}

impl WeightSource for GgufSource {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let gname = self.gguf_tensor(name, shape)?;
        let mut t = self.file.dequantized(&gname, &self.device)?;
        if t.dims() != shape {
            return Err(PeftError::ShapeMismatch {
                path: self.file.path().to_path_buf(),
                key: gname,
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        if let Some(heads) = self.unpermute_heads(&gname) {
            t = reverse_permute(&t, heads)?;
        }
        let want = self.precision.dtype_for(shape.len());
        Ok(if t.dtype() == want {
            t
        } else {
            t.to_dtype(want)?
        })
    }

    fn stored(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        let Some(gname) = gguf_name(name).filter(|g| self.file.has_tensor(g)) else {
            return Ok(None);
        };
        Ok(Some(StoredTensor::Ggml {
            tensor: std::sync::Arc::new(self.file.qtensor(&gname)?),
            unpermute_heads: self.unpermute_heads(&gname),
        }))
    }

    fn contains(&self, name: &str) -> bool {
        gguf_name(name).is_some_and(|g| self.file.has_tensor(&g))
    }

    fn origin(&self) -> String {
        self.file.path().display().to_string()
    }
}

/// Loads a LLaMA-family model from a GGUF file, dequantizing its weights to `dtype`.
pub fn load_gguf_llama(
    path: &Path,
    dtype: impl Into<crate::Precision>,
    device: &Device,
) -> Result<LlamaModel> {
    load_gguf_llama_with(path, dtype.into(), device, Vec::new())
}

/// [`load_gguf_llama`], asking `factories` for the base linear layers first (a factory that
/// keeps the GGUF blocks finds them through [`WeightSource::stored`]).
pub fn load_gguf_llama_with(
    path: &Path,
    dtype: crate::Precision,
    device: &Device,
    factories: Vec<Box<dyn BaseLayerFactory>>,
) -> Result<LlamaModel> {
    let (mut src, cfg) = GgufSource::open(path, dtype, device)?;
    let compute = src.precision.compute;
    let b = ModelBuilder::with_factories(&mut src, factories);
    let mut model = LlamaModel::build(cfg, b, compute, device)?;
    model.set_name_or_path(path.display().to_string());
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.weight").as_deref(),
            Some("blk.3.attn_q.weight")
        );
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(
            gguf_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(gguf_name("model.layers.0.self_attn.rotary.weight"), None);
    }

    #[test]
    fn reverse_permute_undoes_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(n_head, 2, dim/2, ...).swapaxes(1, 2).reshape(shape)
        let (heads, rows, cols) = (3usize, 12usize, 2usize);
        let w = Tensor::arange(0f32, (rows * cols) as f32, &Device::Cpu)?.reshape((rows, cols))?;
        let permuted = w
            .reshape((heads, 2, rows / heads / 2, cols))?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((rows, cols))?;
        let back = reverse_permute(&permuted, heads)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }
}
