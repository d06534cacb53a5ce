//! GPT-2 (`GPT2LMHeadModel`) as a training-capable [`AdaptableModel`]. Its linear layers are
//! Conv1D: weights stored `[in, out]`, which the slots report so that LoRA applies peft's
//! `fan_in_fan_out` and merges transposed. The fused `c_attn` projects q, k and v at once.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::json::ConfigFields;
use peft_core::{
    AdaptableModel, BaseLayerFactory, EmbeddingId, KvCache, LinearId, ModelBuilder, ModelCore,
    ModelInfo, ModelInputs, ModuleTree, NormIds, PeftError, Result, TaskType,
};
use serde_json::{Map, Value};

use crate::blocks::{Attention, LmHead, Mlp, Qkv};
use crate::ops::{self, AttentionMask};

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

#[derive(Debug, Clone, Copy)]
struct Block {
    ln_1: NormIds,
    /// `attn.c_attn` (fused q, k, v) and `attn.c_proj`.
    attn: Attention,
    ln_2: NormIds,
    /// `mlp.c_fc` and `mlp.c_proj`.
    mlp: Mlp,
}

fn layer_norm(tree: &ModuleTree, x: &Tensor, ln: NormIds, eps: f64) -> Result<Tensor> {
    ops::layer_norm(x, tree.param(ln.weight), tree.opt_param(ln.bias), eps)
}

impl Block {
    /// Pre-norm attention and MLP with residuals on `h`.
    #[allow(clippy::too_many_arguments)] // one block call's inputs, all distinct
    fn forward(
        &self,
        tree: &ModuleTree,
        h: &Tensor,
        mask: Option<&AttentionMask>,
        i: usize,
        cache: Option<&mut KvCache>,
        eps: f64,
        scale: f64,
        act: &str,
    ) -> Result<Tensor> {
        let a = layer_norm(tree, h, self.ln_1, eps)?;
        let attn = self.attn.forward(tree, &a, None, scale, mask, i, cache)?;
        let h = (h + attn)?;
        let m = layer_norm(tree, &h, self.ln_2, eps)?;
        Ok((&h + self.mlp.forward(tree, &m, act)?)?)
    }
}

/// GPT-2 with a language-modelling head.
#[derive(Debug, Clone)]
pub struct Gpt2Model {
    cfg: Gpt2Config,
    core: ModelCore,
    wte: EmbeddingId,
    wpe: EmbeddingId,
    blocks: Vec<Block>,
    ln_f: NormIds,
    lm_head: LinearId,
}

impl Gpt2Model {
    /// Builds the model, declaring each module through `b` (which supplies the tensors and
    /// the base linear layers).
    pub fn build(
        cfg: Gpt2Config,
        mut b: ModelBuilder<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let d = cfg.n_embd;
        let mut root = b.root();
        let mut t = root.container("transformer", "GPT2Model");
        let wte = t.embedding("wte", cfg.vocab_size, d, None)?;
        let wpe = t.embedding("wpe", cfg.n_positions, d, None)?;
        t.module("drop", "Dropout");
        let mut h = t.container("h", "ModuleList");
        let mut blocks = Vec::with_capacity(cfg.n_layer);
        for i in 0..cfg.n_layer {
            let mut l = h.container(i, "GPT2Block");
            let ln_1 = l.norm("ln_1", "LayerNorm", d, true)?;
            let mut a = l.container("attn", "GPT2Attention");
            let c_attn = a.conv1d("c_attn", d, 3 * d)?;
            let attn_proj = a.conv1d("c_proj", d, d)?;
            a.module("attn_dropout", "Dropout");
            a.module("resid_dropout", "Dropout");
            let ln_2 = l.norm("ln_2", "LayerNorm", d, true)?;
            let mut m = l.container("mlp", "GPT2MLP");
            let c_fc = m.conv1d("c_fc", d, cfg.n_inner)?;
            let mlp_proj = m.conv1d("c_proj", cfg.n_inner, d)?;
            m.module("act", "NewGELUActivation");
            m.module("dropout", "Dropout");
            let attn = Attention {
                qkv: Qkv::Fused(c_attn),
                o: attn_proj,
                heads: cfg.n_head,
                kv_heads: cfg.n_head,
                head_dim: d / cfg.n_head,
            };
            let mlp = Mlp::Plain {
                up: c_fc,
                down: mlp_proj,
            };
            blocks.push(Block {
                ln_1,
                attn,
                ln_2,
                mlp,
            });
        }
        let ln_f = t.norm("ln_f", "LayerNorm", d, true)?;
        let tie = cfg.tie_word_embeddings.then_some(wte);
        let lm_head = root.head("lm_head", d, cfg.vocab_size, false, tie)?;
        let tree = b.finish()?;
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
            core: ModelCore {
                info,
                tree,
                device: device.clone(),
                dtype,
                gradient_checkpointing: false,
            },
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }

    /// Loads a Hugging Face folder. Checkpoints with or without the `transformer.` prefix load.
    pub fn from_folder(
        dir: &Path,
        dtype: impl Into<crate::Precision>,
        device: &Device,
    ) -> Result<Self> {
        Self::from_folder_with(dir, dtype.into(), device, Vec::new())
    }

    /// [`Gpt2Model::from_folder`], asking `factories` for the base linear layers first.
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
            Some("transformer."),
            Gpt2Config::from_map,
            |cfg, b, dtype| Self::build(cfg, b, dtype, device),
        )
    }

    /// A model with random weights, reproducible from `seed`.
    pub fn random(
        cfg: Gpt2Config,
        seed: u64,
        dtype: impl Into<crate::Precision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = dtype.into();
        let mut src =
            crate::init::random_source(seed, cfg.initializer_range as f32, precision, device);
        Self::build(cfg, ModelBuilder::new(&mut src), precision.compute, device)
    }

    fn norm(&self, x: &Tensor, ln: NormIds) -> Result<Tensor> {
        layer_norm(&self.core.tree, x, ln, self.cfg.layer_norm_epsilon)
    }

    fn head_is_tied(&self) -> bool {
        self.core.tree.is_tied(self.lm_head)
    }

    /// Runs the blocks and the final layer norm: the hidden states `[B, T, n_embd]`.
    fn hidden_states(
        &self,
        inputs: &ModelInputs,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        inputs.check_supported("gpt2", false, false)?;
        let (b, t) = inputs.batch_and_len()?;
        let past = cache.as_ref().map_or(0, |c| c.seq_len());
        let tokens = crate::blocks::input_embeddings(
            inputs.inputs_embeds.as_ref(),
            inputs.input_ids.as_ref(),
            self.cfg.n_embd,
            self.core.dtype,
            |ids| self.embed_tokens(ids),
        )?;
        let positions = match &inputs.position_ids {
            Some(p) => p.clone(),
            None => crate::blocks::default_positions(b, t, past, &self.core.device)?,
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
                .core
                .tree
                .embedding(self.wpe)
                .forward(&positions.to_dtype(DType::U32)?)?
                .to_dtype(self.core.dtype)?)?;
        let mask = ops::causal_mask(
            inputs.attention_mask.as_ref(),
            b,
            t,
            past,
            None,
            &self.core.device,
        )?;
        let hd = self.cfg.n_embd / self.cfg.n_head;
        let scale = if self.cfg.scale_attn_weights {
            1.0 / (hd as f64).sqrt()
        } else {
            1.0
        };
        let eps = self.cfg.layer_norm_epsilon;
        let act = &self.cfg.activation;
        // Checkpointed blocks read the modules through one shared copy of the tree.
        let mut shared_tree: Option<Arc<ModuleTree>> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            h = if peft_core::recompute::active(&self.core) {
                let tree = shared_tree
                    .get_or_insert_with(|| Arc::new(self.core.tree.clone()))
                    .clone();
                let (block, act, mask) = (*block, act.clone(), mask.clone());
                peft_core::recompute::checkpoint_layer(&h, i, cache.as_deref_mut(), move |x, c| {
                    block.forward(&tree, x, mask.as_ref(), i, c, eps, scale, &act)
                })?
            } else {
                let c = cache.as_deref_mut();
                block.forward(&self.core.tree, &h, mask.as_ref(), i, c, eps, scale, act)?
            };
        }
        self.norm(&h, self.ln_f)
    }
}

impl AdaptableModel for Gpt2Model {
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
        crate::blocks::lookup(
            &self.core.tree,
            self.wte,
            input_ids,
            self.cfg.vocab_size,
            self.core.dtype,
        )
    }

    fn forward(&self, inputs: &ModelInputs, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let h = self.hidden_states(inputs, cache)?;
        LmHead(self.lm_head).logits(&self.core.tree, &h, inputs)
    }

    fn token_loss(
        &self,
        inputs: &ModelInputs,
        cache: Option<&mut KvCache>,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let h = self.hidden_states(inputs, cache)?;
        LmHead(self.lm_head).loss(&self.core.tree, &h, targets)
    }

    fn config_json(&self) -> Value {
        crate::config_with(&self.cfg.raw, self.head_is_tied(), self.core.dtype)
    }
}
