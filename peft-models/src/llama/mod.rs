//! The LLaMA family (Llama, Mistral, Qwen2) as a training-capable [`AdaptableModel`] that
//! mirrors transformers' `LlamaForCausalLM`: the same module paths and tensor names, grouped-
//! query attention, RoPE, padding masks, sliding windows, tied embeddings and a KV cache.
//! Every linear layer and the token embedding are swappable slots.

pub mod config;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::{
    AdaptableModel, BaseLayerFactory, EmbeddingId, KvCache, LinearId, ModelBuilder, ModelCore,
    ModelInfo, ModelInputs, ModuleTree, ParamId, PeftError, Result, TaskType,
};
use serde_json::Value;

pub use config::{LlamaConfig, RopeScaling};

use crate::blocks::{Attention, LmHead, Mlp, Qkv};
use crate::ops::{self, AttentionMask, Rotary};
use crate::Precision;

#[derive(Debug, Clone)]
struct DecoderLayer {
    /// q, k, v, o projections.
    attn: Attention,
    /// gate, up, down projections.
    mlp: Mlp,
    input_layernorm: ParamId,
    post_attention_layernorm: ParamId,
    sliding_window: Option<usize>,
}

impl DecoderLayer {
    /// Pre-norm attention and SwiGLU blocks with residuals on `h`.
    #[allow(clippy::too_many_arguments)] // one layer call's inputs, all distinct
    fn forward(
        &self,
        tree: &ModuleTree,
        h: &Tensor,
        rotary: (&Tensor, &Tensor),
        mask: Option<&AttentionMask>,
        i: usize,
        cache: Option<&mut KvCache>,
        eps: f64,
        scale: f64,
        act: &str,
    ) -> Result<Tensor> {
        let normed = ops::rms_norm(h, tree.param(self.input_layernorm), eps)?;
        let attn = self
            .attn
            .forward(tree, &normed, Some(rotary), scale, mask, i, cache)?;
        let h = (h + attn)?;
        let normed = ops::rms_norm(&h, tree.param(self.post_attention_layernorm), eps)?;
        Ok((&h + self.mlp.forward(tree, &normed, act)?)?)
    }
}

/// A LLaMA-family causal language model.
#[derive(Debug, Clone)]
pub struct LlamaModel {
    cfg: LlamaConfig,
    core: ModelCore,
    embed_tokens: EmbeddingId,
    layers: Vec<DecoderLayer>,
    norm: ParamId,
    lm_head: LinearId,
    rotary: Rotary,
}

impl LlamaModel {
    /// Builds the model from a config, declaring each module through `b` (which supplies the
    /// tensors and the base linear layers).
    pub fn build(
        cfg: LlamaConfig,
        mut b: ModelBuilder<'_>,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let q_out = cfg.num_attention_heads * cfg.head_dim;
        let kv_out = cfg.num_key_value_heads * cfg.head_dim;
        let [model_cls, layer_cls, attn_cls, mlp_cls, norm_cls, rot_cls] = cfg.module_classes();
        let mut root = b.root();
        let mut m = root.container("model", model_cls);
        let embed_tokens = m.embedding(
            "embed_tokens",
            cfg.vocab_size,
            h,
            cfg.pad_token_id.map(|p| p as usize),
        )?;
        let mut stack = m.container("layers", "ModuleList");
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let mut l = stack.container(i, layer_cls);
            let mut a = l.container("self_attn", attn_cls);
            let attn = Attention {
                qkv: Qkv::Separate {
                    q: a.linear("q_proj", h, q_out, cfg.qkv_bias)?,
                    k: a.linear("k_proj", h, kv_out, cfg.qkv_bias)?,
                    v: a.linear("v_proj", h, kv_out, cfg.qkv_bias)?,
                },
                o: a.linear("o_proj", q_out, h, cfg.o_bias)?,
                heads: cfg.num_attention_heads,
                kv_heads: cfg.num_key_value_heads,
                head_dim: cfg.head_dim,
            };
            let mut f = l.container("mlp", mlp_cls);
            let ffn = cfg.intermediate_size;
            let mlp = Mlp::Gated {
                gate: f.linear("gate_proj", h, ffn, cfg.mlp_bias)?,
                up: f.linear("up_proj", h, ffn, cfg.mlp_bias)?,
                down: f.linear("down_proj", ffn, h, cfg.mlp_bias)?,
            };
            f.module("act_fn", "SiLUActivation");
            layers.push(DecoderLayer {
                attn,
                mlp,
                input_layernorm: l.norm("input_layernorm", norm_cls, h, false)?.weight,
                post_attention_layernorm: l
                    .norm("post_attention_layernorm", norm_cls, h, false)?
                    .weight,
                sliding_window: cfg.sliding_windows.get(i).copied().flatten(),
            });
        }
        let norm = m.norm("norm", norm_cls, h, false)?.weight;
        m.module("rotary_emb", rot_cls);
        let tie = cfg.tie_word_embeddings.then_some(embed_tokens);
        let lm_head = root.head("lm_head", h, cfg.vocab_size, false, tie)?;
        let tree = b.finish()?;
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
            core: ModelCore {
                info,
                tree,
                device: device.clone(),
                dtype,
                gradient_checkpointing: false,
            },
            embed_tokens,
            layers,
            norm,
            lm_head,
            rotary,
        })
    }

    /// Loads a Hugging Face model folder (`config.json` + safetensors) in `dtype`.
    pub fn from_folder(dir: &Path, dtype: impl Into<Precision>, device: &Device) -> Result<Self> {
        Self::from_folder_with(dir, dtype.into(), device, Vec::new())
    }

    /// [`LlamaModel::from_folder`], asking `factories` for the base linear layers first.
    pub fn from_folder_with(
        dir: &Path,
        dtype: Precision,
        device: &Device,
        factories: Vec<Box<dyn BaseLayerFactory>>,
    ) -> Result<Self> {
        crate::blocks::load_folder(
            dir,
            dtype,
            device,
            factories,
            None,
            LlamaConfig::from_map,
            |cfg, b, dtype| Self::build(cfg, b, dtype, device),
        )
    }

    /// A model with random weights (normal with std `initializer_range`, norms at one),
    /// reproducible from `seed`; used for tests, demos and benchmarks.
    pub fn random(
        cfg: LlamaConfig,
        seed: u64,
        dtype: impl Into<Precision>,
        device: &Device,
    ) -> Result<Self> {
        let precision = dtype.into();
        let mut src =
            crate::init::random_source(seed, cfg.initializer_range as f32, precision, device);
        Self::build(cfg, ModelBuilder::new(&mut src), precision.compute, device)
    }

    /// The resolved config.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Sets the name recorded in saved adapter configs (`base_model_name_or_path`).
    pub fn set_name_or_path(&mut self, name: impl Into<String>) {
        self.core.info.name_or_path = Some(name.into());
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
        let mut h = crate::blocks::input_embeddings(
            inputs.inputs_embeds.as_ref(),
            inputs.input_ids.as_ref(),
            self.cfg.hidden_size,
            self.core.dtype,
            |ids| self.embed_tokens(ids),
        )?;
        let positions = match &inputs.position_ids {
            Some(p) if p.dims() == [b, t] => p.clone(),
            Some(p) => {
                return Err(PeftError::bad_input(
                    "position_ids",
                    format!("shape [{b}, {t}]"),
                    format!("{:?}", p.dims()),
                ))
            }
            None => crate::blocks::default_positions(b, t, past, &self.core.device)?,
        };
        let (cos, sin) = self.rotary.cos_sin(&positions, self.core.dtype)?;
        // Layers share a mask unless their sliding windows differ.
        let mut masks: Vec<(Option<usize>, Option<AttentionMask>)> = Vec::new();
        let scale = 1.0 / (self.cfg.head_dim as f64).sqrt();
        let act = &self.cfg.hidden_act;
        // Checkpointed layers read the modules through one shared copy of the tree.
        let mut shared_tree: Option<Arc<ModuleTree>> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let w = layer.sliding_window;
            if !masks.iter().any(|(mw, _)| *mw == w) {
                let m = ops::causal_mask(
                    inputs.attention_mask.as_ref(),
                    b,
                    t,
                    past,
                    w,
                    &self.core.device,
                )?;
                masks.push((w, m));
            }
            let mask = masks
                .iter()
                .find(|(mw, _)| *mw == w)
                .and_then(|(_, m)| m.as_ref());
            h = if peft_core::recompute::active(&self.core) {
                let tree = shared_tree
                    .get_or_insert_with(|| Arc::new(self.core.tree.clone()))
                    .clone();
                let (layer, eps, act) = (layer.clone(), self.cfg.rms_norm_eps, act.clone());
                let (cos, sin, mask) = (cos.clone(), sin.clone(), mask.cloned());
                peft_core::recompute::checkpoint_layer(&h, i, cache.as_deref_mut(), move |x, c| {
                    layer.forward(
                        &tree,
                        x,
                        (&cos, &sin),
                        mask.as_ref(),
                        i,
                        c,
                        eps,
                        scale,
                        &act,
                    )
                })?
            } else {
                layer.forward(
                    &self.core.tree,
                    &h,
                    (&cos, &sin),
                    mask,
                    i,
                    cache.as_deref_mut(),
                    self.cfg.rms_norm_eps,
                    scale,
                    act,
                )?
            };
        }
        ops::rms_norm(&h, self.core.tree.param(self.norm), self.cfg.rms_norm_eps)
    }

    fn head_is_tied(&self) -> bool {
        self.core.tree.is_tied(self.lm_head)
    }
}

impl AdaptableModel for LlamaModel {
    fn core(&self) -> &ModelCore {
        &self.core
    }

    fn replicate_layers(&mut self, map: &[(usize, usize)]) -> Result<()> {
        let remap = self
            .core
            .tree
            .replicate_layers("model.layers", self.layers.len(), map)?;
        let layers = remap
            .sources
            .iter()
            .enumerate()
            .map(|(j, &src)| {
                let l = &self.layers[src];
                Ok(DecoderLayer {
                    attn: l.attn.remapped(&remap, j)?,
                    mlp: l.mlp.remapped(&remap, j)?,
                    input_layernorm: remap.layer_param(j, l.input_layernorm)?,
                    post_attention_layernorm: remap.layer_param(j, l.post_attention_layernorm)?,
                    sliding_window: l.sliding_window,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        self.embed_tokens = remap.embedding(self.embed_tokens)?;
        self.norm = remap.param(self.norm)?;
        self.lm_head = remap.linear(self.lm_head)?;
        self.cfg.sliding_windows = remap
            .sources
            .iter()
            .map(|&s| self.cfg.sliding_windows.get(s).copied().flatten())
            .collect();
        self.layers = layers;
        let n = self.layers.len();
        self.cfg.num_hidden_layers = n;
        self.cfg
            .raw
            .insert("num_hidden_layers".into(), Value::from(n));
        self.core.info.num_layers = n;
        Ok(())
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
            self.embed_tokens,
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
