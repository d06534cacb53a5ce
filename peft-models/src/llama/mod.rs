//! The LLaMA family (Llama, Mistral, Qwen2) as a training-capable [`AdaptableModel`] that
//! mirrors transformers' `LlamaForCausalLM`: the same module paths and tensor names, grouped-
//! query attention, RoPE, padding masks, sliding windows, tied embeddings and a KV cache.
//! Every linear layer and the token embedding are swappable slots.

pub mod config;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::layers::{DenseEmbedding, DenseLinear, EmbeddingSlot, LinearSlot};
use peft_core::{
    AdaptableModel, KvCache, ModelInfo, ModelInputs, ModuleEntry, ModuleKind, PeftError, Result,
    TaskType,
};
use serde_json::Value;

pub use config::{LlamaConfig, RopeScaling};

use crate::ops::{self, AttentionMask, Rotary};
use crate::weights::ModelWeights;
use crate::Precision;

/// Supplies a frozen tensor by Hugging Face name and shape (loading or random init).
pub type TensorSource<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'a;

const ATTN_PROJ: [&str; 4] = ["q_proj", "k_proj", "v_proj", "o_proj"];
const MLP_PROJ: [&str; 3] = ["gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone)]
struct DecoderLayer {
    /// q, k, v, o projections.
    attn: [LinearSlot; 4],
    /// gate, up, down projections.
    mlp: [LinearSlot; 3],
    input_layernorm: Tensor,
    post_attention_layernorm: Tensor,
    sliding_window: Option<usize>,
}

/// A LLaMA-family causal language model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    cfg: LlamaConfig,
    info: ModelInfo,
    embed_tokens: EmbeddingSlot,
    layers: Vec<DecoderLayer>,
    norm: Tensor,
    lm_head: LinearSlot,
    /// The tied head as built, to tell whether it still shares the embedding.
    tied_head: Option<LinearSlot>,
    rotary: Rotary,
    device: Device,
    dtype: DType,
}

fn linear(
    src: &mut TensorSource<'_>,
    name: &str,
    out: usize,
    inp: usize,
    bias: bool,
) -> Result<LinearSlot> {
    let w = src(&format!("{name}.weight"), &[out, inp])?;
    let b = if bias {
        Some(src(&format!("{name}.bias"), &[out])?)
    } else {
        None
    };
    Ok(DenseLinear::new(w, b)?.into_slot())
}

impl LlamaModel {
    /// Builds the model from a config, taking each tensor from `src` by its HF name.
    pub fn build(
        cfg: LlamaConfig,
        src: &mut TensorSource<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let embed_w = src("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let embed_tokens =
            DenseEmbedding::new(embed_w.clone(), cfg.pad_token_id.map(|p| p as usize))?.into_slot();
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let attn = [
                linear(
                    src,
                    &format!("{p}.self_attn.q_proj"),
                    q_out,
                    h,
                    cfg.qkv_bias,
                )?,
                linear(
                    src,
                    &format!("{p}.self_attn.k_proj"),
                    kv_out,
                    h,
                    cfg.qkv_bias,
                )?,
                linear(
                    src,
                    &format!("{p}.self_attn.v_proj"),
                    kv_out,
                    h,
                    cfg.qkv_bias,
                )?,
                linear(src, &format!("{p}.self_attn.o_proj"), h, q_out, cfg.o_bias)?,
            ];
            let mlp = [
                linear(
                    src,
                    &format!("{p}.mlp.gate_proj"),
                    cfg.intermediate_size,
                    h,
                    cfg.mlp_bias,
                )?,
                linear(
                    src,
                    &format!("{p}.mlp.up_proj"),
                    cfg.intermediate_size,
                    h,
                    cfg.mlp_bias,
                )?,
                linear(
                    src,
                    &format!("{p}.mlp.down_proj"),
                    h,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
            ];
            layers.push(DecoderLayer {
                attn,
                mlp,
                input_layernorm: src(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_attention_layernorm: src(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                )?,
                sliding_window: cfg.sliding_windows.get(i).copied().flatten(),
            });
        }
        let norm = src("model.norm.weight", &[h])?;
        let (lm_head, tied_head) = if cfg.tie_word_embeddings {
            let head = DenseLinear::new(embed_w, None)?.into_slot();
            (Arc::clone(&head), Some(head))
        } else {
            (linear(src, "lm_head", cfg.vocab_size, h, false)?, None)
        };
        let info = ModelInfo {
            model_type: cfg.model_type.clone(),
            architecture: format!("{}ForCausalLM", cfg.class_prefix()),
            task_type: TaskType::CausalLm,
            num_layers: cfg.num_hidden_layers,
            hidden_size: h,
            num_attention_heads: cfg.num_attention_heads,
            num_key_value_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            vocab_size: cfg.vocab_size,
            input_embedding: Some("model.embed_tokens".to_string()),
            output_heads: vec!["lm_head".to_string()],
            tie_word_embeddings: cfg.tie_word_embeddings,
            is_encoder_decoder: false,
            decoder_start_token_id: None,
            num_labels: None,
            name_or_path: None,
        };
        let rotary = Rotary::new(cfg.inv_freq(), 1.0, device)?;
        Ok(LlamaModel {
            cfg,
            info,
            embed_tokens,
            layers,
            norm,
            lm_head,
            tied_head,
            rotary,
            device: device.clone(),
            dtype,
        })
    }

    /// Loads a Hugging Face model folder (`config.json` + safetensors) in `dtype`.
    pub fn from_folder(dir: &Path, dtype: impl Into<Precision>, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| PeftError::io(&config_path, e))?;
        let cfg = LlamaConfig::from_json_str(&text, &config_path.display().to_string())?;
        let weights = ModelWeights::open(dir, dtype, device)?;
        let mut model = Self::build(
            cfg,
            &mut |name, shape| weights.get(name, shape),
            weights.dtype(),
            device,
        )?;
        model.info.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// A model with random weights (normal with std `initializer_range`, norms at one),
    /// reproducible from `seed`; used for tests, demos and benchmarks.
    pub fn random(cfg: LlamaConfig, seed: u64, dtype: impl Into<Precision>, device: &Device) -> Result<Self> {
        let precision = dtype.into();
        let mut src = crate::init::random_source(seed, cfg.initializer_range as f32, precision, device);
        Self::build(cfg, &mut src, precision.compute, device)
    }

    /// The resolved config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Sets the name recorded in saved adapter configs (`base_model_name_or_path`).
    pub fn set_name_or_path(&mut self, name: impl Into<String>) {
        self.info.name_or_path = Some(name.into());
    }

    fn default_positions(&self, b: usize, t: usize, past: usize) -> Result<Tensor> {
        let pos = Tensor::arange(past as u32, (past + t) as u32, &self.device)?;
        Ok(pos.unsqueeze(0)?.expand((b, t))?)
    }

    #[allow(clippy::too_many_arguments)] // one attention call's inputs, all distinct
    fn attention(
        &self,
        layer: &DecoderLayer,
        layer_idx: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&AttentionMask>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let q = ops::rope_heads(&layer.attn[0].forward(x)?, nh, cos, sin)?;
        let k = ops::rope_heads(&layer.attn[1].forward(x)?, nkv, cos, sin)?;
        let v = layer.attn[2]
            .forward(x)?
            .reshape((b, t, nkv, hd))?
            .transpose(1, 2)?;
        let (k, v) = ops::cache_kv(k, v, layer_idx, cache)?;
        // Grouped key/value heads are mapped onto query heads inside the attention.
        let out = ops::attention(&q, &k, &v, 1.0 / (hd as f64).sqrt(), mask)?;
        let out = out.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        layer.attn[3].forward(&out)
    }

    fn mlp(&self, layer: &DecoderLayer, x: &Tensor) -> Result<Tensor> {
        let gate = layer.mlp[0].forward(x)?;
        let up = layer.mlp[1].forward(x)?;
        layer.mlp[2].forward(&ops::gated(&self.cfg.hidden_act, &gate, &up)?)
    }

    /// Runs the decoder stack and returns the final hidden states `[B, T, hidden]`.
    pub fn hidden_states(
        &self,
        inputs: &ModelInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        inputs.check_supported(&self.cfg.model_type, false, false)?;
        let (b, t) = inputs.batch_and_len()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let mut h = match (&inputs.inputs_embeds, &inputs.input_ids) {
            (Some(e), _) => {
                let d = e.dim(2)?;
                if d != self.cfg.hidden_size {
                    return Err(PeftError::bad_input(
                        "inputs_embeds",
                        format!("hidden size {}", self.cfg.hidden_size),
                        d.to_string(),
                    ));
                }
                e.to_dtype(self.dtype)?
            }
            (None, Some(ids)) => self.embed_tokens(ids)?,
            (None, None) => unreachable!("batch_and_len checked the inputs"),
        };
        let positions = match &inputs.position_ids {
            Some(p) if p.dims() == [b, t] => p.clone(),
            Some(p) => {
                return Err(PeftError::bad_input(
                    "position_ids",
                    format!("shape [{b}, {t}]"),
                    format!("{:?}", p.dims()),
                ))
            }
            None => self.default_positions(b, t, past)?,
        };
        let (cos, sin) = self.rotary.cos_sin(&positions, self.dtype)?;
        // Layers share a mask unless their sliding windows differ.
        let mut masks: Vec<(Option<usize>, Option<AttentionMask>)> = Vec::new();
        for (i, layer) in self.layers.iter().enumerate() {
            let w = layer.sliding_window;
            if !masks.iter().any(|(mw, _)| *mw == w) {
                let m =
                    ops::causal_mask(inputs.attention_mask.as_ref(), b, t, past, w, &self.device)?;
                masks.push((w, m));
            }
            let mask = masks
                .iter()
                .find(|(mw, _)| *mw == w)
                .and_then(|(_, m)| m.as_ref());
            let normed = ops::rms_norm(&h, &layer.input_layernorm, self.cfg.rms_norm_eps)?;
            let attn = self.attention(layer, i, &normed, &cos, &sin, mask, cache.as_deref_mut())?;
            h = (h + attn)?;
            let normed = ops::rms_norm(&h, &layer.post_attention_layernorm, self.cfg.rms_norm_eps)?;
            h = (&h + self.mlp(layer, &normed)?)?;
        }
        ops::rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)
    }

    fn head_is_tied(&self) -> bool {
        self.tied_head
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &self.lm_head))
    }
}

impl AdaptableModel for LlamaModel {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn modules(&self) -> Vec<ModuleEntry> {
        let (model_cls, layer_cls, attn_cls, mlp_cls, norm_cls, rot_cls) =
            match self.cfg.model_type.as_str() {
                "mistral" => (
                    "MistralModel",
                    "MistralDecoderLayer",
                    "MistralAttention",
                    "MistralMLP",
                    "MistralRMSNorm",
                    "MistralRotaryEmbedding",
                ),
                "qwen2" => (
                    "Qwen2Model",
                    "Qwen2DecoderLayer",
                    "Qwen2Attention",
                    "Qwen2MLP",
                    "Qwen2RMSNorm",
                    "Qwen2RotaryEmbedding",
                ),
                _ => (
                    "LlamaModel",
                    "LlamaDecoderLayer",
                    "LlamaAttention",
                    "LlamaMLP",
                    "LlamaRMSNorm",
                    "LlamaRotaryEmbedding",
                ),
            };
        let mut out = vec![
            ModuleEntry::new("model", ModuleKind::Other(model_cls)),
            ModuleEntry::new("model.embed_tokens", ModuleKind::Embedding),
            ModuleEntry::new("model.layers", ModuleKind::Other("ModuleList")),
        ];
        for i in 0..self.layers.len() {
            let p = format!("model.layers.{i}");
            out.push(ModuleEntry::new(&p, ModuleKind::Other(layer_cls)));
            out.push(ModuleEntry::new(
                format!("{p}.self_attn"),
                ModuleKind::Other(attn_cls),
            ));
            for n in ATTN_PROJ {
                out.push(ModuleEntry::new(
                    format!("{p}.self_attn.{n}"),
                    ModuleKind::Linear,
                ));
            }
            out.push(ModuleEntry::new(
                format!("{p}.mlp"),
                ModuleKind::Other(mlp_cls),
            ));
            for n in MLP_PROJ {
                out.push(ModuleEntry::new(format!("{p}.mlp.{n}"), ModuleKind::Linear));
            }
            out.push(ModuleEntry::new(
                format!("{p}.mlp.act_fn"),
                ModuleKind::Other("SiLUActivation"),
            ));
            out.push(ModuleEntry::new(
                format!("{p}.input_layernorm"),
                ModuleKind::Other(norm_cls),
            ));
            out.push(ModuleEntry::new(
                format!("{p}.post_attention_layernorm"),
                ModuleKind::Other(norm_cls),
            ));
        }
        out.push(ModuleEntry::new("model.norm", ModuleKind::Other(norm_cls)));
        out.push(ModuleEntry::new(
            "model.rotary_emb",
            ModuleKind::Other(rot_cls),
        ));
        out.push(ModuleEntry::new("lm_head", ModuleKind::Linear));
        out
    }

    fn visit_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut LinearSlot) -> Result<()>,
    ) -> Result<()> {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            for (slot, name) in layer.attn.iter_mut().zip(ATTN_PROJ) {
                f(&format!("model.layers.{i}.self_attn.{name}"), slot)?;
            }
            for (slot, name) in layer.mlp.iter_mut().zip(MLP_PROJ) {
                f(&format!("model.layers.{i}.mlp.{name}"), slot)?;
            }
        }
        f("lm_head", &mut self.lm_head)
    }

    fn visit_embeddings(
        &mut self,
        f: &mut dyn FnMut(&str, &mut EmbeddingSlot) -> Result<()>,
    ) -> Result<()> {
        f("model.embed_tokens", &mut self.embed_tokens)
    }

    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        crate::check_token_ids(input_ids, self.cfg.vocab_size)?;
        Ok(self
            .embed_tokens
            .forward(&input_ids.to_dtype(DType::U32)?)?
            .to_dtype(self.dtype)?)
    }

    fn forward(&self, inputs: &ModelInputs, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden_states(inputs, cache)?;
        self.lm_head.forward(&peft_core::model::keep_last_positions(&h, inputs.logits_to_keep)?)
    }

    fn token_loss(
        &self,
        inputs: &ModelInputs,
        cache: Option<&mut KvCache>,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let h = self.hidden_states(inputs, cache)?;
        peft_core::loss::head_cross_entropy(&h, self.lm_head.as_ref(), targets)
    }

    fn num_parameters(&self) -> usize {
        let c = &self.cfg;
        let mut n = c.vocab_size * c.hidden_size + c.hidden_size;
        for layer in &self.layers {
            n += layer
                .attn
                .iter()
                .chain(layer.mlp.iter())
                .map(|l| l.num_params())
                .sum::<usize>();
            n += 2 * c.hidden_size;
        }
        if !self.head_is_tied() {
            n += self.lm_head.num_params();
        }
        n
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            self.embed_tokens.weight()?,
        )];
        let mut push_linear = |name: String, slot: &LinearSlot| -> Result<()> {
            out.push((format!("{name}.weight"), slot.weight()?));
            if let Some(b) = slot.bias() {
                out.push((format!("{name}.bias"), b.clone()));
            }
            Ok(())
        };
        for (i, layer) in self.layers.iter().enumerate() {
            for (slot, n) in layer.attn.iter().zip(ATTN_PROJ) {
                push_linear(format!("model.layers.{i}.self_attn.{n}"), slot)?;
            }
            for (slot, n) in layer.mlp.iter().zip(MLP_PROJ) {
                push_linear(format!("model.layers.{i}.mlp.{n}"), slot)?;
            }
        }
        if !self.head_is_tied() {
            push_linear("lm_head".into(), &self.lm_head)?;
        }
        for (i, layer) in self.layers.iter().enumerate() {
            out.push((
                format!("model.layers.{i}.input_layernorm.weight"),
                layer.input_layernorm.clone(),
            ));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                layer.post_attention_layernorm.clone(),
            ));
        }
        out.push(("model.norm.weight".into(), self.norm.clone()));
        Ok(out)
    }

    fn config_json(&self) -> Value {
        crate::config_with(&self.cfg.raw, self.head_is_tied(), self.dtype)
    }

    fn device(&self) -> &Device {
        &self.device
    }

    fn dtype(&self) -> DType {
        self.dtype
    }
}
