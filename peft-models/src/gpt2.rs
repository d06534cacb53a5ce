//! GPT-2 (`GPT2LMHeadModel`) as a training-capable [`AdaptableModel`]. Its linear layers are
//! Conv1D: weights stored `[in, out]`, which the slots report so that LoRA applies peft's
//! `fan_in_fan_out` and merges transposed. The fused `c_attn` projects q, k and v at once.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::json::{parse_object, ConfigFields};
use peft_core::layers::{DenseEmbedding, DenseLinear, EmbeddingSlot, LinearSlot};
use peft_core::{
    AdaptableModel, KvCache, ModelInfo, ModelInputs, ModuleEntry, ModuleKind, PeftError, Result,
    TaskType,
};
use serde_json::{Map, Value};

use crate::ops;
use crate::weights::ModelWeights;

/// A resolved GPT-2 configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Gpt2Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Longest sequence (`n_positions`).
    pub n_positions: usize,
    /// Hidden size (`n_embd`).
    pub n_embd: usize,
    /// Layers (`n_layer`).
    pub n_layer: usize,
    /// Attention heads (`n_head`).
    pub n_head: usize,
    /// MLP inner size (`n_inner`, default `4 * n_embd`).
    pub n_inner: usize,
    /// Activation (`activation_function`).
    pub activation: String,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Scale attention scores by `1/sqrt(head_dim)`.
    pub scale_attn_weights: bool,
    /// Whether `lm_head` shares `wte`.
    pub tie_word_embeddings: bool,
    /// Initializer std for random weights.
    pub initializer_range: f64,
    /// The config.json object as read.
    pub raw: Map<String, Value>,
}

impl Gpt2Config {
    /// Resolves a parsed `config.json`.
    pub fn from_map(raw: Map<String, Value>, source: &str) -> Result<Self> {
        let mut f = ConfigFields::new(source, raw.clone());
        let n_embd = f.take_usize("n_embd", 768)?;
        let n_head = f.take_usize("n_head", 12)?;
        if n_head == 0 || n_embd % n_head != 0 {
            return Err(PeftError::config_value(
                source,
                "n_head",
                format!("a divisor of n_embd ({n_embd})"),
                n_head,
            ));
        }
        let n_inner = match f.take_raw("n_inner") {
            None | Some(Value::Null) => 4 * n_embd,
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| f.type_error("n_inner", "an integer or null", &v))?,
        };
        for key in ["scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"] {
            if f.take_bool(key, false)? {
                return Err(PeftError::Unsupported {
                    source_name: source.to_string(),
                    key: key.into(),
                    value: "true".into(),
                    reason: "this GPT-2 attention variant is not implemented".into(),
                });
            }
        }
        Ok(Gpt2Config {
            vocab_size: f.take_usize("vocab_size", 50257)?,
            n_positions: f.take_usize("n_positions", 1024)?,
            n_embd,
            n_layer: f.take_usize("n_layer", 12)?,
            n_head,
            n_inner,
            activation: f
                .take_opt_string("activation_function")?
                .unwrap_or_else(|| "gelu_new".into()),
            layer_norm_epsilon: f.take_f64("layer_norm_epsilon", 1e-5)?,
            scale_attn_weights: f.take_bool("scale_attn_weights", true)?,
            tie_word_embeddings: f.take_bool("tie_word_embeddings", true)?,
            initializer_range: f.take_f64("initializer_range", 0.02)?,
            raw,
        })
    }
}

#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

#[derive(Debug, Clone)]
struct Block {
    ln_1: LayerNorm,
    c_attn: LinearSlot,
    attn_proj: LinearSlot,
    ln_2: LayerNorm,
    c_fc: LinearSlot,
    mlp_proj: LinearSlot,
}

/// GPT-2 with a language-modelling head.
#[derive(Debug, Clone)]
pub struct Gpt2Model {
    cfg: Gpt2Config,
    info: ModelInfo,
    wte: EmbeddingSlot,
    wpe: EmbeddingSlot,
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    lm_head: LinearSlot,
    tied_head: Option<LinearSlot>,
    device: Device,
    dtype: DType,
}

type Source<'a> = dyn FnMut(&str, &[usize]) -> Result<Tensor> + 'a;

fn conv1d(src: &mut Source<'_>, name: &str, inp: usize, out: usize) -> Result<LinearSlot> {
    let w = src(&format!("{name}.weight"), &[inp, out])?;
    let b = src(&format!("{name}.bias"), &[out])?;
    Ok(DenseLinear::new_transposed(w, Some(b))?.into_slot())
}

fn layer_norm(src: &mut Source<'_>, name: &str, dim: usize) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: src(&format!("{name}.weight"), &[dim])?,
        bias: src(&format!("{name}.bias"), &[dim])?,
    })
}

impl Gpt2Model {
    /// Builds the model, taking each tensor from `src` by its HF name.
    pub fn build(
        cfg: Gpt2Config,
        src: &mut Source<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.n_embd;
        let wte_w = src("transformer.wte.weight", &[cfg.vocab_size, d])?;
        let wte = DenseEmbedding::new(wte_w.clone(), None)?.into_slot();
        let wpe = DenseEmbedding::new(src("transformer.wpe.weight", &[cfg.n_positions, d])?, None)?
            .into_slot();
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let p = format!("transformer.h.{i}");
            blocks.push(Block {
                ln_1: layer_norm(src, &format!("{p}.ln_1"), d)?,
                c_attn: conv1d(src, &format!("{p}.attn.c_attn"), d, 3 * d)?,
                attn_proj: conv1d(src, &format!("{p}.attn.c_proj"), d, d)?,
                ln_2: layer_norm(src, &format!("{p}.ln_2"), d)?,
                c_fc: conv1d(src, &format!("{p}.mlp.c_fc"), d, cfg.n_inner)?,
                mlp_proj: conv1d(src, &format!("{p}.mlp.c_proj"), cfg.n_inner, d)?,
            });
        }
        let ln_f = layer_norm(src, "transformer.ln_f", d)?;
        let (lm_head, tied_head) = if cfg.tie_word_embeddings {
            let head = DenseLinear::new(wte_w, None)?.into_slot();
            (Arc::clone(&head), Some(head))
        } else {
            (
                DenseLinear::new(src("lm_head.weight", &[cfg.vocab_size, d])?, None)?.into_slot(),
                None,
            )
        };
        let info = ModelInfo {
            model_type: "gpt2".into(),
            architecture: "GPT2LMHeadModel".into(),
            task_type: TaskType::CausalLm,
            num_layers: cfg.n_layer,
            hidden_size: d,
            num_attention_heads: cfg.n_head,
            num_key_value_heads: cfg.n_head,
            head_dim: d / cfg.n_head,
            vocab_size: cfg.vocab_size,
            input_embedding: Some("transformer.wte".into()),
            output_heads: vec!["lm_head".into()],
            tie_word_embeddings: cfg.tie_word_embeddings,
            is_encoder_decoder: false,
            decoder_start_token_id: None,
            num_labels: None,
            name_or_path: None,
        };
        Ok(Gpt2Model {
            cfg,
            info,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
            tied_head,
            device: device.clone(),
            dtype,
        })
    }

    /// Loads a Hugging Face folder. Checkpoints with or without the `transformer.` prefix load.
    pub fn from_folder(dir: &Path, dtype: impl Into<crate::Precision>, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| PeftError::io(&config_path, e))?;
        let source = config_path.display().to_string();
        let cfg = Gpt2Config::from_map(parse_object(&text, &source)?, &source)?;
        let weights = ModelWeights::open(dir, dtype, device)?;
        let mut src = |name: &str, shape: &[usize]| {
            let bare = name.strip_prefix("transformer.").unwrap_or(name);
            if !weights.contains(name) && weights.contains(bare) {
                weights.get(bare, shape)
            } else {
                weights.get(name, shape)
            }
        };
        let mut model = Self::build(cfg, &mut src, weights.dtype(), device)?;
        model.info.name_or_path = Some(dir.display().to_string());
        Ok(model)
    }

    /// A model with random weights, reproducible from `seed`.
    pub fn random(cfg: Gpt2Config, seed: u64, dtype: impl Into<crate::Precision>, device: &Device) -> Result<Self> {
        let precision = dtype.into();
        let mut src = crate::init::random_source(seed, cfg.initializer_range as f32, precision, device);
        Self::build(cfg, &mut src, precision.compute, device)
    }

    fn norm(&self, x: &Tensor, ln: &LayerNorm) -> Result<Tensor> {
        ops::layer_norm(x, &ln.weight, Some(&ln.bias), self.cfg.layer_norm_epsilon)
    }

    fn head_is_tied(&self) -> bool {
        self.tied_head
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, &self.lm_head))
    }

    /// Runs the blocks and the final layer norm: the hidden states `[B, T, n_embd]`.
    fn hidden_states(&self, inputs: &ModelInputs, mut cache: Option<&mut KvCache>) -> Result<Tensor> {
        inputs.check_supported("gpt2", false, false)?;
        let (b, t) = inputs.batch_and_len()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let tokens = match (&inputs.inputs_embeds, &inputs.input_ids) {
            (Some(e), _) => e.to_dtype(self.dtype)?,
            (None, Some(ids)) => self.embed_tokens(ids)?,
            (None, None) => unreachable!("batch_and_len checked the inputs"),
        };
        let positions = match &inputs.position_ids {
            Some(p) => p.clone(),
            None => Tensor::arange(past as u32, (past + t) as u32, &self.device)?
                .unsqueeze(0)?
                .expand((b, t))?,
        };
        if past + t > self.cfg.n_positions {
            return Err(PeftError::bad_input(
                "gpt2 input",
                format!("at most n_positions = {} positions", self.cfg.n_positions),
                format!("{} (cached {past} + new {t})", past + t),
            ));
        }
        let mut h = (tokens
            + self
                .wpe
                .forward(&positions.to_dtype(DType::U32)?)?
                .to_dtype(self.dtype)?)?;
        let mask = ops::causal_mask(
            inputs.attention_mask.as_ref(),
            b,
            t,
            past,
            None,
            &self.device,
        )?;
        let (nh, d) = (self.cfg.n_head, self.cfg.n_embd);
        let hd = d / nh;
        let scale = if self.cfg.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        for (i, block) in self.blocks.iter().enumerate() {
            let a = self.norm(&h, &block.ln_1)?;
            let qkv = block.c_attn.forward(&a)?;
            let heads =
                |x: Tensor| -> Result<Tensor> { Ok(x.reshape((b, t, nh, hd))?.transpose(1, 2)?) };
            let q = heads(qkv.narrow(2, 0, d)?)?;
            let k = heads(qkv.narrow(2, d, d)?)?;
            let v = heads(qkv.narrow(2, 2 * d, d)?)?;
            let (k, v) = ops::cache_kv(k, v, i, cache.as_deref_mut())?;
            let attn = ops::attention(&q, &k, &v, scale, mask.as_ref())?
                .transpose(1, 2)?
                .reshape((b, t, d))?;
            h = (h + block.attn_proj.forward(&attn)?)?;
            let m = self.norm(&h, &block.ln_2)?;
            let m = ops::activation(&self.cfg.activation, &block.c_fc.forward(&m)?)?;
            h = (h + block.mlp_proj.forward(&m)?)?;
        }
        self.norm(&h, &self.ln_f)
    }
}

impl AdaptableModel for Gpt2Model {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn modules(&self) -> Vec<ModuleEntry> {
        let other = |p: String, c: &'static str| ModuleEntry::new(p, ModuleKind::Other(c));
        let mut out = vec![
            other("transformer".into(), "GPT2Model"),
            ModuleEntry::new("transformer.wte", ModuleKind::Embedding),
            ModuleEntry::new("transformer.wpe", ModuleKind::Embedding),
            other("transformer.drop".into(), "Dropout"),
            other("transformer.h".into(), "ModuleList"),
        ];
        for i in 0..self.blocks.len() {
            let p = format!("transformer.h.{i}");
            out.push(other(p.clone(), "GPT2Block"));
            out.push(other(format!("{p}.ln_1"), "LayerNorm"));
            out.push(other(format!("{p}.attn"), "GPT2Attention"));
            out.push(ModuleEntry::new(
                format!("{p}.attn.c_attn"),
                ModuleKind::Linear,
            ));
            out.push(ModuleEntry::new(
                format!("{p}.attn.c_proj"),
                ModuleKind::Linear,
            ));
            out.push(other(format!("{p}.attn.attn_dropout"), "Dropout"));
            out.push(other(format!("{p}.attn.resid_dropout"), "Dropout"));
            out.push(other(format!("{p}.ln_2"), "LayerNorm"));
            out.push(other(format!("{p}.mlp"), "GPT2MLP"));
            out.push(ModuleEntry::new(
                format!("{p}.mlp.c_fc"),
                ModuleKind::Linear,
            ));
            out.push(ModuleEntry::new(
                format!("{p}.mlp.c_proj"),
                ModuleKind::Linear,
            ));
            out.push(other(format!("{p}.mlp.act"), "NewGELUActivation"));
            out.push(other(format!("{p}.mlp.dropout"), "Dropout"));
        }
        out.push(other("transformer.ln_f".into(), "LayerNorm"));
        out.push(ModuleEntry::new("lm_head", ModuleKind::Linear));
        out
    }

    fn visit_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut LinearSlot) -> Result<()>,
    ) -> Result<()> {
        for (i, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("transformer.h.{i}");
            f(&format!("{p}.attn.c_attn"), &mut b.c_attn)?;
            f(&format!("{p}.attn.c_proj"), &mut b.attn_proj)?;
            f(&format!("{p}.mlp.c_fc"), &mut b.c_fc)?;
            f(&format!("{p}.mlp.c_proj"), &mut b.mlp_proj)?;
        }
        f("lm_head", &mut self.lm_head)
    }

    fn visit_embeddings(
        &mut self,
        f: &mut dyn FnMut(&str, &mut EmbeddingSlot) -> Result<()>,
    ) -> Result<()> {
        f("transformer.wte", &mut self.wte)?;
        f("transformer.wpe", &mut self.wpe)
    }

    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        crate::check_token_ids(input_ids, self.cfg.vocab_size)?;
        Ok(self
            .wte
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
        let d = self.cfg.n_embd;
        let mut n = self.wte.num_embeddings() * d + self.wpe.num_embeddings() * d + 2 * d;
        for b in &self.blocks {
            n += 4 * d
                + [&b.c_attn, &b.attn_proj, &b.c_fc, &b.mlp_proj]
                    .iter()
                    .map(|l| l.num_params())
                    .sum::<usize>();
        }
        if !self.head_is_tied() {
            n += self.lm_head.num_params();
        }
        n
    }

    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![
            ("transformer.wte.weight".to_string(), self.wte.weight()?),
            ("transformer.wpe.weight".to_string(), self.wpe.weight()?),
        ];
        let ln = |name: String, l: &LayerNorm, out: &mut Vec<(String, Tensor)>| {
            out.push((format!("{name}.weight"), l.weight.clone()));
            out.push((format!("{name}.bias"), l.bias.clone()));
        };
        for (i, b) in self.blocks.iter().enumerate() {
            let p = format!("transformer.h.{i}");
            ln(format!("{p}.ln_1"), &b.ln_1, &mut out);
            ln(format!("{p}.ln_2"), &b.ln_2, &mut out);
            for (name, slot) in [
                ("attn.c_attn", &b.c_attn),
                ("attn.c_proj", &b.attn_proj),
                ("mlp.c_fc", &b.c_fc),
                ("mlp.c_proj", &b.mlp_proj),
            ] {
                out.push((format!("{p}.{name}.weight"), slot.weight()?));
                if let Some(bias) = slot.bias() {
                    out.push((format!("{p}.{name}.bias"), bias.clone()));
                }
            }
        }
        ln("transformer.ln_f".into(), &self.ln_f, &mut out);
        if !self.head_is_tied() {
            out.push(("lm_head.weight".into(), self.lm_head.weight()?));
        }
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
