//! The pieces every model composes, written once: attention over named projections (separate
//! or fused q/k/v, rotary or not, grouped-query heads, the key/value cache, cross-attention),
//! gated and plain feed-forward blocks, the input-embedding resolution (token ids looked up, or
//! `inputs_embeds` checked), default positions, the language-model head (`logits_to_keep`, the
//! fused head + loss), and reading a model folder's `config.json`. The kernels live in
//! [`crate::ops`]; a model's own module tree comes from [`peft_core::ModelBuilder`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::replicate::LayerRemap;
use peft_core::{
    AdaptableModel, BaseLayerFactory, EmbeddingId, KvCache, LinearId, ModelBuilder, ModelInputs,
    ModuleTree, PeftError, Result,
};

use crate::ops::AttentionMask;
use serde_json::{Map, Value};

/// A model folder's `config.json`, parsed, with its path for error messages.
pub fn read_config(dir: &Path) -> Result<(Map<String, Value>, String)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let source = path.display().to_string();
    Ok((peft_core::json::parse_object(&text, &source)?, source))
}

/// Loads a model from a Hugging Face folder: `config` resolves its `config.json`, `build`
/// declares the model over the folder's safetensors (names carrying `optional_prefix` are also
/// found without it) with `factories` asked for the base linear layers; the folder becomes the
/// model's `name_or_path`.
pub fn load_folder<C, M: AdaptableModel>(
    dir: &Path,
    precision: crate::Precision,
    device: &Device,
    factories: Vec<Box<dyn BaseLayerFactory>>,
    optional_prefix: Option<&str>,
    config: impl FnOnce(Map<String, Value>, &str) -> Result<C>,
    build: impl FnOnce(C, ModelBuilder<'_>, DType) -> Result<M>,
) -> Result<M> {
    let (map, source) = read_config(dir)?;
    let cfg = config(map, &source)?;
    let mut weights = crate::weights::ModelWeights::open(dir, precision, device)?;
    if let Some(prefix) = optional_prefix {
        weights = weights.with_optional_prefix(prefix);
    }
    let dtype = weights.dtype();
    let mut model = build(
        cfg,
        ModelBuilder::with_factories(&mut weights, factories),
        dtype,
    )?;
    model.core_mut().info.name_or_path = Some(dir.display().to_string());
    Ok(model)
}

/// `ids` looked up in embedding `table` (checked against the `vocab_size`), in `dtype`.
pub fn lookup(
    tree: &ModuleTree,
    table: EmbeddingId,
    ids: &Tensor,
    vocab_size: usize,
    dtype: DType,
) -> Result<Tensor> {
    crate::check_token_ids(ids, vocab_size)?;
    Ok(tree
        .embedding(table)
        .forward(&ids.to_dtype(DType::U32)?)?
        .to_dtype(dtype)?)
}

/// The embeddings a forward pass starts from: `inputs_embeds` (checked to be `hidden` wide) in
/// `dtype`, or `input_ids` looked up by `embed`. Exactly one of the two must be given.
pub fn input_embeddings(
    embeds: Option<&Tensor>,
    ids: Option<&Tensor>,
    hidden: usize,
    dtype: DType,
    embed: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    match (embeds, ids) {
        (Some(e), None) => {
            let d = e.dims().last().copied().unwrap_or(0);
            if e.rank() != 3 || d != hidden {
                return Err(PeftError::bad_input(
                    "inputs_embeds",
                    format!("[batch, seq_len, hidden size {hidden}]"),
                    format!("{:?}", e.dims()),
                ));
            }
            Ok(e.to_dtype(dtype)?)
        }
        (None, Some(ids)) => embed(ids),
        (Some(_), Some(_)) => Err(PeftError::bad_input(
            "model inputs",
            "input_ids or inputs_embeds",
            "both",
        )),
        (None, None) => Err(PeftError::bad_input(
            "model inputs",
            "input_ids or inputs_embeds",
            "neither",
        )),
    }
}

/// Positions `past .. past + t` for each of `b` rows (transformers' default `position_ids`).
pub fn default_positions(b: usize, t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let pos = Tensor::arange(past as u32, (past + t) as u32, device)?;
    Ok(pos.unsqueeze(0)?.expand((b, t))?)
}

/// A language-model head: the linear layer (possibly tied to the input embedding) applied to
/// the final hidden states.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LmHead(pub LinearId);

impl LmHead {
    /// Logits of the last `inputs.logits_to_keep` positions (all when 0).
    pub fn logits(
        self,
        tree: &ModuleTree,
        hidden: &Tensor,
        inputs: &ModelInputs,
    ) -> Result<Tensor> {
        let kept = peft_core::model::keep_last_positions(hidden, inputs.logits_to_keep)?;
        tree.linear(self.0).forward(&kept)
    }

    /// Mean token cross-entropy of every position's logits against `targets`, through the
    /// fused head + loss (the `[B, T, V]` logits are never held for a frozen dense head).
    pub fn loss(self, tree: &ModuleTree, hidden: &Tensor, targets: &Tensor) -> Result<Tensor> {
        peft_core::loss::head_cross_entropy(hidden, tree.linear(self.0).as_ref(), targets)
    }
}

/// Where an attention layer's queries, keys and values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qkv {
    /// Three projections (`q_proj`, `k_proj`, `v_proj`; BERT's `query`, `key`, `value`; T5's
    /// `q`, `k`, `v`).
    Separate {
        /// Queries.
        q: LinearId,
        /// Keys.
        k: LinearId,
        /// Values.
        v: LinearId,
    },
    /// One projection whose output is `[queries | keys | values]` (GPT-2's `c_attn`).
    Fused(LinearId),
}

/// An attention layer: its projections (declared by the model under its own names and
/// containers) and what every model computes with them: the per-head split (rotary embedding
/// where given), the key/value cache, grouped-query attention and the output projection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attention {
    /// The query, key and value projections.
    pub qkv: Qkv,
    /// The output projection.
    pub o: LinearId,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (fewer than `heads` with grouped-query attention).
    pub kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
}

impl Attention {
    /// The same block in replicated layer `layer` ([`peft_core::replicate`]).
    pub fn remapped(&self, remap: &LayerRemap, layer: usize) -> Result<Self> {
        let l = |id| remap.layer_linear(layer, id);
        Ok(Attention {
            qkv: match self.qkv {
                Qkv::Separate { q, k, v } => Qkv::Separate {
                    q: l(q)?,
                    k: l(k)?,
                    v: l(v)?,
                },
                Qkv::Fused(id) => Qkv::Fused(l(id)?),
            },
            o: l(self.o)?,
            ..*self
        })
    }

    /// `[B, T, n * head_dim]` as `[B, n, T, head_dim]` (rotated by `rotary`'s cos/sin when
    /// given).
    fn split(&self, y: &Tensor, n: usize, rotary: Option<(&Tensor, &Tensor)>) -> Result<Tensor> {
        match rotary {
            Some((cos, sin)) => crate::ops::rope_heads(y, n, cos, sin),
            None => {
                let (b, t, _) = y.dims3()?;
                Ok(y.reshape((b, t, n, self.head_dim))?.transpose(1, 2)?)
            }
        }
    }

    /// The projections of `x`: queries, keys, values, `[B, T, width]` each.
    fn project(&self, tree: &ModuleTree, x: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        Ok(match self.qkv {
            Qkv::Separate { q, k, v } => (
                tree.linear(q).forward(x)?,
                tree.linear(k).forward(x)?,
                tree.linear(v).forward(x)?,
            ),
            Qkv::Fused(qkv) => {
                let y = tree.linear(qkv).forward(x)?;
                let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
                (
                    y.narrow(2, 0, q)?,
                    y.narrow(2, q, kv)?,
                    y.narrow(2, q + kv, kv)?,
                )
            }
        })
    }

    /// Self-attention over `x [B, T, hidden]`: queries, keys and values from `x` (queries and
    /// keys rotated by `rotary`), keys and values appended to layer `layer` of `cache`, scores
    /// scaled by `scale` under `mask`, heads joined and projected by `o`.
    #[allow(clippy::too_many_arguments)] // one attention call's inputs, all distinct
    pub fn forward(
        &self,
        tree: &ModuleTree,
        x: &Tensor,
        rotary: Option<(&Tensor, &Tensor)>,
        scale: f64,
        mask: Option<&AttentionMask>,
        layer: usize,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (q, k, v) = self.project(tree, x)?;
        let q = self.split(&q, self.heads, rotary)?;
        let k = self.split(&k, self.kv_heads, rotary)?;
        let v = self.split(&v, self.kv_heads, None)?;
        let (k, v) = crate::ops::cache_kv(k, v, layer, cache)?;
        self.attend_split(tree, q, &k, &v, scale, mask)
    }

    /// Keys and values of `x` split into heads `[B, kv_heads, S, head_dim]` (cross-attention:
    /// computed once from the encoder output).
    pub fn keys_values(&self, tree: &ModuleTree, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.qkv {
            Qkv::Separate { k, v, .. } => (tree.linear(k).forward(x)?, tree.linear(v).forward(x)?),
            Qkv::Fused(_) => {
                let (_, k, v) = self.project(tree, x)?;
                (k, v)
            }
        };
        Ok((
            self.split(&k, self.kv_heads, None)?,
            self.split(&v, self.kv_heads, None)?,
        ))
    }

    /// Queries from `x` against given keys and values (cross-attention), projected by `o`.
    pub fn attend(
        &self,
        tree: &ModuleTree,
        x: &Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: Option<&AttentionMask>,
    ) -> Result<Tensor> {
        let q = match self.qkv {
            Qkv::Separate { q, .. } => tree.linear(q).forward(x)?,
            Qkv::Fused(_) => self.project(tree, x)?.0,
        };
        let q = self.split(&q, self.heads, None)?;
        self.attend_split(tree, q, k, v, scale, mask)
    }

    fn attend_split(
        &self,
        tree: &ModuleTree,
        q: Tensor,
        k: &Tensor,
        v: &Tensor,
        scale: f64,
        mask: Option<&AttentionMask>,
    ) -> Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        // Grouped key/value heads are mapped onto query heads inside the attention.
        let out = crate::ops::attention(&q, k, v, scale, mask)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, t, self.heads * self.head_dim))?;
        tree.linear(self.o).forward(&out)
    }
}

/// A feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mlp {
    /// `down(act(gate(x)) * up(x))` (LLaMA's SwiGLU, T5's gated-gelu).
    Gated {
        /// The activated projection (`gate_proj`, `wi_0`).
        gate: LinearId,
        /// The multiplied projection (`up_proj`, `wi_1`).
        up: LinearId,
        /// The output projection (`down_proj`, `wo`).
        down: LinearId,
    },
    /// `down(act(up(x)))` (GPT-2's `c_fc`/`c_proj`, BERT's intermediate/output, T5's `wi`/`wo`).
    Plain {
        /// The widening projection.
        up: LinearId,
        /// The output projection.
        down: LinearId,
    },
}

impl Mlp {
    /// The same block in replicated layer `layer` ([`peft_core::replicate`]).
    pub fn remapped(&self, remap: &LayerRemap, layer: usize) -> Result<Self> {
        let l = |id| remap.layer_linear(layer, id);
        Ok(match *self {
            Mlp::Gated { gate, up, down } => Mlp::Gated {
                gate: l(gate)?,
                up: l(up)?,
                down: l(down)?,
            },
            Mlp::Plain { up, down } => Mlp::Plain {
                up: l(up)?,
                down: l(down)?,
            },
        })
    }

    /// The block on `x` with activation `act` (transformers' `ACT2FN` names).
    pub fn forward(self, tree: &ModuleTree, x: &Tensor, act: &str) -> Result<Tensor> {
        let h = match self {
            Mlp::Gated { gate, up, .. } => crate::ops::gated(
                act,
                &tree.linear(gate).forward(x)?,
                &tree.linear(up).forward(x)?,
            )?,
            Mlp::Plain { up, .. } => crate::ops::activation(act, &tree.linear(up).forward(x)?)?,
        };
        let (Mlp::Gated { down, .. } | Mlp::Plain { down, .. }) = self;
        tree.linear(down).forward(&h)
    }
}
