//! Trainable tokens (peft's `trainable_token_indices`, its `TrainableTokensWrapper`): only
//! chosen rows of an embedding table are trained, as a `[n, dim]` parameter
//! `token_adapter.trainable_tokens_delta` that replaces those rows (despite its name it holds
//! the rows themselves, starting as a copy of the originals). On a linear layer (an output head)
//! the rows are output features: their logits become `x · delta_kᵀ`. When the model ties its
//! output head to the input embedding, the head shares the embedding's parameter, as peft ties
//! them, so a trained token is read and written with one vector.

use candle_core::{DType, Tensor};
use serde_json::Value;

use crate::error::{PeftError, Result};
use crate::layers::{linear_forward, EmbeddingLike, LinearLike};
use crate::method::{EmbeddingAdapter, LinearAdapter};
use crate::vars::ParamBuilder;

/// The parameter (under `<module>.token_adapter.`) peft saves.
pub const DELTA_NAME: &str = "trainable_tokens_delta";
/// The submodule the parameter lives in.
pub const TOKEN_ADAPTER: &str = "token_adapter";

/// `trainable_token_indices`: which rows are trained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenIndices {
    /// A list: rows of the model's input embedding.
    Input(Vec<usize>),
    /// Per module (a name matched as a suffix of module paths, as peft matches it), in file
    /// order.
    Named(Vec<(String, Vec<usize>)>),
}

fn index_list(source: &str, key: &str, v: &Value) -> Result<Vec<usize>> {
    let bad = || {
        PeftError::config_value(
            source,
            key,
            "a list of non-negative token indices",
            crate::json::describe(v),
        )
    };
    let list = v.as_array().ok_or_else(bad)?;
    list.iter()
        .map(|i| i.as_u64().map(|i| i as usize).ok_or_else(bad))
        .collect()
}

impl TokenIndices {
    /// Reads `trainable_token_indices` (`null`, a list of ints, or an object of lists);
    /// `None` for null.
    pub fn from_json(source: &str, value: &Value) -> Result<Option<Self>> {
        const KEY: &str = "trainable_token_indices";
        match value {
            Value::Null => Ok(None),
            Value::Array(_) => Ok(Some(TokenIndices::Input(index_list(source, KEY, value)?))),
            Value::Object(map) => Ok(Some(TokenIndices::Named(
                map.iter()
                    .map(|(k, v)| Ok((k.clone(), index_list(source, &format!("{KEY}.{k}"), v)?)))
                    .collect::<Result<_>>()?,
            ))),
            other => Err(PeftError::config_value(
                source,
                KEY,
                "null, a list of token indices, or an object of module name -> indices",
                crate::json::describe(other),
            )),
        }
    }

    /// The JSON form, as peft writes it.
    pub fn to_json(&self) -> Value {
        match self {
            TokenIndices::Input(ids) => Value::from(ids.clone()),
            TokenIndices::Named(map) => Value::Object(
                map.iter()
                    .map(|(k, ids)| (k.clone(), Value::from(ids.clone())))
                    .collect(),
            ),
        }
    }
}

/// Checks indices against a table of `rows` rows.
fn check_indices(path: &str, indices: &[usize], rows: usize) -> Result<()> {
    if indices.is_empty() {
        return Err(PeftError::InvalidState(format!(
            "{path}: trainable_token_indices is empty"
        )));
    }
    if let Some(bad) = indices.iter().find(|&&i| i >= rows) {
        return Err(PeftError::InvalidState(format!(
            "{path}: trainable token index {bad} is out of range for {rows} rows"
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(dup) = indices.iter().find(|&&i| !seen.insert(i)) {
        return Err(PeftError::InvalidState(format!(
            "{path}: trainable token index {dup} is listed twice"
        )));
    }
    Ok(())
}

/// For each of `rows` rows, its position among `indices`, or `indices.len()` if it is not
/// trained (a U32 `[rows]` lookup table).
fn slot_table(indices: &[usize], rows: usize, device: &candle_core::Device) -> Result<Tensor> {
    let mut slots = vec![indices.len() as u32; rows];
    for (k, &i) in indices.iter().enumerate() {
        slots[i] = k as u32;
    }
    Ok(Tensor::from_vec(slots, rows, device)?)
}

/// `delta` with one zero row appended, so that untrained rows can look up "nothing".
fn with_zero_row(delta: &Tensor) -> Result<Tensor> {
    let dim = delta.dim(1)?;
    let zero = Tensor::zeros((1, dim), delta.dtype(), delta.device())?;
    Ok(Tensor::cat(&[delta, &zero], 0)?)
}

/// Trainable rows of an embedding table.
#[derive(Debug)]
pub struct TokenRows {
    indices: Vec<usize>,
    /// `[n, dim]`, f32.
    delta: Tensor,
    /// `[num_embeddings]` U32: each row's slot in `delta`, `n` for the rest.
    slots: Tensor,
    /// The slot of the padding row, if it is trained: it gets no gradient (torch's
    /// `padding_idx`).
    padding_slot: Option<usize>,
}

impl TokenRows {
    /// Builds (or loads) `token_adapter.trainable_tokens_delta` under `params` (the module's
    /// builder), starting as a copy of the rows `indices` of `base`.
    pub fn new(
        params: &ParamBuilder,
        base: &dyn EmbeddingLike,
        indices: Vec<usize>,
    ) -> Result<Self> {
        let path = params.path("");
        check_indices(&path, &indices, base.num_embeddings())?;
        let table = base.weight()?;
        let device = table.device().clone();
        let index = Tensor::from_vec(
            indices.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
            indices.len(),
            &device,
        )?;
        let delta = params.pp(TOKEN_ADAPTER).get_with(
            &[indices.len(), base.embedding_dim()],
            DELTA_NAME,
            |_| Ok(table.index_select(&index, 0)?.to_dtype(DType::F32)?),
        )?;
        let padding_slot = base
            .padding_idx()
            .and_then(|p| indices.iter().position(|&i| i == p));
        Ok(TokenRows {
            slots: slot_table(&indices, base.num_embeddings(), &device)?,
            indices,
            delta,
            padding_slot,
        })
    }

    /// The trained rows `[n, dim]` (shared with a tied head).
    pub fn delta(&self) -> &Tensor {
        &self.delta
    }

    /// The trained row indices.
    pub fn indices(&self) -> &[usize] {
        &self.indices
    }

    fn rows(&self, training: bool) -> Result<Tensor> {
        let delta = match (training, self.padding_slot) {
            (true, Some(slot)) => {
                let n = self.indices.len();
                let is_pad = Tensor::from_vec(
                    (0..n).map(|k| u8::from(k == slot)).collect::<Vec<u8>>(),
                    (n, 1),
                    self.delta.device(),
                )?
                .broadcast_as(self.delta.shape())?;
                is_pad.where_cond(&self.delta.detach(), &self.delta)?
            }
            _ => self.delta.clone(),
        };
        with_zero_row(&delta)
    }
}

impl EmbeddingAdapter for TokenRows {
    fn adapt_output(
        &self,
        _base: &dyn EmbeddingLike,
        ids: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let slot = self.slots.index_select(&flat, 0)?;
        let rows = self.rows(training)?.index_select(&slot, 0)?;
        let trained = slot
            .lt(self.indices.len() as u32)?
            .unsqueeze(1)?
            .broadcast_as(rows.shape())?;
        let dtype = y.dtype();
        let dims = y.dims().to_vec();
        let flat_y = y
            .reshape((flat.dim(0)?, rows.dim(1)?))?
            .to_dtype(DType::F32)?;
        Ok(trained
            .where_cond(&rows, &flat_y)?
            .reshape(dims)?
            .to_dtype(dtype)?)
    }

    fn merge(&self, weight: &Tensor, _base_weight: &Tensor) -> Result<Tensor> {
        let rows = self.rows(false)?.index_select(&self.slots, 0)?;
        let trained = self
            .slots
            .lt(self.indices.len() as u32)?
            .unsqueeze(1)?
            .broadcast_as(weight.shape())?;
        Ok(trained.where_cond(&rows, weight)?)
    }
}

/// Trainable output features of a linear layer (an output head): the logits of the chosen rows
/// are `x · delta_kᵀ`; with a tied head, `delta` is the input embedding's [`TokenRows`] one.
#[derive(Debug)]
pub struct TokenColumns {
    /// `[n, in]`, f32.
    delta: Tensor,
    /// `[out]` f32: 0 for a trained feature, 1 for the rest.
    keep: Tensor,
    /// `[out, n]` f32: the one-hot placement of the trained features.
    place: Tensor,
}

impl TokenColumns {
    fn with_delta(
        path: &str,
        base: &dyn LinearLike,
        indices: &[usize],
        delta: Tensor,
    ) -> Result<Self> {
        check_indices(path, indices, base.out_features())?;
        if base.bias().is_some() {
            return Err(PeftError::UnsupportedModule {
                path: path.to_string(),
                kind: "a linear layer with a bias".into(),
                method: "trainable_token_indices".into(),
                supported: "embeddings and bias-free linear layers (peft's trainable tokens \
                            compute a linear layer without its bias)"
                    .into(),
            });
        }
        let out = base.out_features();
        let n = indices.len();
        let device = delta.device().clone();
        let mut keep = vec![1f32; out];
        let mut place = vec![0f32; out * n];
        for (k, &i) in indices.iter().enumerate() {
            keep[i] = 0.0;
            place[i * n + k] = 1.0;
        }
        Ok(TokenColumns {
            delta,
            keep: Tensor::from_vec(keep, out, &device)?,
            place: Tensor::from_vec(place, (out, n), &device)?,
        })
    }

    /// Builds (or loads) the layer's own `token_adapter.trainable_tokens_delta` under `params`,
    /// starting as the rows `indices` of its `[out, in]` weight.
    pub fn new(params: &ParamBuilder, base: &dyn LinearLike, indices: Vec<usize>) -> Result<Self> {
        let path = params.path("");
        check_indices(&path, &indices, base.out_features())?;
        let weight = base.weight()?.to_dtype(DType::F32)?;
        let weight = if base.stores_transposed() {
            weight.t()?.contiguous()?
        } else {
            weight
        };
        let index = Tensor::from_vec(
            indices.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
            indices.len(),
            weight.device(),
        )?;
        let delta = params.pp(TOKEN_ADAPTER).get_with(
            &[indices.len(), base.in_features()],
            DELTA_NAME,
            |_| Ok(weight.index_select(&index, 0)?),
        )?;
        Self::with_delta(&path, base, &indices, delta)
    }

    /// A head tied to the input embedding: reads the embedding's trained rows.
    pub fn tied(path: &str, base: &dyn LinearLike, rows: &TokenRows) -> Result<Self> {
        Self::with_delta(path, base, rows.indices(), rows.delta().clone())
    }
}

impl LinearAdapter for TokenColumns {
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        let x = x.to_dtype(DType::F32)?;
        let trained = linear_forward(&x, &self.delta, false)?;
        let placed = linear_forward(&trained, &self.place, false)?;
        let dtype = y.dtype();
        let kept = y.to_dtype(DType::F32)?.broadcast_mul(&self.keep)?;
        Ok((kept + placed)?.to_dtype(dtype)?)
    }

    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let kept = weight.broadcast_mul(&self.keep.unsqueeze(1)?)?;
        Ok(((kept + self.place.matmul(&self.delta)?)?, bias.cloned()))
    }
}
