//! The LLaMA-family `config.json` (Llama, Mistral, Qwen2), read with transformers 4 and 5
//! spellings (`rope_theta` or `rope_parameters`, `torch_dtype` or `dtype`) into a fully
//! resolved [`LlamaConfig`] with no optional fields left.

use peft_core::json::{parse_object, ConfigFields};
use peft_core::{PeftError, Result};
use serde_json::{Map, Value};

/// How rotary frequencies are derived (`rope_type`).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The scaling factor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// `factor`
        factor: f64,
        /// `low_freq_factor`
        low_freq_factor: f64,
        /// `high_freq_factor`
        high_freq_factor: f64,
        /// `original_max_position_embeddings`
        original_max_position_embeddings: f64,
    },
}

/// A resolved LLaMA-family configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `llama`, `mistral` or `qwen2`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden_size: usize,
    /// MLP inner size.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads.
    pub num_key_value_heads: usize,
    /// Width of a head.
    pub head_dim: usize,
    /// MLP activation.
    pub hidden_act: String,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// RMS norm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE scaling.
    pub rope_scaling: RopeScaling,
    /// Whether `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v projections.
    pub qkv_bias: bool,
    /// Bias on the output projection.
    pub o_bias: bool,
    /// Bias on MLP projections.
    pub mlp_bias: bool,
    /// Sliding attention window per layer (`None`: full attention).
    pub sliding_windows: Vec<Option<usize>>,
    /// Padding token id.
    pub pad_token_id: Option<u32>,
    /// Beginning-of-sequence token id.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token ids.
    pub eos_token_ids: Vec<u32>,
    /// Initializer std for random weights.
    pub initializer_range: f64,
    /// The config.json object as read (written back when saving).
    pub raw: Map<String, Value>,
}

/// Model types this implementation covers.
pub const LLAMA_FAMILY: &[&str] = &["llama", "mistral", "qwen2"];

fn token_ids(fields: &mut ConfigFields, key: &str) -> Result<Vec<u32>> {
    match fields.take_raw(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Number(n)) => n
            .as_u64()
            .map(|v| vec![v as u32])
            .ok_or_else(|| fields.type_error(key, "a token id", &Value::Number(n))),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .map(|x| x as u32)
                    .ok_or_else(|| fields.type_error(key, "a list of token ids", v))
            })
            .collect(),
        Some(v) => Err(fields.type_error(key, "a token id or a list of them", &v)),
    }
}

fn rope_from(
    obj: &Map<String, Value>,
    source: &str,
    key: &str,
) -> Result<(Option<f64>, RopeScaling)> {
    let mut f = ConfigFields::new(source, obj.clone());
    let theta = match f.peek("rope_theta") {
        Some(_) => Some(f.take_f64("rope_theta", 10000.0)?),
        None => None,
    };
    let kind = f
        .take_opt_string("rope_type")?
        .or(f.take_opt_string("type")?)
        .unwrap_or_else(|| "default".to_string());
    let scaling = match kind.as_str() {
        "default" => RopeScaling::Default,
        "linear" => RopeScaling::Linear {
            factor: f.take_f64("factor", 1.0)?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: f.take_f64("factor", 8.0)?,
            low_freq_factor: f.take_f64("low_freq_factor", 1.0)?,
            high_freq_factor: f.take_f64("high_freq_factor", 4.0)?,
            original_max_position_embeddings: f
                .take_f64("original_max_position_embeddings", 8192.0)?,
        },
        other => {
            return Err(PeftError::Unsupported {
                source_name: source.to_string(),
                key: format!("{key}.rope_type"),
                value: format!("\"{other}\""),
                reason: "only default, linear and llama3 RoPE are implemented".into(),
            })
        }
    };
    Ok((theta, scaling))
}

impl LlamaConfig {
    /// Reads `config.json` text; `source` names it in errors.
    pub fn from_json_str(text: &str, source: &str) -> Result<Self> {
        let raw = parse_object(text, source)?;
        Self::from_map(raw, source)
    }

    /// Resolves a parsed `config.json` object.
    pub fn from_map(raw: Map<String, Value>, source: &str) -> Result<Self> {
        let mut f = ConfigFields::new(source, raw.clone());
        let model_type = f
            .take_opt_string("model_type")?
            .ok_or_else(|| PeftError::MissingKey {
                source_name: source.to_string(),
                key: "model_type".into(),
                expected: format!("one of {LLAMA_FAMILY:?}"),
            })?;
        if !LLAMA_FAMILY.contains(&model_type.as_str()) {
            return Err(PeftError::config_value(
                source,
                "model_type",
                format!("one of {LLAMA_FAMILY:?}"),
                format!("\"{model_type}\""),
            ));
        }
        let required = |f: &mut ConfigFields, key: &str| -> Result<usize> {
            if f.peek(key).is_none() {
                return Err(PeftError::MissingKey {
                    source_name: source.to_string(),
                    key: key.to_string(),
                    expected: "a positive integer".into(),
                });
            }
            let v = f.take_usize(key, 0)?;
            if v == 0 {
                return Err(PeftError::config_value(
                    source,
                    key,
                    "a positive integer",
                    0,
                ));
            }
            Ok(v)
        };
        let vocab_size = required(&mut f, "vocab_size")?;
        let hidden_size = required(&mut f, "hidden_size")?;
        let intermediate_size = required(&mut f, "intermediate_size")?;
        let num_hidden_layers = required(&mut f, "num_hidden_layers")?;
        let num_attention_heads = required(&mut f, "num_attention_heads")?;
        let num_key_value_heads = f.take_usize("num_key_value_heads", num_attention_heads)?;
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(PeftError::config_value(
                source,
                "num_key_value_heads",
                format!("a divisor of num_attention_heads ({num_attention_heads})"),
                num_key_value_heads,
            ));
        }
        let head_dim = match f.take_raw("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(PeftError::config_value(
                        source,
                        "hidden_size",
                        format!("a multiple of num_attention_heads ({num_attention_heads}) when head_dim is absent"),
                        hidden_size,
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(v) => v
                .as_u64()
                .filter(|d| *d > 0 && d % 2 == 0)
                .map(|d| d as usize)
                .ok_or_else(|| {
                    PeftError::config_value(
                        source,
                        "head_dim",
                        "a positive even integer",
                        peft_core::json::describe(&v),
                    )
                })?,
        };
        let hidden_act = f
            .take_opt_string("hidden_act")?
            .unwrap_or_else(|| "silu".into());
        let max_position_embeddings = f.take_usize("max_position_embeddings", 2048)?;
        let rms_norm_eps = f.take_f64("rms_norm_eps", 1e-6)?;
        // transformers 5 nests RoPE settings in `rope_parameters`; 4.x has `rope_theta` and `rope_scaling`.
        let top_theta = match f.peek("rope_theta") {
            Some(Value::Null) | None => None,
            Some(_) => Some(f.take_f64("rope_theta", 10000.0)?),
        };
        let mut rope_theta = top_theta;
        let mut rope_scaling = RopeScaling::Default;
        for key in ["rope_scaling", "rope_parameters"] {
            match f.take_raw(key) {
                None | Some(Value::Null) => {}
                Some(Value::Object(obj)) => {
                    let (theta, scaling) = rope_from(&obj, source, key)?;
                    rope_theta = theta.or(rope_theta);
                    if scaling != RopeScaling::Default || key == "rope_parameters" {
                        rope_scaling = scaling;
                    }
                }
                Some(v) => return Err(f.type_error(key, "an object", &v)),
            }
        }
        let default_theta = if model_type == "qwen2" {
            1_000_000.0
        } else {
            10000.0
        };
        let rope_theta = rope_theta.unwrap_or(default_theta);
        let tie_word_embeddings = f.take_bool("tie_word_embeddings", false)?;
        let (qkv_bias, o_bias) = if model_type == "qwen2" {
            (true, false)
        } else {
            let b = f.take_bool("attention_bias", false)?;
            (b, b)
        };
        let mlp_bias = if model_type == "llama" {
            f.take_bool("mlp_bias", false)?
        } else {
            false
        };
        let sliding_window = match f.take_raw("sliding_window") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                v.as_u64()
                    .filter(|w| *w > 0)
                    .map(|w| w as usize)
                    .ok_or_else(|| {
                        PeftError::config_value(
                            source,
                            "sliding_window",
                            "a positive integer or null",
                            peft_core::json::describe(&v),
                        )
                    })?,
            ),
        };
        let sliding_windows = match model_type.as_str() {
            "mistral" => vec![sliding_window; num_hidden_layers],
            "qwen2" => {
                let use_sw = f.take_bool("use_sliding_window", false)?;
                let max_window_layers = f.take_usize("max_window_layers", num_hidden_layers)?;
                (0..num_hidden_layers)
                    .map(|i| {
                        if use_sw && i >= max_window_layers {
                            sliding_window
                        } else {
                            None
                        }
                    })
                    .collect()
            }
            _ => vec![None; num_hidden_layers],
        };
        let pad_token_id = token_ids(&mut f, "pad_token_id")?.first().copied();
        let bos_token_id = token_ids(&mut f, "bos_token_id")?.first().copied();
        let eos_token_ids = token_ids(&mut f, "eos_token_id")?;
        let initializer_range = f.take_f64("initializer_range", 0.02)?;
        Ok(LlamaConfig {
            model_type,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            hidden_act,
            max_position_embeddings,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings,
            qkv_bias,
            o_bias,
            mlp_bias,
            sliding_windows,
            pad_token_id,
            bos_token_id,
            eos_token_ids,
            initializer_range,
            raw,
        })
    }

    /// A small LLaMA config for tests and demos (no `config.json` needed).
    pub fn tiny(
        vocab_size: usize,
        hidden_size: usize,
        layers: usize,
        heads: usize,
        kv_heads: usize,
        intermediate: usize,
    ) -> Self {
        let raw = serde_json::json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": vocab_size,
            "hidden_size": hidden_size,
            "intermediate_size": intermediate,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": hidden_size / heads,
            "hidden_act": "silu",
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
            "tie_word_embeddings": false,
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "dtype": "float32"
        });
        match raw {
            Value::Object(map) => {
                Self::from_map(map, "<tiny config>").expect("the tiny config is valid")
            }
            _ => unreachable!("json! object"),
        }
    }

    /// Per-pair inverse RoPE frequencies (f32, as transformers computes them).
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let base = self.rope_theta as f32;
        let mut inv: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / dim as f32))
            .collect();
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high, old) = (
                    factor as f32,
                    low_freq_factor as f32,
                    high_freq_factor as f32,
                    original_max_position_embeddings as f32,
                );
                let low_wavelen = old / low;
                let high_wavelen = old / high;
                for f in inv.iter_mut() {
                    let wavelen = 2.0 * std::f32::consts::PI / *f;
                    let scaled = if wavelen > low_wavelen {
                        *f / factor
                    } else {
                        *f
                    };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low) / (high - low);
                        (1.0 - smooth) * scaled / factor + smooth * scaled
                    } else {
                        scaled
                    };
                }
            }
        }
        inv
    }

    /// The transformers class name prefix (`Llama`, `Mistral`, `Qwen2`).
    pub fn class_prefix(&self) -> &'static str {
        match self.model_type.as_str() {
            "mistral" => "Mistral",
            "qwen2" => "Qwen2",
            _ => "Llama",
        }
    }

    /// transformers' class names of the model, decoder layer, attention, MLP, RMS norm and
    /// rotary embedding modules (as `named_modules()` reports them).
    pub fn module_classes(&self) -> [&'static str; 6] {
        match self.model_type.as_str() {
            "mistral" => [
                "MistralModel",
                "MistralDecoderLayer",
                "MistralAttention",
                "MistralMLP",
                "MistralRMSNorm",
                "MistralRotaryEmbedding",
            ],
            "qwen2" => [
                "Qwen2Model",
                "Qwen2DecoderLayer",
                "Qwen2Attention",
                "Qwen2MLP",
                "Qwen2RMSNorm",
                "Qwen2RotaryEmbedding",
            ],
            _ => [
                "LlamaModel",
                "LlamaDecoderLayer",
                "LlamaAttention",
                "LlamaMLP",
                "LlamaRMSNorm",
                "LlamaRotaryEmbedding",
            ],
        }
    }
}
