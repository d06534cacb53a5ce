//! The pieces every model composes, written once: the input-embedding resolution (token ids
//! looked up, or `inputs_embeds` checked), default positions, the language-model head
//! (`logits_to_keep`, the fused head + loss), and reading a model folder's `config.json`.
//! Attention, rotary and norm kernels live in [`crate::ops`]; a model's own module tree comes
//! from [`peft_core::ModelBuilder`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::{EmbeddingId, LinearId, ModelInputs, ModuleTree, PeftError, Result};
use serde_json::{Map, Value};

/// A model folder's `config.json`, parsed, with its path for error messages.
pub fn read_config(dir: &Path) -> Result<(Map<String, Value>, String)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| PeftError::io(&path, e))?;
    let source = path.display().to_string();
    Ok((peft_core::json::parse_object(&text, &source)?, source))
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
