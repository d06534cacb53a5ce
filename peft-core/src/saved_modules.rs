//! `modules_to_save`: full, trainable copies of chosen modules (typically a classification
//! head), as peft's `ModulesToSaveWrapper`. While its adapter is active the copy replaces the
//! original layer; with adapters disabled the original runs. The copy is saved under the
//! module's own names (`base_model.model.classifier.weight` for layer methods,
//! `base_model.classifier.weight` for prompt methods).

use std::any::Any;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::layers::{embedding_lookup, linear_forward, EmbeddingLike, LinearLike};
use crate::method::{EmbeddingAdapter, LinearAdapter};
use crate::vars::ParamBuilder;

/// A trainable copy of a linear layer (f32, the base layer's layout).
#[derive(Debug)]
pub struct LinearCopy {
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
}

impl LinearCopy {
    /// Copies `base` into parameters `weight` (and `bias`) under `params`, or loads them.
    pub fn new(params: &ParamBuilder, base: &dyn LinearLike) -> Result<Self> {
        let w = base.weight()?;
        let weight = params.get_with(w.dims(), "weight", |_| Ok(w.to_dtype(DType::F32)?))?;
        let bias = match base.bias() {
            Some(b) => Some(params.get_with(b.dims(), "bias", |_| Ok(b.to_dtype(DType::F32)?))?),
            None => None,
        };
        Ok(LinearCopy {
            weight,
            bias,
            transposed: base.stores_transposed(),
        })
    }
}

impl LinearLike for LinearCopy {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = linear_forward(&x.to_dtype(DType::F32)?, &self.weight, self.transposed)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        Ok(crate::grad::maybe_detach(y.to_dtype(x.dtype())?))
    }
    fn in_features(&self) -> usize {
        self.weight.dims()[usize::from(!self.transposed)]
    }
    fn out_features(&self) -> usize {
        self.weight.dims()[usize::from(self.transposed)]
    }
    fn weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn stores_transposed(&self) -> bool {
        self.transposed
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn with_weights(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Arc<dyn LinearLike>> {
        Ok(Arc::new(LinearCopy {
            weight,
            bias,
            transposed: self.transposed,
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl LinearAdapter for LinearCopy {
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        x: &Tensor,
        _y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        LinearLike::forward(self, x)
    }
    fn merge(
        &self,
        _weight: &Tensor,
        _bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let w = if self.transposed {
            self.weight.t()?.contiguous()?
        } else {
            self.weight.clone()
        };
        Ok((w, self.bias.clone()))
    }
    fn replacement(&self) -> Option<&(dyn LinearLike + 'static)> {
        Some(self)
    }
}

/// A trainable copy of an embedding table (f32).
#[derive(Debug)]
pub struct EmbeddingCopy {
    table: Tensor,
    padding_idx: Option<usize>,
}

impl EmbeddingCopy {
    /// Copies `base` into the parameter `weight` under `params`, or loads it.
    pub fn new(params: &ParamBuilder, base: &dyn EmbeddingLike) -> Result<Self> {
        let w = base.weight()?;
        let table = params.get_with(w.dims(), "weight", |_| Ok(w.to_dtype(DType::F32)?))?;
        Ok(EmbeddingCopy {
            table,
            padding_idx: base.padding_idx(),
        })
    }
}

impl EmbeddingLike for EmbeddingCopy {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(crate::grad::maybe_detach(embedding_lookup(
            &self.table,
            ids,
        )?))
    }
    fn num_embeddings(&self) -> usize {
        self.table.dims()[0]
    }
    fn embedding_dim(&self) -> usize {
        self.table.dims()[1]
    }
    fn weight(&self) -> Result<Tensor> {
        Ok(self.table.clone())
    }
    fn padding_idx(&self) -> Option<usize> {
        self.padding_idx
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn with_weight(&self, weight: Tensor) -> Result<Arc<dyn EmbeddingLike>> {
        Ok(Arc::new(EmbeddingCopy {
            table: weight,
            padding_idx: self.padding_idx,
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl EmbeddingAdapter for EmbeddingCopy {
    fn adapt_output(
        &self,
        _base: &dyn EmbeddingLike,
        ids: &Tensor,
        _y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        EmbeddingLike::forward(self, ids)
    }
    fn merge(&self, _weight: &Tensor, _base_weight: &Tensor) -> Result<Tensor> {
        Ok(self.table.clone())
    }
    fn replacement(&self) -> Option<&(dyn EmbeddingLike + 'static)> {
        Some(self)
    }
}
