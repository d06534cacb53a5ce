//! T5, mT5, mT0 and Flan-T5 (`T5ForConditionalGeneration`) as a training-capable
//! [`AdaptableModel`]: encoder-decoder with relative position bias, cross-attention, `relu` and
//! `gated-gelu` feed-forwards, tied and untied heads (with the tied-head output scaling), and a
//! KV cache holding the encoder output and each layer's cross-attention keys and values.
//!
//! Head tying follows `config.json` as the checkpoints store it: `tie_word_embeddings: false`
//! (T5 v1.1, mT5, mT0, Flan-T5) means a separate `lm_head` and no output scaling. A
//! `scale_decoder_outputs` key (written by transformers 5) decides the scaling when present.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::json::ConfigFields;
use peft_core::{
    AdaptableModel, BaseLayerFactory, EmbeddingId, KvCache, LinearId, LinearRole, LinearSpec,
    ModelBuilder, ModelCore, ModelInfo, ModelInputs, ModuleTree, ParamId, PeftError, Result, Scope,
    TaskType,
};
use serde_json::{Map, Value};

use crate::blocks::{Attention, LmHead, Mlp, Qkv};
use crate::ops::{self, AttentionMask};

/// A resolved T5-family configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct T5Config {
    /// `t5` or `mt5`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Width of one head.
    pub d_kv: usize,
    /// Feed-forward size.
    pub d_ff: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Decoder layers.
    pub num_decoder_layers: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Relative position buckets.
    pub relative_attention_num_buckets: usize,
    /// Largest distance with its own bucket range.
    pub relative_attention_max_distance: usize,
    /// Feed-forward activation (`relu`, `gelu_new`, ...).
    pub dense_act_fn: String,
    /// Gated feed-forward (`wi_0`, `wi_1`).
    pub is_gated_act: bool,
    /// Layer norm epsilon.
    pub layer_norm_epsilon: f64,
    /// Whether `lm_head` shares the embedding.
    pub tie_word_embeddings: bool,
    /// Whether decoder outputs are scaled by `d_model^-0.5` before the head.
    pub scale_decoder_outputs: bool,
    /// First decoder token.
    pub decoder_start_token_id: u32,
    /// End-of-sequence ids.
    pub eos_token_ids: Vec<u32>,
    /// The config.json object as read.
    pub raw: Map<String, Value>,
}

impl T5Config {
    /// Resolves a parsed `config.json`.
    pub fn from_map(raw: Map<String, Value>, source: &str) -> Result<Self> {
        let mut f = ConfigFields::new(source, raw.clone());
        let model_type = f
            .take_opt_string("model_type")?
            .unwrap_or_else(|| "t5".into());
        let num_layers = f.take_usize("num_layers", 6)?;
        let num_decoder_layers = match f.take_raw("num_decoder_layers") {
            None | Some(Value::Null) => num_layers,
            Some(v) => v
                .as_u64()
                .map(|x| x as usize)
                .ok_or_else(|| f.type_error("num_decoder_layers", "an integer", &v))?,
        };
        let default_ff = if model_type == "mt5" {
            "gated-gelu"
        } else {
            "relu"
        };
        let ff = f
            .take_opt_string("feed_forward_proj")?
            .unwrap_or_else(|| default_ff.into());
        let parts: Vec<&str> = ff.split('-').collect();
        let (is_gated_act, act) = match parts.as_slice() {
            [act] => (false, act.to_string()),
            ["gated", act] => (true, act.to_string()),
            _ => {
                return Err(PeftError::config_value(
                    source,
                    "feed_forward_proj",
                    "`ACT` or `gated-ACT`",
                    format!("\"{ff}\""),
                ))
            }
        };
        let dense_act_fn = if ff == "gated-gelu" {
            "gelu_new".to_string()
        } else {
            act
        };
        let tie_word_embeddings = f.take_bool("tie_word_embeddings", true)?;
        let scale_decoder_outputs = match f.take_raw("scale_decoder_outputs") {
            Some(Value::Bool(b)) => b,
            // transformers 5 never scales mT5; T5 scales exactly when the head is tied.
            _ => model_type == "t5" && tie_word_embeddings,
        };
        let eos = match f.take_raw("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|v| vec![v as u32]).unwrap_or_default(),
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(Value::as_u64)
                .map(|v| v as u32)
                .collect(),
            _ => vec![1],
        };
        Ok(T5Config {
            vocab_size: f.take_usize("vocab_size", 32128)?,
            d_model: f.take_usize("d_model", 512)?,
            d_kv: f.take_usize("d_kv", 64)?,
            d_ff: f.take_usize("d_ff", 2048)?,
            num_layers,
            num_decoder_layers,
            num_heads: f.take_usize("num_heads", 8)?,
            relative_attention_num_buckets: f.take_usize("relative_attention_num_buckets", 32)?,
            relative_attention_max_distance: f
                .take_usize("relative_attention_max_distance", 128)?,
            dense_act_fn,
            is_gated_act,
            layer_norm_epsilon: f.take_f64("layer_norm_epsilon", 1e-6)?,
            tie_word_embeddings,
            scale_decoder_outputs,
            decoder_start_token_id: f.take_usize("decoder_start_token_id", 0)? as u32,
            eos_token_ids: eos,
            model_type,
            raw,
        })
    }

    fn inner(&self) -> usize {
        self.num_heads * self.d_kv
    }
}

/// One `T5Block`: the toolkit's attention and MLP blocks, each behind its pre-norm.
#[derive(Debug, Clone)]
struct Block {
    self_attn: Attention,
    /// Block 0's `relative_attention_bias` table `[buckets, heads]`.
    relative_bias: Option<ParamId>,
    self_norm: ParamId,
    cross_attn: Option<(Attention, ParamId)>,
    ff: Mlp,
    ff_norm: ParamId,
}

/// What a block's forward pass reads besides its inputs: the norm epsilon and the activation.
#[derive(Debug, Clone)]
struct BlockParams {
    eps: f64,
    act: String,
}

impl Block {
    fn norm(tree: &ModuleTree, x: &Tensor, w: ParamId, eps: f64) -> Result<Tensor> {
        ops::rms_norm(x, tree.param(w), eps)
    }

    /// Self-attention sub-layer: pre-norm, attention (relative position bias in `mask`),
    /// residual.
    fn self_attention(
        &self,
        tree: &ModuleTree,
        p: &BlockParams,
        h: Tensor,
        mask: &AttentionMask,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let x = Self::norm(tree, &h, self.self_norm, p.eps)?;
        let y = self
            .self_attn
            .forward(tree, &x, None, 1.0, Some(mask), layer, cache)?;
        Ok((h + y)?)
    }

    /// The feed-forward sub-layer both stacks share: pre-norm, MLP, residual.
    fn feed_forward(&self, tree: &ModuleTree, p: &BlockParams, h: Tensor) -> Result<Tensor> {
        let x = Self::norm(tree, &h, self.ff_norm, p.eps)?;
        let y = self.ff.forward(tree, &x, &p.act)?;
        Ok((&h + y)?)
    }

    /// A decoder block: self-attention over `h` (extending layer `i` of `cache`),
    /// cross-attention to the encoder output through `cross_kv` (keys and values, or computed
    /// from `encoded` when not given), feed-forward.
    #[allow(clippy::too_many_arguments)] // one decoder block's inputs, all distinct
    fn decode(
        &self,
        tree: &ModuleTree,
        p: &BlockParams,
        h: Tensor,
        encoded: &Tensor,
        cross_kv: Option<(Tensor, Tensor)>,
        masks: (&AttentionMask, &AttentionMask),
        i: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let mut h = self.self_attention(tree, p, h, masks.0, i, cache)?;
        if let Some((cross, norm)) = &self.cross_attn {
            let x = Self::norm(tree, &h, *norm, p.eps)?;
            let (k, v) = match cross_kv {
                Some(kv) => kv,
                None => cross.keys_values(tree, encoded)?,
            };
            h = (h + cross.attend(tree, &x, &k, &v, 1.0, Some(masks.1))?)?;
        }
        self.feed_forward(tree, p, h)
    }
}

/// A T5-family encoder-decoder with a language-modelling head.
#[derive(Debug, Clone)]
pub struct T5Model {
    cfg: T5Config,
    core: ModelCore,
    shared: EmbeddingId,
    encoder_embed: EmbeddingId,
    decoder_embed: EmbeddingId,
    encoder: Vec<Block>,
    encoder_norm: ParamId,
    decoder: Vec<Block>,
    decoder_norm: ParamId,
    lm_head: LinearId,
}

/// T5's relative position bucket (`_relative_position_bucket`).
fn relative_bucket(
    relative: i64,
    bidirectional: bool,
    num_buckets: usize,
    max_distance: usize,
) -> usize {
    let mut buckets = num_buckets as i64;
    let mut out = 0i64;
    let mut rel = relative;
    if bidirectional {
        buckets /= 2;
        if rel > 0 {
            out += buckets;
        }
        rel = rel.abs();
    } else {
        rel = -rel.min(0);
    }
    let max_exact = buckets / 2;
    if rel < max_exact {
        out += rel;
    } else {
        let scaled = ((rel as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (buckets - max_exact) as f32) as i64;
        out += (max_exact + scaled).min(buckets - 1);
    }
    out as usize
}

impl T5Model {
    /// Declares one attention sub-layer (`T5LayerSelfAttention` / `T5LayerCrossAttention`
    /// at `<block>.layer.<j>`): the attention, its norm and dropout.
    fn attention_layer(
        cfg: &T5Config,
        block: &mut Scope<'_, '_>,
        j: usize,
        cross: bool,
        relative: bool,
    ) -> Result<(Attention, Option<ParamId>, ParamId)> {
        let (d, inner) = (cfg.d_model, cfg.inner());
        let (name, class) = if cross {
            ("EncDecAttention", "T5LayerCrossAttention")
        } else {
            ("SelfAttention", "T5LayerSelfAttention")
        };
        let mut layer = block.container(j, class);
        let mut a = layer.container(name, "T5Attention");
        let qkv = Qkv::Separate {
            q: a.linear("q", d, inner, false)?,
            k: a.linear("k", d, inner, false)?,
            v: a.linear("v", d, inner, false)?,
        };
        let o = a.linear("o", inner, d, false)?;
        let relative_bias = if relative {
            let shape = [cfg.relative_attention_num_buckets, cfg.num_heads];
            Some(
                a.container("relative_attention_bias", "Embedding")
                    .param("weight", &shape)?,
            )
        } else {
            None
        };
        let norm = layer.norm("layer_norm", "T5LayerNorm", d, false)?.weight;
        layer.module("dropout", "Dropout");
        let attention = Attention {
            qkv,
            o,
            heads: cfg.num_heads,
            kv_heads: cfg.num_heads,
            head_dim: cfg.d_kv,
        };
        Ok((attention, relative_bias, norm))
    }

    /// Declares the feed-forward sub-layer (`T5LayerFF` at `<block>.layer.<j>`). `wo` stays
    /// in full precision on quantized bases (transformers' `_keep_in_fp32_modules`).
    fn ff_layer(cfg: &T5Config, block: &mut Scope<'_, '_>, j: usize) -> Result<(Mlp, ParamId)> {
        let (d, d_ff) = (cfg.d_model, cfg.d_ff);
        let mut layer = block.container(j, "T5LayerFF");
        let class = if cfg.is_gated_act {
            "T5DenseGatedActDense"
        } else {
            "T5DenseActDense"
        };
        let mut dense = layer.container("DenseReluDense", class);
        // `act(wi_0(x)) * wi_1(x)` or `act(wi(x))`, then `wo`.
        let wi = if cfg.is_gated_act {
            (
                dense.linear("wi_0", d, d_ff, false)?,
                Some(dense.linear("wi_1", d, d_ff, false)?),
            )
        } else {
            (dense.linear("wi", d, d_ff, false)?, None)
        };
        let down = dense.declare_linear(LinearSpec {
            path: dense.path("wo"),
            in_features: d_ff,
            out_features: d,
            bias: false,
            transposed: false,
            role: LinearRole::Hidden,
            keep_full_precision: true,
        })?;
        dense.module("dropout", "Dropout");
        dense.module("act", "Activation");
        let norm = layer.norm("layer_norm", "T5LayerNorm", d, false)?.weight;
        layer.module("dropout", "Dropout");
        let mlp = match wi {
            (gate, Some(up)) => Mlp::Gated { gate, up, down },
            (up, None) => Mlp::Plain { up, down },
        };
        Ok((mlp, norm))
    }

    /// Declares one stack (`encoder` or `decoder`): its blocks, final norm and dropout.
    fn stack(
        cfg: &T5Config,
        root: &mut Scope<'_, '_>,
        name: &str,
        shared: EmbeddingId,
        layers: usize,
        decoder: bool,
    ) -> Result<(EmbeddingId, Vec<Block>, ParamId)> {
        let mut stack = root.container(name, "T5Stack");
        let embed = stack.tied_embedding("embed_tokens", shared)?;
        let mut list = stack.container("block", "ModuleList");
        let mut blocks = Vec::with_capacity(layers);
        for i in 0..layers {
            let mut block = list.container(i, "T5Block");
            let mut sub = block.container("layer", "ModuleList");
            let (self_attn, relative_bias, self_norm) =
                Self::attention_layer(cfg, &mut sub, 0, false, i == 0)?;
            let cross_attn = if decoder {
                let (attn, _, norm) = Self::attention_layer(cfg, &mut sub, 1, true, false)?;
                Some((attn, norm))
            } else {
                None
            };
            let (ff, ff_norm) = Self::ff_layer(cfg, &mut sub, if decoder { 2 } else { 1 })?;
            blocks.push(Block {
                self_attn,
                relative_bias,
                self_norm,
                cross_attn,
                ff,
                ff_norm,
            });
        }
        let norm = stack
            .norm("final_layer_norm", "T5LayerNorm", cfg.d_model, false)?
            .weight;
        stack.module("dropout", "Dropout");
        Ok((embed, blocks, norm))
    }

    /// Builds the model, declaring each module through `b` (which supplies the tensors and
    /// the base linear layers).
    pub fn build(
        cfg: T5Config,
        mut b: ModelBuilder<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.d_model;
        let mut root = b.root();
        let shared = root.embedding("shared", cfg.vocab_size, d, None)?;
        let (encoder_embed, encoder, encoder_norm) =
            Self::stack(&cfg, &mut root, "encoder", shared, cfg.num_layers, false)?;
        let (decoder_embed, decoder, decoder_norm) = Self::stack(
            &cfg,
            &mut root,
            "decoder",
            shared,
            cfg.num_decoder_layers,
            true,
        )?;
        let tie = cfg.tie_word_embeddings.then_some(shared);
        let lm_head = root.head("lm_head", d, cfg.vocab_size, false, tie)?;
        let tree = b.finish()?;
        let info = ModelInfo {
            model_type: cfg.model_type.clone(),
            architecture: if cfg.model_type == "mt5" {
                "MT5ForConditionalGeneration"
            } else {
                "T5ForConditionalGeneration"
            }
            .into(),
            task_type: TaskType::Seq2SeqLm,
            num_layers: cfg.num_layers,
            hidden_size: d,
            num_attention_heads: cfg.num_heads,
            num_key_value_heads: cfg.num_heads,
            head_dim: cfg.d_kv,
            vocab_size: cfg.vocab_size,
            input_embedding: Some("shared".into()),
            output_heads: vec!["lm_head".into()],
            tie_word_embeddings: cfg.tie_word_embeddings,
            is_encoder_decoder: true,
            decoder_start_token_id: Some(cfg.decoder_start_token_id),
            num_labels: None,
            name_or_path: None,
        };
        Ok(T5Model {
            cfg,
            core: ModelCore {
                info,
                tree,
                device: device.clone(),
                dtype,
                gradient_checkpointing: false,
            },
            shared,
            encoder_embed,
            decoder_embed,
            encoder,
            encoder_norm,
            decoder,
            decoder_norm,
            lm_head,
        })
    }

    /// Loads a Hugging Face folder.
    pub fn from_folder(
        dir: &Path,
        dtype: impl Into<crate::Precision>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_folder_with(dir, dtype.into(), device, Vec::new())
    }

    /// [`T5Model::from_folder`], asking `factories` for the base linear layers first.
    pub fn from_folder_with(
        dir: &Path,
        dtype: crate::Precision,
        device: &Device,
        factories: Vec<Box<dyn BaseLayerFactory>>,
    ) -> Result<Self> {
        crate::blocks::load_folder(
            dir,
            dtype,
            device,
            factories,
            None,
            T5Config::from_map,
            |cfg, b, dtype| Self::build(cfg, b, dtype, device),
        )
    }

    /// A model with random weights (normal with the config's `initializer_range`, 0.05 when
    /// absent), reproducible from `seed`.
    pub fn random(
        cfg: T5Config,
        seed: u64,
        dtype: impl Into<crate::Precision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = dtype.into();
        let std = cfg
            .raw
            .get("initializer_range")
            .and_then(Value::as_f64)
            .unwrap_or(0.05) as f32;
        let mut src = crate::init::random_source(seed, std, precision, device);
        Self::build(cfg, ModelBuilder::new(&mut src), precision.compute, device)
    }

    /// A model with shape-only placeholder weights: for counting and listing modules.
    pub fn shape_only(cfg: T5Config, device: &Device) -> Result<Self> {
        let mut src = crate::init::shape_only_source(device);
        Self::build(cfg, ModelBuilder::new(&mut src), DType::F32, device)
    }

    /// The resolved config.
    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// The relative position bias `[1, H, T, S]` for `t` queries after `past` positions.
    fn position_bias(
        &self,
        table: &Tensor,
        t: usize,
        s: usize,
        past: usize,
        bidirectional: bool,
    ) -> Result<Tensor> {
        let mut buckets = Vec::with_capacity(t * s);
        for i in 0..t {
            for j in 0..s {
                let rel = j as i64 - (i + past) as i64;
                buckets.push(relative_bucket(
                    rel,
                    bidirectional,
                    self.cfg.relative_attention_num_buckets,
                    self.cfg.relative_attention_max_distance,
                ) as u32);
            }
        }
        let idx = Tensor::from_vec(buckets, t * s, &self.core.device)?;
        let values = table.index_select(&idx, 0)?; // [T*S, H]
        Ok(values
            .reshape((t, s, self.cfg.num_heads))?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?)
    }

    /// The self-attention sub-layer both stacks share: pre-norm, attention (keys and values
    /// appended to `cache`'s layer `layer` when decoding with a cache; the position bias and
    /// masks in `mask`, no score scaling), residual.
    fn block_params(&self) -> BlockParams {
        BlockParams {
            eps: self.cfg.layer_norm_epsilon,
            act: self.cfg.dense_act_fn.clone(),
        }
    }

    fn norm(&self, x: &Tensor, w: ParamId) -> Result<Tensor> {
        ops::rms_norm(x, self.core.tree.param(w), self.cfg.layer_norm_epsilon)
    }

    /// The relative position table of block 0 of `blocks` (`stack` names it in errors).
    fn relative_table(&self, blocks: &[Block], stack: &str) -> Result<&Tensor> {
        let id = blocks
            .first()
            .and_then(|b| b.relative_bias)
            .ok_or_else(|| {
                PeftError::InvalidState(format!("{stack} block 0 lacks its relative bias"))
            })?;
        Ok(self.core.tree.param(id))
    }

    /// Additive padding mask `[B, 1, 1, S]` (0 keep, large negative drop), or zeros.
    fn padding_additive(&self, mask: Option<&Tensor>, b: usize, s: usize) -> Result<Tensor> {
        match mask {
            Some(m) => {
                if m.dims() != [b, s] {
                    return Err(PeftError::bad_input(
                        "attention_mask",
                        format!("shape [{b}, {s}]"),
                        format!("{:?}", m.dims()),
                    ));
                }
                let keep = m.to_dtype(DType::F32)?;
                Ok(((keep - 1.0)? * 1.0e30)?.reshape((b, 1, 1, s))?)
            }
            None => Ok(Tensor::zeros((b, 1, 1, s), DType::F32, &self.core.device)?),
        }
    }

    /// Runs the encoder on `embeds` and returns its output.
    pub fn encode(&self, embeds: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, _) = embeds.dims3()?;
        let table = self.relative_table(&self.encoder, "encoder")?;
        let bias = self
            .position_bias(table, t, t, 0, true)?
            .broadcast_add(&self.padding_additive(mask, b, t)?)?;
        let mask = AttentionMask {
            additive: bias,
            row_valid: None,
            causal_past: None,
        };
        let mut h = embeds.clone();
        let p = self.block_params();
        let mut shared_tree: Option<Arc<ModuleTree>> = None;
        for (i, block) in self.encoder.iter().enumerate() {
            h = if peft_core::recompute::active(&self.core) {
                let tree = shared_tree
                    .get_or_insert_with(|| Arc::new(self.core.tree.clone()))
                    .clone();
                let (block, p, mask) = (block.clone(), p.clone(), mask.clone());
                peft_core::recompute::checkpoint(&h, move |x| {
                    let h = block.self_attention(&tree, &p, x.clone(), &mask, i, None)?;
                    block.feed_forward(&tree, &p, h)
                })?
            } else {
                let tree = &self.core.tree;
                let h = block.self_attention(tree, &p, h, &mask, i, None)?;
                block.feed_forward(tree, &p, h)?
            };
        }
        self.norm(&h, self.encoder_norm)
    }

    /// `ids` (checked against the vocabulary) looked up in `table`, in the model's dtype.
    fn lookup(&self, table: EmbeddingId, ids: &Tensor) -> Result<Tensor> {
        crate::blocks::lookup(
            &self.core.tree,
            table,
            ids,
            self.cfg.vocab_size,
            self.core.dtype,
        )
    }

    /// Runs the encoder (once per cache) and the decoder: the decoder's final hidden states
    /// `[B, T_dec, d_model]`, scaled as the head expects.
    fn decoder_hidden(
        &self,
        inputs: &ModelInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        inputs.check_supported(&self.cfg.model_type, true, false)?;
        // Encoder (once per cache).
        let (encoded, enc_mask) = match cache.as_ref().and_then(|c| c.encoder_state()) {
            Some((h, m)) => (h.clone(), m.clone()),
            None => {
                let embeds = crate::blocks::input_embeddings(
                    inputs.inputs_embeds.as_ref(),
                    inputs.input_ids.as_ref(),
                    self.cfg.d_model,
                    self.core.dtype,
                    |ids| self.lookup(self.encoder_embed, ids),
                )?;
                let h = self.encode(&embeds, inputs.attention_mask.as_ref())?;
                if let Some(c) = cache.as_deref_mut() {
                    c.set_encoder_state(h.clone(), inputs.attention_mask.clone());
                }
                (h, inputs.attention_mask.clone())
            }
        };
        // Decoder.
        let (dec_embeds, dec_ids) = (&inputs.decoder_inputs_embeds, &inputs.decoder_input_ids);
        if dec_embeds.is_none() && dec_ids.is_none() {
            return Err(PeftError::bad_input(
                "t5 inputs",
                "decoder_input_ids or decoder_inputs_embeds (start with decoder_start_token_id)",
                "neither",
            ));
        }
        let dec = crate::blocks::input_embeddings(
            dec_embeds.as_ref(),
            dec_ids.as_ref(),
            self.cfg.d_model,
            self.core.dtype,
            |ids| self.lookup(self.decoder_embed, ids),
        )?;
        let (b, t, _) = dec.dims3()?;
        let s_enc = encoded.dim(1)?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let table = self.relative_table(&self.decoder, "decoder")?;
        let causal = ops::causal_mask(
            inputs.decoder_attention_mask.as_ref(),
            b,
            t,
            past,
            None,
            &self.core.device,
        )?;
        let position = self.position_bias(table, t, past + t, past, false)?;
        let self_mask = match causal {
            Some(m) => AttentionMask {
                additive: position.broadcast_add(&m.additive)?,
                row_valid: m.row_valid,
                causal_past: None,
            },
            None => AttentionMask {
                additive: position,
                row_valid: None,
                causal_past: None,
            },
        };
        let cross_mask = AttentionMask {
            additive: self.padding_additive(enc_mask.as_ref(), b, s_enc)?,
            row_valid: None,
            causal_past: None,
        };
        let tree = &self.core.tree;
        let p = self.block_params();
        let mut shared_tree: Option<Arc<ModuleTree>> = None;
        let mut h = dec;
        for (i, block) in self.decoder.iter().enumerate() {
            if peft_core::recompute::active(&self.core) {
                // The cross-attention keys and values are recomputed from the encoder output,
                // which is the block's second input (its gradient reaches the encoder once).
                let tree = shared_tree
                    .get_or_insert_with(|| Arc::new(tree.clone()))
                    .clone();
                let (block, p) = (block.clone(), p.clone());
                let (self_mask, cross_mask) = (self_mask.clone(), cross_mask.clone());
                h = peft_core::recompute::checkpoint_layer2(
                    &h,
                    &encoded,
                    i,
                    cache.as_deref_mut(),
                    move |x, enc, c| {
                        let masks = (&self_mask, &cross_mask);
                        block.decode(&tree, &p, x.clone(), enc, None, masks, i, c)
                    },
                )?;
                continue;
            }
            // Cross-attention keys and values: from the encoder output, once per cache.
            let cross_kv = match (&block.cross_attn, cache.as_ref().and_then(|c| c.cross(i))) {
                (None, _) => None,
                (Some(_), Some((k, v))) => Some((k.clone(), v.clone())),
                (Some((cross, _)), None) => {
                    let (k, v) = cross.keys_values(tree, &encoded)?;
                    let (k, v) = (k.contiguous()?, v.contiguous()?);
                    if let Some(c) = cache.as_deref_mut() {
                        c.set_cross(i, (k.clone(), v.clone()));
                    }
                    Some((k, v))
                }
            };
            let masks = (&self_mask, &cross_mask);
            h = block.decode(
                tree,
                &p,
                h,
                &encoded,
                cross_kv,
                masks,
                i,
                cache.as_deref_mut(),
            )?;
        }
        let mut h = self.norm(&h, self.decoder_norm)?;
        if self.cfg.scale_decoder_outputs {
            h = (h * (self.cfg.d_model as f64).powf(-0.5))?;
        }
        Ok(h)
    }
}

impl AdaptableModel for T5Model {
    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn core_mut(&mut self) -> &mut ModelCore {
        &mut self.core
    }

    fn supports_gradient_checkpointing(&self) -> bool {
        true
    }

    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.lookup(self.shared, input_ids)
    }

    fn forward(&self, inputs: &ModelInputs, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.decoder_hidden(inputs, cache)?;
        LmHead(self.lm_head).logits(&self.core.tree, &h, inputs)
    }

    fn token_loss(
        &self,
        inputs: &ModelInputs,
        cache: Option<&mut KvCache>,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let h = self.decoder_hidden(inputs, cache)?;
        LmHead(self.lm_head).loss(&self.core.tree, &h, targets)
    }

    fn config_json(&self) -> Value {
        let tied = self.core.tree.is_tied(self.lm_head);
        let mut v = crate::config_with(&self.cfg.raw, tied, self.core.dtype);
        if let Value::Object(m) = &mut v {
            m.insert(
                "scale_decoder_outputs".into(),
                Value::Bool(self.cfg.scale_decoder_outputs),
            );
        }
        v
    }

    fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_decoder_layers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_match_transformers() {
        // Computed with transformers 5.24: T5Attention._relative_position_bucket(tensor, bidirectional, 32, 128).
        let bi: Vec<usize> = [-200, -20, -5, 0, 3, 9, 50, 300]
            .iter()
            .map(|r| relative_bucket(*r, true, 32, 128))
            .collect();
        let uni: Vec<usize> = [-200, -20, -5, 0, 3]
            .iter()
            .map(|r| relative_bucket(*r, false, 32, 128))
            .collect();
        assert_eq!(bi, vec![15, 10, 5, 0, 19, 24, 29, 31]);
        assert_eq!(uni, vec![31, 17, 5, 0, 0]);
    }
}
