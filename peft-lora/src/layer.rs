//! The LoRA layers: `y = base(x) + B(A(dropout(x))) * scaling` on linear layers and
//! `y = base(ids) + (A^T[ids] B^T) * scaling` on embeddings, with peft's parameter names
//! (`lora_A.weight`, `lora_B.weight`, `lora_embedding_A`, `lora_embedding_B`) and
//! initialisations. Nothing here materialises `B @ A` except merging.

use candle_core::{DType, Tensor};
use peft_core::layers::{
    embedding_lookup, linear_forward, lowrank_linear_forward, DenseLinear, LinearLike,
};
use peft_core::nn::Dropout;
use peft_core::{EmbeddingAdapter, Init, LinearAdapter, ParamBuilder, Result};

use crate::config::InitLoraWeights;

/// LoRA on a linear layer.
#[derive(Debug)]
pub struct LoraLinear {
    a: Tensor,
    b: Tensor,
    scaling: f64,
    dropout: Dropout,
}

impl LoraLinear {
    /// Builds (or loads) `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` under `params`.
    #[allow(clippy::too_many_arguments)] // mirrors peft's `update_layer` arguments
    pub fn new(
        params: &ParamBuilder,
        in_features: usize,
        out_features: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
        seed: u64,
    ) -> Result<Self> {
        let (init_a, init_b) = match init {
            InitLoraWeights::Default | InitLoraWeights::Other(_) => {
                (Init::kaiming_uniform_linear(in_features), Init::Zeros)
            }
            InitLoraWeights::Gaussian => (
                Init::Normal {
                    mean: 0.0,
                    std: 1.0 / r as f64,
                },
                Init::Zeros,
            ),
            InitLoraWeights::Random => (
                Init::kaiming_uniform_linear(in_features),
                Init::kaiming_uniform_linear(r),
            ),
        };
        let a = params
            .pp("lora_A")
            .get(&[r, in_features], "weight", init_a)?;
        let b = params
            .pp("lora_B")
            .get(&[out_features, r], "weight", init_b)?;
        Ok(LoraLinear {
            a,
            b,
            scaling,
            dropout: Dropout::new(dropout, seed),
        })
    }

    /// The scaling applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        self.scaling
    }

    /// `(B @ A) * scaling`, shaped `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scaling)?)
    }
}

impl LinearAdapter for LoraLinear {
    fn adapt_output(&self, x: &Tensor, y: Tensor, training: bool) -> Result<Tensor> {
        let x = if x.dtype() == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let x = self.dropout.forward(&x, training)?;
        // Scale the rank-r intermediate, not the [.., out] delta: one small temporary instead
        // of a full-width one (and its gradient).
        let h = (linear_forward(&x, &self.a, false)? * self.scaling)?;
        let delta = linear_forward(&h, &self.b, false)?;
        let delta = if y.dtype() == DType::F32 {
            delta
        } else {
            delta.to_dtype(y.dtype())?
        };
        Ok((y + delta)?)
    }

    fn fused_forward(
        &self,
        base: &dyn LinearLike,
        x: &Tensor,
        training: bool,
    ) -> Result<Option<Tensor>> {
        let Some(dense) = base.as_any().downcast_ref::<DenseLinear>() else {
            return Ok(None);
        };
        if !self.dropout.is_identity(training) {
            return Ok(None);
        }
        lowrank_linear_forward(x, dense, &self.a, &self.b, self.scaling)
    }

    fn merge(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        Ok(((weight + self.delta_weight()?)?, bias.cloned()))
    }
}

/// LoRA on an embedding table.
#[derive(Debug)]
pub struct LoraEmbedding {
    /// `[r, num_embeddings]`
    a: Tensor,
    /// `[dim, r]`
    b: Tensor,
    scaling: f64,
    padding_idx: Option<usize>,
}

impl LoraEmbedding {
    /// Builds (or loads) `lora_embedding_A` `[r, vocab]` and `lora_embedding_B` `[dim, r]`.
    pub fn new(
        params: &ParamBuilder,
        num_embeddings: usize,
        dim: usize,
        r: usize,
        scaling: f64,
        init: &InitLoraWeights,
        padding_idx: Option<usize>,
    ) -> Result<Self> {
        let normal = Init::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let (init_a, init_b) = match init {
            InitLoraWeights::Random => (normal, normal),
            _ => (Init::Zeros, normal),
        };
        let a = params.get(&[r, num_embeddings], "lora_embedding_A", init_a)?;
        let b = params.get(&[dim, r], "lora_embedding_B", init_b)?;
        Ok(LoraEmbedding {
            a,
            b,
            scaling,
            padding_idx,
        })
    }
}

impl EmbeddingAdapter for LoraEmbedding {
    fn adapt_output(&self, ids: &Tensor, y: Tensor, training: bool) -> Result<Tensor> {
        let table = self.a.t()?.contiguous()?;
        let mut after_a = embedding_lookup(&table, ids)?;
        if let (true, Some(pad)) = (training, self.padding_idx) {
            // torch's padding_idx: the padding row gets no gradient.
            let is_pad = ids
                .to_dtype(DType::U32)?
                .eq(pad as u32)?
                .unsqueeze(candle_core::D::Minus1)?;
            let is_pad = is_pad.broadcast_as(after_a.shape())?;
            after_a = is_pad.where_cond(&after_a.detach(), &after_a)?;
        }
        let delta = (linear_forward(&after_a, &self.b, false)? * self.scaling)?;
        let delta = if y.dtype() == DType::F32 {
            delta
        } else {
            delta.to_dtype(y.dtype())?
        };
        Ok((y + delta)?)
    }

    fn merge(&self, weight: &Tensor) -> Result<Tensor> {
        let delta = (self.b.matmul(&self.a)?.t()? * self.scaling)?;
        Ok((weight + delta)?)
    }
}
