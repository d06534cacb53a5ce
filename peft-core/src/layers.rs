//! Swappable layer slots. A model holds each adaptable linear as a [`LinearSlot`]
//! (`Arc<dyn LinearLike>`) and each embedding as an [`EmbeddingSlot`]; methods wrap a slot and
//! put the wrapper back. This file defines the traits and the dense (f32/bf16) base layers;
//! quantized bases live in `peft-quant` and implement the same traits.

use std::any::Any;
use std::fmt::Debug;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{PeftError, Result};

/// A linear layer as seen by methods: forward, shape, and its frozen weight for merging.
pub trait LinearLike: Send + Sync + Debug {
    /// `y = x W^T + b` over the last dimension of `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;
    /// Input features.
    fn in_features(&self) -> usize;
    /// Output features.
    fn out_features(&self) -> usize;
    /// The weight as stored (dequantized if need be): `[out, in]`, or `[in, out]` when
    /// [`LinearLike::stores_transposed`] (GPT-2's Conv1D).
    fn weight(&self) -> Result<Tensor>;
    /// Whether the weight is stored `[in, out]` (peft's `fan_in_fan_out`).
    fn stores_transposed(&self) -> bool {
        false
    }
    /// The bias, if any.
    fn bias(&self) -> Option<&Tensor>;
    /// Dtype of the stored weight.
    fn dtype(&self) -> DType;
    /// Parameters held by the layer itself.
    fn num_params(&self) -> usize {
        self.in_features() * self.out_features() + self.bias().map_or(0, |b| b.elem_count())
    }
    /// A layer of the same kind holding new weights (used when merging).
    fn with_weights(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Arc<dyn LinearLike>>;
    /// peft's `quantization_backend` name for a quantized layer (`"bnb 4bit"`, `"bnb 8bit"`);
    /// `None` for a dense one.
    fn quantization_backend(&self) -> Option<&'static str> {
        None
    }
    /// The same layer with `bias` (of the current bias's shape) in place of its bias, the
    /// weight kept as stored: how a trained base bias (peft's `bias="all"`) reaches the layer.
    /// The layer must add the bias with differentiable ops, so that it gets a gradient.
    fn with_bias(&self, _bias: Tensor) -> Result<Arc<dyn LinearLike>> {
        Err(PeftError::InvalidState(format!(
            "a {} layer cannot take a trained bias",
            std::any::type_name::<Self>()
        )))
    }
    /// For downcasting (core recognises its own wrappers this way).
    fn as_any(&self) -> &dyn Any;
}

/// An embedding table as seen by methods.
pub trait EmbeddingLike: Send + Sync + Debug {
    /// Looks up `ids` (`[..]` of U32/I64) and returns `[.., dim]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor>;
    /// Vocabulary size.
    fn num_embeddings(&self) -> usize;
    /// Embedding width.
    fn embedding_dim(&self) -> usize;
    /// The `[num_embeddings, dim]` table.
    fn weight(&self) -> Result<Tensor>;
    /// The padding index, whose row receives no gradient (torch's `padding_idx`).
    fn padding_idx(&self) -> Option<usize>;
    /// Dtype of the table.
    fn dtype(&self) -> DType;
    /// An embedding of the same kind holding a new table (used when merging).
    fn with_weight(&self, weight: Tensor) -> Result<Arc<dyn EmbeddingLike>>;
    /// For downcasting.
    fn as_any(&self) -> &dyn Any;
}

/// A swappable linear layer.
pub type LinearSlot = Arc<dyn LinearLike>;
/// A swappable embedding layer.
pub type EmbeddingSlot = Arc<dyn EmbeddingLike>;

/// `base` holding `weight` instead of its own (stored layout, any float dtype: converted to the
/// stored weight's dtype, requantized for a quantized layer), detached, the bias kept: how an
/// initialisation that rewrites the base weight (PiSSA, OLoRA, LoftQ) reaches the layer.
pub fn with_stored_weight(base: &dyn LinearLike, weight: &Tensor) -> Result<LinearSlot> {
    let dtype = base.weight()?.dtype();
    base.with_weights(weight.to_dtype(dtype)?.detach(), base.bias().cloned())
}

/// Multiplies `x [.., in]` by `w^T` where `w` is `[out, in]` (or by `w` when it is stored
/// `[in, out]`), flattening the leading dimensions into one matmul.
pub fn linear_forward(
    x: &Tensor,
    weight: &Tensor,
    transposed: bool,
) -> candle_core::Result<Tensor> {
    let dims = x.dims();
    let in_features = *dims
        .last()
        .ok_or_else(|| candle_core::Error::Msg("linear input is a scalar".into()))?;
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((lead, in_features))?;
    // A frozen weight gets no gradient (candle's matmul would compute and keep one).
    let y = if transposed {
        peft_kernels::linear::frozen_matmul(&x2, weight)?
    } else {
        peft_kernels::linear::frozen_matmul(&x2, &weight.t()?)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty dims") = y.dim(1)?;
    y.reshape(out_dims)
}

/// A plain dense linear layer holding frozen tensors.
#[derive(Debug, Clone)]
pub struct DenseLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
}

impl DenseLinear {
    /// A layer with `weight` `[out, in]` and an optional bias `[out]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::build(weight, bias, false)
    }

    /// A layer whose weight is stored `[in, out]` (GPT-2's Conv1D).
    pub fn new_transposed(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Self::build(weight, bias, true)
    }

    fn build(weight: Tensor, bias: Option<Tensor>, transposed: bool) -> Result<Self> {
        let (d0, d1) = weight.dims2().map_err(|_| {
            PeftError::bad_input(
                "linear weight",
                "a 2-D tensor",
                format!("{:?}", weight.dims()),
            )
        })?;
        let out = if transposed { d1 } else { d0 };
        if let Some(b) = &bias {
            if b.dims() != [out] {
                return Err(PeftError::bad_input(
                    "linear bias",
                    format!("shape [{out}]"),
                    format!("{:?}", b.dims()),
                ));
            }
        }
        Ok(DenseLinear {
            weight,
            bias,
            transposed,
        })
    }

    /// Wraps this layer as a slot.
    pub fn into_slot(self) -> LinearSlot {
        Arc::new(self)
    }

    /// The stored weight, the bias and whether the weight is stored `[in, out]`.
    pub fn parts(&self) -> (&Tensor, Option<&Tensor>, bool) {
        (&self.weight, self.bias.as_ref(), self.transposed)
    }
}

impl LinearLike for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match peft_kernels::linear::frozen_linear_forward(x, &self.weight, self.transposed)?
        {
            Some(y) => y,
            // A weight stored in another dtype than the activations (bf16 matrices under f32
            // compute) takes part in the activations' dtype.
            None if self.weight.dtype() != x.dtype() => {
                linear_forward(x, &self.weight.to_dtype(x.dtype())?, self.transposed)?
            }
            None => linear_forward(x, &self.weight, self.transposed)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
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
        self.weight.dtype()
    }
    fn with_weights(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Arc<dyn LinearLike>> {
        Ok(Arc::new(DenseLinear::build(weight, bias, self.transposed)?))
    }
    fn with_bias(&self, bias: Tensor) -> Result<Arc<dyn LinearLike>> {
        Ok(Arc::new(DenseLinear {
            bias: Some(bias),
            ..self.clone()
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// A plain dense embedding table.
#[derive(Debug, Clone)]
pub struct DenseEmbedding {
    weight: Tensor,
    padding_idx: Option<usize>,
}

impl DenseEmbedding {
    /// An embedding with table `[num_embeddings, dim]`.
    pub fn new(weight: Tensor, padding_idx: Option<usize>) -> Result<Self> {
        weight.dims2().map_err(|_| {
            PeftError::bad_input(
                "embedding weight",
                "a 2-D tensor",
                format!("{:?}", weight.dims()),
            )
        })?;
        Ok(DenseEmbedding {
            weight,
            padding_idx,
        })
    }

    /// Wraps this table as a slot.
    pub fn into_slot(self) -> EmbeddingSlot {
        Arc::new(self)
    }
}

/// Looks rows of `table` up by `ids`, keeping the ids' shape and appending the row width.
pub fn embedding_lookup(table: &Tensor, ids: &Tensor) -> candle_core::Result<Tensor> {
    let ids = if ids.dtype() == DType::U32 {
        ids.clone()
    } else {
        ids.to_dtype(DType::U32)?
    };
    let flat = ids.flatten_all()?;
    let rows = table.index_select(&flat, 0)?;
    let mut dims = ids.dims().to_vec();
    dims.push(table.dim(1)?);
    rows.reshape(dims)
}

impl EmbeddingLike for DenseEmbedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(embedding_lookup(&self.weight, ids)?)
    }
    fn num_embeddings(&self) -> usize {
        self.weight.dims()[0]
    }
    fn embedding_dim(&self) -> usize {
        self.weight.dims()[1]
    }
    fn weight(&self) -> Result<Tensor> {
        Ok(self.weight.clone())
    }
    fn padding_idx(&self) -> Option<usize> {
        self.padding_idx
    }
    fn dtype(&self) -> DType {
        self.weight.dtype()
    }
    fn with_weight(&self, weight: Tensor) -> Result<Arc<dyn EmbeddingLike>> {
        Ok(Arc::new(DenseEmbedding::new(weight, self.padding_idx)?))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
