//! The seam between models and everything else: [`AdaptableModel`], the trait a model
//! implements so that any method can adapt it, plus the inputs, module listing and KV cache
//! that cross that seam. Models never import a method; methods never import a model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::config::TaskType;
use crate::error::{PeftError, Result};
use crate::layers::{EmbeddingSlot, LinearSlot};
use crate::module_tree::ModuleTree;

/// What kind of module a path names (peft matches targets against every module name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// A linear layer (a swappable [`LinearSlot`]).
    Linear,
    /// An embedding table (a swappable [`EmbeddingSlot`]).
    Embedding,
    /// Anything else (a container, a norm, an activation); the string is its class name.
    Other(&'static str),
}

/// One named module, as Python's `model.named_modules()` lists it (the root excluded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEntry {
    /// The module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub path: String,
    /// Its kind.
    pub kind: ModuleKind,
}

impl ModuleEntry {
    /// Builds an entry.
    pub fn new(path: impl Into<String>, kind: ModuleKind) -> Self {
        ModuleEntry {
            path: path.into(),
            kind,
        }
    }
}

/// Static facts about a model that methods and the parameter count need.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// `model_type` from config.json (`llama`, `mistral`, `qwen2`, ...).
    pub model_type: String,
    /// The transformers class this model mirrors (`LlamaForCausalLM`).
    pub architecture: String,
    /// The task the model's head serves.
    pub task_type: TaskType,
    /// Number of transformer layers.
    pub num_layers: usize,
    /// Hidden size (the token embedding width).
    pub hidden_size: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention).
    pub num_key_value_heads: usize,
    /// Width of one attention head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Path of the input token embedding (`model.embed_tokens`), if any.
    pub input_embedding: Option<String>,
    /// Output heads that `all-linear` leaves out (`lm_head`).
    pub output_heads: Vec<String>,
    /// Whether the output head shares the input embedding's weight.
    pub tie_word_embeddings: bool,
    /// An encoder-decoder (T5): prompts go to the encoder, prefixes to the decoder.
    pub is_encoder_decoder: bool,
    /// The first decoder token of an encoder-decoder's generation.
    pub decoder_start_token_id: Option<u32>,
    /// Classes of a classification head (`SEQ_CLS`, `TOKEN_CLS`), if any.
    pub num_labels: Option<usize>,
    /// Where the model was loaded from, written into saved adapter configs.
    pub name_or_path: Option<String>,
}

/// The inputs of one forward pass, mirroring the Hugging Face `forward` arguments.
#[derive(Debug, Clone, Default)]
pub struct ModelInputs {
    /// Token ids `[B, T]` (U32 or I64). Exactly one of `input_ids`/`inputs_embeds` is set.
    pub input_ids: Option<Tensor>,
    /// Input embeddings `[B, T, hidden]`, used instead of looking up `input_ids`; this is the
    /// hook prompt methods use to prepend virtual tokens.
    pub inputs_embeds: Option<Tensor>,
    /// Attention mask `[B, past + T]` of 1 (attend) and 0 (padding), covering the cached (or
    /// prefix) positions and the new ones, as in transformers.
    pub attention_mask: Option<Tensor>,
    /// Position ids `[B, T]`; by default `past .. past + T`.
    pub position_ids: Option<Tensor>,
    /// Segment ids `[B, T]` (BERT's `token_type_ids`); zeros by default.
    pub token_type_ids: Option<Tensor>,
    /// Decoder token ids `[B, T_dec]` of an encoder-decoder.
    pub decoder_input_ids: Option<Tensor>,
    /// Decoder input embeddings, used instead of `decoder_input_ids`.
    pub decoder_inputs_embeds: Option<Tensor>,
    /// Decoder attention mask `[B, past + T_dec]`.
    pub decoder_attention_mask: Option<Tensor>,
    /// Logits only for the last `logits_to_keep` positions (transformers' `logits_to_keep`;
    /// 0, the default, keeps all): generation needs the last one, and a vocabulary-sized head
    /// applied to every prompt position is a fifth of a small model's prefill. Honoured by the
    /// language-model heads (LLaMA family, GPT-2, T5's decoder); classification heads ignore it.
    pub logits_to_keep: usize,
}

/// The last `keep` positions of `[B, T, ..]` hidden states (all of them when `keep` is 0 or at
/// least `T`): what [`ModelInputs::logits_to_keep`] asks of a head.
pub fn keep_last_positions(hidden: &Tensor, keep: usize) -> Result<Tensor> {
    let t = hidden.dim(1)?;
    Ok(if keep == 0 || keep >= t {
        hidden.clone()
    } else {
        hidden.narrow(1, t - keep, keep)?
    })
}

impl ModelInputs {
    /// Inputs made of token ids only.
    pub fn from_ids(input_ids: Tensor) -> Self {
        ModelInputs {
            input_ids: Some(input_ids),
            ..Default::default()
        }
    }

    /// Sets the attention mask.
    pub fn with_mask(mut self, mask: Option<Tensor>) -> Self {
        self.attention_mask = mask;
        self
    }

    /// Refuses inputs a model does not take (rather than silently ignoring them): decoder
    /// inputs unless `seq2seq`, segment ids unless `token_types`.
    pub fn check_supported(
        &self,
        model_type: &str,
        seq2seq: bool,
        token_types: bool,
    ) -> Result<()> {
        let decoder = self.decoder_input_ids.is_some()
            || self.decoder_inputs_embeds.is_some()
            || self.decoder_attention_mask.is_some();
        if decoder && !seq2seq {
            return Err(PeftError::bad_input(
                format!("{model_type} inputs"),
                "no decoder inputs (the model is not an encoder-decoder)",
                "decoder_input_ids, decoder_inputs_embeds or decoder_attention_mask",
            ));
        }
        if self.token_type_ids.is_some() && !token_types {
            return Err(PeftError::bad_input(
                format!("{model_type} inputs"),
                "no token_type_ids",
                "token_type_ids",
            ));
        }
        Ok(())
    }

    /// `(batch, seq_len)` of the new tokens.
    pub fn batch_and_len(&self) -> Result<(usize, usize)> {
        match (&self.input_ids, &self.inputs_embeds) {
            (Some(ids), None) => {
                let (b, t) = ids.dims2().map_err(|_| {
                    PeftError::bad_input(
                        "input_ids",
                        "a [batch, seq_len] tensor",
                        format!("{:?}", ids.dims()),
                    )
                })?;
                Ok((b, t))
            }
            (None, Some(e)) => {
                let (b, t, _) = e.dims3().map_err(|_| {
                    PeftError::bad_input(
                        "inputs_embeds",
                        "a [batch, seq_len, hidden] tensor",
                        format!("{:?}", e.dims()),
                    )
                })?;
                Ok((b, t))
            }
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
}

/// Per-layer cached keys and values, `[B, kv_heads, S, head_dim]` each. A cache pre-filled
/// with learned prefixes is how prefix tuning reaches the attention layers. For an
/// encoder-decoder, `layers` is the decoder's self-attention; the cache also keeps the encoder
/// output and each layer's cross-attention keys and values, computed once.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    cross: Vec<Option<(Tensor, Tensor)>>,
    encoder: Option<(Tensor, Option<Tensor>)>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache {
            layers: vec![None; num_layers],
            ..Default::default()
        }
    }

    /// A cache holding one `(key, value)` prefix per layer.
    pub fn from_prefix(prefix: Vec<(Tensor, Tensor)>) -> Self {
        KvCache {
            layers: prefix.into_iter().map(Some).collect(),
            ..Default::default()
        }
    }

    /// The encoder output `[B, S, d]` and its attention mask, once computed.
    pub fn encoder_state(&self) -> Option<&(Tensor, Option<Tensor>)> {
        self.encoder.as_ref()
    }

    /// Stores the encoder output and mask (encoder-decoders compute them on the first call).
    pub fn set_encoder_state(&mut self, hidden: Tensor, mask: Option<Tensor>) {
        self.encoder = Some((hidden, mask));
    }

    /// The cross-attention `(key, value)` of one decoder layer.
    pub fn cross(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.cross.get(layer).and_then(|l| l.as_ref())
    }

    /// Stores the cross-attention `(key, value)` of one decoder layer.
    pub fn set_cross(&mut self, layer: usize, kv: (Tensor, Tensor)) {
        if layer >= self.cross.len() {
            self.cross.resize(layer + 1, None);
        }
        self.cross[layer] = Some(kv);
    }

    /// Whether nothing has been cached yet (no positions, no encoder output).
    pub fn is_empty(&self) -> bool {
        self.seq_len() == 0 && self.encoder.is_none()
    }

    /// Number of layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Cached positions (0 when empty).
    pub fn seq_len(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .next()
            .map(|(k, _)| k.dims().get(2).copied().unwrap_or(0))
            .unwrap_or(0)
    }

    /// The cached `(key, value)` of one layer.
    pub fn get(&self, layer: usize) -> Option<&(Tensor, Tensor)> {
        self.layers.get(layer).and_then(|l| l.as_ref())
    }

    /// Replaces the cached `(key, value)` of one layer.
    pub fn set(&mut self, layer: usize, kv: (Tensor, Tensor)) {
        if layer >= self.layers.len() {
            self.layers.resize(layer + 1, None);
        }
        self.layers[layer] = Some(kv);
    }
}

/// What every model holds besides its own layout: its facts, the modules it declared, and the
/// device and dtype of its frozen weights. A model keeps one and hands it to the trait
/// ([`AdaptableModel::core`]), which derives its accessors from it.
#[derive(Debug, Clone)]
pub struct ModelCore {
    /// Static facts about the model.
    pub info: ModelInfo,
    /// The declared modules.
    pub tree: ModuleTree,
    /// Device of the frozen weights.
    pub device: Device,
    /// Dtype of the frozen weights (the compute dtype).
    pub dtype: DType,
    /// Whether training forward passes checkpoint each block ([`crate::recompute`]); set
    /// through [`crate::PeftModel::set_gradient_checkpointing`], honoured by models whose
    /// [`AdaptableModel::supports_gradient_checkpointing`] is true.
    pub gradient_checkpointing: bool,
}

/// A model whose linear and embedding layers can be adapted by any method.
///
/// Paths are peft's module paths (`model.layers.0.self_attn.q_proj`), which are also the
/// Hugging Face parameter names minus `.weight`; checkpoint keys derive from them.
pub trait AdaptableModel: Send + Sync {
    /// The model's facts, declared modules, device and dtype.
    fn core(&self) -> &ModelCore;

    /// The same, mutable (methods swap slots through the visitors).
    fn core_mut(&mut self) -> &mut ModelCore;

    /// Static facts about the model.
    fn info(&self) -> &ModelInfo {
        &self.core().info
    }

    /// The modules the model declared (through [`crate::module_tree::ModelBuilder`]); the
    /// listing, the slot visitors, the named tensors and the parameter count derive from it.
    fn module_tree(&self) -> &ModuleTree {
        &self.core().tree
    }

    /// The declared modules, mutable (methods swap slots through the visitors).
    fn module_tree_mut(&mut self) -> &mut ModuleTree {
        &mut self.core_mut().tree
    }

    /// Every named module in `named_modules()` order (the root excluded).
    fn modules(&self) -> Vec<ModuleEntry> {
        self.module_tree().modules()
    }

    /// Calls `f` with each linear slot and its path.
    fn visit_linears(
        &mut self,
        f: &mut dyn FnMut(&str, &mut LinearSlot) -> Result<()>,
    ) -> Result<()> {
        self.module_tree_mut().visit_linears(f)
    }

    /// Calls `f` with each embedding slot and its path.
    fn visit_embeddings(
        &mut self,
        f: &mut dyn FnMut(&str, &mut EmbeddingSlot) -> Result<()>,
    ) -> Result<()> {
        self.module_tree_mut().visit_embeddings(f)
    }

    /// Calls `f` with each plain parameter (norm scales and shifts, position tables) and its
    /// full name: the seam for methods that train them (see [`ModuleTree::visit_params`]).
    fn visit_params(&mut self, f: &mut dyn FnMut(&str, &mut Tensor) -> Result<()>) -> Result<()> {
        self.module_tree_mut().visit_params(f)
    }

    /// Looks up token embeddings (the model's input embedding, adapters included).
    fn embed_tokens(&self, input_ids: &Tensor) -> Result<Tensor>;

    /// Runs the model and returns its logits as transformers' `forward` does. With a cache,
    /// the cached positions come first and the new keys/values are appended to it.
    fn forward(&self, inputs: &ModelInputs, cache: Option<&mut KvCache>) -> Result<Tensor>;

    /// Mean token cross-entropy of the logits [`AdaptableModel::forward`] returns (every
    /// position; `logits_to_keep` is not consulted), their `[B, T, V]` rows against `targets`
    /// `[B * T]` (I64, `-100` ignored; already aligned, e.g. shifted for a causal LM). Models
    /// whose output head is a linear layer apply it through
    /// [`crate::loss::head_cross_entropy`], which never holds the logits.
    fn token_loss(
        &self,
        inputs: &ModelInputs,
        cache: Option<&mut KvCache>,
        targets: &Tensor,
    ) -> Result<Tensor> {
        let logits = self.forward(inputs, cache)?;
        let v = logits.dim(candle_core::D::Minus1)?;
        let rows = logits.elem_count() / v.max(1);
        Ok(crate::loss::cross_entropy(&logits.reshape((rows, v))?, targets)?.0)
    }

    /// Rebuilds the stack of transformer layers from ranges of it (peft's `layer_replication`,
    /// see [`crate::replicate`]): copies share their source's frozen weights and are
    /// renumbered. By default the architecture cannot.
    fn replicate_layers(&mut self, _map: &[(usize, usize)]) -> Result<()> {
        Err(PeftError::InvalidState(format!(
            "{} does not support layer replication (peft replicates LLaMA-, BERT- and \
             Falcon-style layer stacks)",
            self.info().architecture
        )))
    }

    /// Whether the model's forward pass checkpoints its blocks when
    /// [`ModelCore::gradient_checkpointing`] is set (transformers'
    /// `supports_gradient_checkpointing`). Models that do wrap each block in
    /// [`crate::recompute::checkpoint`] (or `checkpoint_layer`) when
    /// [`crate::recompute::active`] says so.
    fn supports_gradient_checkpointing(&self) -> bool {
        false
    }

    /// A cache suited to this model.
    fn new_cache(&self) -> KvCache {
        KvCache::new(self.info().num_layers)
    }

    /// Number of parameters, each distinct tensor counted once (tied weights once).
    fn num_parameters(&self) -> usize {
        self.module_tree().num_parameters()
    }

    /// The model's tensors under their Hugging Face names, tied weights once (for saving).
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.module_tree().named_tensors()
    }

    /// The `config.json` describing this model.
    fn config_json(&self) -> Value;

    /// Device of the frozen weights.
    fn device(&self) -> &Device {
        &self.core().device
    }

    /// Dtype of the frozen weights.
    fn dtype(&self) -> DType {
        self.core().dtype
    }

    /// Writes the model as a Hugging Face folder (`config.json` + `model.safetensors`).
    fn save_pretrained(&self, dir: &Path) -> Result<()> {
        crate::checkpoint::save_model_folder(self, dir)
    }
}
