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
    let y = if transposed {
        x2.matmul(weight)?
    } else {
        x2.matmul(&weight.t()?)?
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty dims") = y.dim(1)?;
    y.reshape(out_dims)
}

/// The f32 values of a contiguous CPU tensor as a custom op sees them (`op` names the op in
/// errors).
pub fn cpu_f32_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &candle_core::Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    let candle_core::CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expected f32 values");
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
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
}

/// `x W^T` (or `x W` for a weight stored `[in, out]`) against a frozen f32 weight on the CPU,
/// with a backward that returns the input gradient only. candle's matmul backward also computes
/// the gradient of the weight (a full `[out, in]` product and tensor per layer per step) even
/// when the weight is a plain, untracked tensor; for frozen base layers that is a third of the
/// backward's arithmetic and a weight-sized allocation kept to the end of the step, for nothing.
/// Returns `None` where it does not apply (other devices or dtypes, a tracked weight).
pub fn frozen_linear_forward(x: &Tensor, weight: &Tensor, transposed: bool) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || weight.is_variable()
        || weight.track_op()
        || weight.rank() != 2
    {
        return Ok(None);
    }
    let weight = weight.contiguous()?;
    let op = FrozenMatmul {
        weight,
        transposed,
        input_grad: false,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// `y = x op(W)` where `op(W)` is `W^T` for `[out, in]` weights; `input_grad` computes
/// `g op(W)^T` instead (the backward).
struct FrozenMatmul {
    weight: Tensor,
    transposed: bool,
    input_grad: bool,
}

impl candle_core::CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::{CpuStorage, Storage};
        let x = cpu_f32_slice(storage, layout, "frozen-linear")?;
        let (w_guard, w_layout) = self.weight.storage_and_layout();
        let Storage::Cpu(CpuStorage::F32(ws)) = &*w_guard else {
            candle_core::bail!("frozen-linear: expected an f32 CPU weight");
        };
        let Some((wa, wb)) = w_layout.contiguous_offsets() else {
            candle_core::bail!("frozen-linear: expected a contiguous weight");
        };
        let w = &ws[wa..wb];
        let (d0, d1) = self.weight.dims2()?;
        // Stored [out, in] (d0 = out) unless transposed ([in, out]).
        let (out_f, in_f) = if self.transposed { (d1, d0) } else { (d0, d1) };
        let (k, n) = if self.input_grad { (out_f, in_f) } else { (in_f, out_f) };
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!("frozen-linear: input's last dimension should be {k}, found {dims:?}");
        }
        let m = x.len() / k.max(1);
        // op(W) as a [k, n] matrix read in place: element (kk, j).
        // forward, [out, in] storage: op(W)[kk, j] = W[j, kk] -> rs 1, cs d1.
        // forward, [in, out] storage: op(W)[kk, j] = W[kk, j] -> rs d1, cs 1.
        // input grad flips both.
        let plain = self.transposed != self.input_grad;
        let (rs, cs) = if plain { (d1 as isize, 1) } else { (1, d1 as isize) };
        let mut y = vec![0f32; m * n];
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        if m > 0 && n > 0 {
            // SAFETY: x is [m, k] row-major, y is [m, n] row-major, and (rs, cs) address the
            // [k, n] view of the d0 x d1 weight within its extent.
            unsafe {
                gemm::gemm(
                    m, n, k,
                    y.as_mut_ptr(), 1, n as isize, false,
                    x.as_ptr(), 1, k as isize,
                    w.as_ptr(), cs, rs,
                    0.0, 1.0, false, false, false,
                    parallelism,
                );
            }
        }
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty dims") = n;
        Ok((CpuStorage::F32(y), candle_core::Shape::from(out)))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
        if self.input_grad {
            return Ok(None);
        }
        let op = FrozenMatmul {
            weight: self.weight.clone(),
            transposed: self.transposed,
            input_grad: true,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

impl LinearLike for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match frozen_linear_forward(x, &self.weight, self.transposed)? {
            Some(y) => y,
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

#[cfg(test)]
mod frozen_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The frozen-weight op equals the matmul, in both weight layouts, with the same input
    /// gradient; a tracked weight is left to candle (its gradient is needed).
    #[test]
    fn frozen_linear_equals_matmul_and_gives_input_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 12), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, 7), &dev)?;
        for transposed in [false, true] {
            let shape = if transposed { (12, 7) } else { (7, 12) };
            let w = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let fast = frozen_linear_forward(x.as_tensor(), &w, transposed)?.expect("applies");
            let slow = linear_forward(x.as_tensor(), &w, transposed)?;
            assert!(max_diff(&fast, &slow) < 1e-5);
            let gf = (fast * &probe)?.sum_all()?.backward()?;
            let gs = (slow * &probe)?.sum_all()?.backward()?;
            let d = max_diff(gf.get(x.as_tensor()).expect("grad"), gs.get(x.as_tensor()).expect("grad"));
            assert!(d < 1e-5, "input gradient differs by {d} (transposed {transposed})");
        }
        let tracked = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 12), &dev)?)?;
        assert!(frozen_linear_forward(x.as_tensor(), tracked.as_tensor(), false)?.is_none());
        Ok(())
    }
}
