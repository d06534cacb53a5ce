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

/// `dst[m, n] (+)= alpha * lhs[m, k] rhs[k, n]` in f32 ([`crate::sgemm`] where the CPU has AVX2
/// and FMA, else the `gemm` crate); `dst` has row stride `dst_rs` (columns contiguous), `lhs`
/// and `rhs` are given by (row, column) strides.
/// `parallel` spreads one product over rayon's threads (else it runs on the calling thread).
///
/// # Safety
/// The pointers and strides must address valid `m x k`, `k x n` and `m x n` regions, and no
/// other thread may write `dst`'s region meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (l_rs, l_cs): (usize, usize),
    rhs: *const f32,
    (r_rs, r_cs): (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::available() {
        let a = crate::sgemm::Operand {
            ptr: lhs,
            rs: l_rs,
            cs: l_cs,
        };
        let b = crate::sgemm::Rhs::F32(crate::sgemm::Operand {
            ptr: rhs,
            rs: r_rs,
            cs: r_cs,
        });
        // SAFETY: the caller's contract; the CPU check above.
        unsafe {
            crate::sgemm::sgemm(
                (m, n, k),
                dst,
                dst_rs,
                accumulate,
                a,
                b,
                alpha,
                if parallel { threads } else { 1 },
            )
        };
        return;
    }
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            l_cs as isize,
            l_rs as isize,
            rhs,
            r_cs as isize,
            r_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The f32 values of contiguous CPU tensors outside a custom op (a custom op's backward, or a
/// tensor an op holds), their storages locked while `f` runs; `what` names the caller in errors.
pub fn with_f32s<const N: usize, R>(
    tensors: [&Tensor; N],
    what: &str,
    f: impl FnOnce([&[f32]; N]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let guards = tensors.map(|t| t.storage_and_layout());
    let mut slices: [&[f32]; N] = [&[]; N];
    for (slice, (guard, layout)) in slices.iter_mut().zip(&guards) {
        let candle_core::Storage::Cpu(cpu) = &**guard else {
            candle_core::bail!("{what}: expected a CPU tensor");
        };
        *slice = cpu_f32_slice(cpu, layout, what)?;
    }
    f(slices)
}

/// Whether `weight` is a frozen matrix the CPU ops here read: f32, or bf16 (widened to f32 as
/// they go; see [`frozen_product`]).
fn frozen_matrix_dtype(weight: &Tensor) -> bool {
    weight.device().is_cpu() && matches!(weight.dtype(), DType::F32 | DType::BF16)
}

/// Stored bf16 rows widened at a time: about 4 MB of f32, so that a block stays in cache
/// between its conversion and its use, and a vocabulary-sized head never exists in f32.
const WIDEN_BLOCK_ELEMS: usize = 1 << 20;

/// `dst[m, N] (+)= x[m, K] op(W)` for a frozen matrix `W` stored `d0 x d1` (row-major), where
/// `op(W)` is `W` (`K = d0`, `N = d1`) when `plain`, else `W^T` (`K = d1`, `N = d0`); `dst` is
/// `[m, N]` row-major and `accumulate` adds to what it holds. An f32 `W` is one product read in
/// place. A bf16 `W` (frozen weights kept in half the memory while the arithmetic stays f32)
/// is widened by [`crate::sgemm`] as it packs each panel (no f32 copy of `W` at all), or, on a
/// CPU without AVX2, a block of stored rows at a time into one reused buffer; each block is a
/// slice of `K` (its partial products summed into `dst`) or of `N` (its columns of `dst`).
pub fn frozen_product(
    weight: &Tensor,
    plain: bool,
    x: &[f32],
    m: usize,
    dst: &mut [f32],
    accumulate: bool,
    what: &str,
) -> candle_core::Result<()> {
    frozen_product_in_blocks(weight, plain, x, m, dst, accumulate, what, None)
}

/// [`frozen_product`]; `block_elems` `Some(n)` widens a bf16 `W` about `n` values at a time
/// (the fallback, forced by tests), `None` lets [`crate::sgemm`] widen it while packing where the
/// CPU allows, else blocks of [`WIDEN_BLOCK_ELEMS`].
#[allow(clippy::too_many_arguments)]
fn frozen_product_in_blocks(
    weight: &Tensor,
    plain: bool,
    x: &[f32],
    m: usize,
    dst: &mut [f32],
    accumulate: bool,
    what: &str,
    block_elems: Option<usize>,
) -> candle_core::Result<()> {
    let (d0, d1) = weight.dims2()?;
    let (k, n) = if plain { (d0, d1) } else { (d1, d0) };
    if x.len() != m * k || dst.len() != m * n {
        candle_core::bail!(
            "{what}: expected a [{m}, {k}] input and a [{m}, {n}] output for a {d0}x{d1} weight"
        );
    }
    // One block of rows [r0, r0 + rows) of W, as f32, into dst.
    let block = |r0: usize, rows: usize, w: &[f32], dst: &mut [f32]| {
        // SAFETY: w holds rows x d1 values; x is [m, k] and dst [m, n] (checked above); the
        // offsets r0 + rows <= d0 stay within x's K (plain) or dst's N (not plain).
        unsafe {
            if plain {
                gemm_f32(
                    (m, n, rows),
                    dst.as_mut_ptr(),
                    n,
                    accumulate || r0 > 0,
                    x.as_ptr().add(r0),
                    (k, 1),
                    w.as_ptr(),
                    (d1, 1),
                    1.0,
                    true,
                );
            } else {
                gemm_f32(
                    (m, rows, k),
                    dst.as_mut_ptr().add(r0),
                    n,
                    accumulate,
                    x.as_ptr(),
                    (k, 1),
                    w.as_ptr(),
                    (1, d1),
                    1.0,
                    true,
                );
            }
        }
    };
    if weight.dtype() == DType::F32 {
        return with_f32s([weight], what, |[w]| {
            block(0, d0, w, dst);
            Ok(())
        });
    }
    let (guard, layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(data)) = &*guard else {
        candle_core::bail!(
            "{what}: expected an f32 or bf16 CPU weight, found {:?}",
            weight.dtype()
        );
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous weight");
    };
    let data = &data[start..end];
    #[cfg(target_arch = "x86_64")]
    if block_elems.is_none() && crate::sgemm::available() {
        use crate::sgemm::{Operand, Rhs};
        // op(W) = W^T of a row-major [d0, d1] W reads its column j as W's row j.
        let (rs, cs) = if plain { (d1, 1) } else { (1, d1) };
        let b = Rhs::Bf16 {
            ptr: data.as_ptr(),
            rs,
            cs,
        };
        // SAFETY: x is [m, k] and dst [m, n] (checked above); W is d0 x d1 contiguous; the CPU
        // checked.
        unsafe {
            crate::sgemm::sgemm(
                (m, n, k),
                dst.as_mut_ptr(),
                n,
                accumulate,
                Operand {
                    ptr: x.as_ptr(),
                    rs: k,
                    cs: 1,
                },
                b,
                1.0,
                rayon::current_num_threads(),
            );
        }
        return Ok(());
    }
    let block_elems = block_elems.unwrap_or(WIDEN_BLOCK_ELEMS);
    let rows_per_block = (block_elems / d1.max(1)).clamp(1, d0.max(1));
    let mut buf = vec![0f32; rows_per_block * d1];
    let mut r0 = 0;
    while r0 < d0 {
        let rows = rows_per_block.min(d0 - r0);
        let w = &mut buf[..rows * d1];
        crate::vmath::widen_bf16(&data[r0 * d1..(r0 + rows) * d1], w);
        block(r0, rows, w, dst);
        r0 += rows;
    }
    Ok(())
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
    pub(crate) fn parts(&self) -> (&Tensor, Option<&Tensor>, bool) {
        (&self.weight, self.bias.as_ref(), self.transposed)
    }
}

/// `x W^T` (or `x W` for a weight stored `[in, out]`) against a frozen f32 weight on the CPU,
/// with a backward that returns the input gradient only. candle's matmul backward also computes
/// the gradient of the weight (a full `[out, in]` product and tensor per layer per step) even
/// when the weight is a plain, untracked tensor; for frozen base layers that is a third of the
/// backward's arithmetic and a weight-sized allocation kept to the end of the step, for nothing.
/// Returns `None` where it does not apply (other devices or dtypes, a tracked weight).
pub fn frozen_linear_forward(
    x: &Tensor,
    weight: &Tensor,
    transposed: bool,
) -> Result<Option<Tensor>> {
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || !frozen_matrix_dtype(weight)
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
        let x = cpu_f32_slice(storage, layout, self.name())?;
        let (d0, d1) = self.weight.dims2()?;
        // Stored [out, in] (d0 = out) unless transposed ([in, out]).
        let (out_f, in_f) = if self.transposed { (d1, d0) } else { (d0, d1) };
        let (k, n) = if self.input_grad {
            (out_f, in_f)
        } else {
            (in_f, out_f)
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&k) {
            candle_core::bail!(
                "frozen-linear: input's last dimension should be {k}, found {dims:?}"
            );
        }
        let m = x.len() / k.max(1);
        // op(W) is W^T for the forward of [out, in] storage and W for [in, out]; the input
        // gradient flips it.
        let plain = self.transposed != self.input_grad;
        let mut y = vec![0f32; m * n];
        frozen_product(&self.weight, plain, x, m, &mut y, false, self.name())?;
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty dims") = n;
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from(out),
        ))
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

/// `x W^T (+ bias) + scale * (x A^T) B^T` in one op on the CPU in f32: a frozen dense layer
/// plus a low-rank update (LoRA) with `A` `[r, in]` and `B` `[out, r]`, for a dense layer whose
/// weight is `[out, in]` (or `[in, out]` when `transposed`). The update is accumulated into the
/// base product's buffer, and the backward writes the input gradient of both paths into one
/// buffer (and skips it when the input needs none); the op chain kept four more tensors per
/// layer and added them up in separate passes. Gradients reach `A` and `B` (and `x`); the
/// frozen weight and bias get none. `None` where it does not apply (other devices or dtypes,
/// a tracked weight or bias, shapes that do not fit).
pub fn lowrank_linear_forward(
    x: &Tensor,
    layer: &DenseLinear,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Option<Tensor>> {
    let weight = &layer.weight;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    if !(cpu_f32(x) && frozen_matrix_dtype(weight) && cpu_f32(a) && cpu_f32(b))
        || weight.track_op()
        || layer
            .bias
            .as_ref()
            .is_some_and(|b| !cpu_f32(b) || b.track_op())
        || a.rank() != 2
        || b.rank() != 2
    {
        return Ok(None);
    }
    let (out_f, in_f) = (layer.out_features(), layer.in_features());
    let (r, a_in) = a.dims2()?;
    if a_in != in_f || b.dims() != [out_f, r] || x.dims().last() != Some(&in_f) {
        return Ok(None);
    }
    let op = LowRankLinear {
        weight: weight.contiguous()?,
        bias: layer.bias.as_ref().map(Tensor::contiguous).transpose()?,
        transposed: layer.transposed,
        scale: scale as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
}

/// `z * scale + bias * (1 - scale)`, `scale` and `bias` `[n]` over `z`'s last dimension `n`:
/// DoRA's rescaling of a layer's output (peft's `y + (scale - 1) (y - bias) + scale * lora`
/// with `z = y + lora`), the bias frozen. On the CPU in f32 it is one pass forward and one
/// backward (`dz = g * scale`, `dscale = sum over rows of g * (z - bias)`), where candle's
/// broadcast ops keep more tensors and reduce over the leading dimensions in separate passes.
pub fn scale_features(z: &Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let n = scale.dim(0)?;
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    let fits = cpu_f32(z)
        && cpu_f32(scale)
        && scale.rank() == 1
        && z.dims().last() == Some(&n)
        && bias.is_none_or(|b| cpu_f32(b) && !b.track_op() && b.dims() == [n]);
    if !fits {
        let mut out = z.broadcast_mul(scale)?;
        if let Some(b) = bias {
            out = out.broadcast_add(&(b.to_dtype(z.dtype())? * (1.0 - scale)?)?)?;
        }
        return Ok(out);
    }
    let op = ScaleFeatures {
        bias: bias.map(Tensor::contiguous).transpose()?,
    };
    Ok(z.contiguous()?.apply_op2(&scale.contiguous()?, op)?)
}

struct ScaleFeatures {
    bias: Option<Tensor>,
}

impl candle_core::CustomOp2 for ScaleFeatures {
    fn name(&self) -> &'static str {
        "scale-features"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (z, s) = (
            cpu_f32_slice(s1, l1, self.name())?,
            cpu_f32_slice(s2, l2, self.name())?,
        );
        let n = s.len().max(1);
        let offset: Vec<f32> = match &self.bias {
            Some(b) => with_f32s([b], self.name(), |[b]| {
                Ok(b.iter().zip(s).map(|(b, s)| b * (1.0 - s)).collect())
            })?,
            None => vec![0.0; s.len()],
        };
        let mut y = vec![0f32; z.len()];
        for (yr, zr) in y.chunks_mut(n).zip(z.chunks(n)) {
            for (((y, z), s), o) in yr.iter_mut().zip(zr).zip(s).zip(&offset) {
                *y = z * s + o;
            }
        }
        Ok((candle_core::CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        z_t: &Tensor,
        s_t: &Tensor,
        _y: &Tensor,
        g_t: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g_t = g_t.contiguous()?;
        let n = s_t.dim(0)?;
        let want_dz = z_t.track_op();
        let bias = match &self.bias {
            Some(b) => b.to_vec1::<f32>()?,
            None => vec![0.0; n],
        };
        let mut dz = vec![0f32; if want_dz { z_t.elem_count() } else { 0 }];
        let mut ds = vec![0f32; n];
        with_f32s([&g_t, z_t, s_t], self.name(), |[g, z, s]| {
            for (i, (gr, zr)) in g.chunks(n.max(1)).zip(z.chunks(n.max(1))).enumerate() {
                for (((d, g), z), b) in ds.iter_mut().zip(gr).zip(zr).zip(&bias) {
                    *d += g * (z - b);
                }
                if want_dz {
                    let row = &mut dz[i * n..(i + 1) * n];
                    for ((d, g), s) in row.iter_mut().zip(gr).zip(s) {
                        *d = g * s;
                    }
                }
            }
            Ok(())
        })?;
        let dev = g_t.device();
        let dz = want_dz
            .then(|| Tensor::from_vec(dz, z_t.shape(), dev))
            .transpose()?;
        Ok((dz, Some(Tensor::from_vec(ds, n, dev)?)))
    }
}

struct LowRankLinear {
    weight: Tensor,
    bias: Option<Tensor>,
    transposed: bool,
    scale: f32,
}

impl LowRankLinear {
    /// (out, in) of the base layer.
    fn base_dims(&self) -> candle_core::Result<(usize, usize)> {
        let (d0, d1) = self.weight.dims2()?;
        Ok(if self.transposed { (d1, d0) } else { (d0, d1) })
    }
}

impl candle_core::CustomOp3 for LowRankLinear {
    fn name(&self) -> &'static str {
        "lowrank-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let (x, a, b) = (
            cpu_f32_slice(s1, l1, self.name())?,
            cpu_f32_slice(s2, l2, self.name())?,
            cpu_f32_slice(s3, l3, self.name())?,
        );
        let (out_f, in_f) = self.base_dims()?;
        let r = a.len() / in_f.max(1);
        let m = x.len() / in_f.max(1);
        let mut y = vec![0f32; m * out_f];
        let mut h = vec![0f32; m * r];
        let has_bias = match &self.bias {
            Some(bias) => with_f32s([bias], self.name(), |[bv]| {
                y.chunks_mut(out_f.max(1))
                    .for_each(|row| row.copy_from_slice(bv));
                Ok(true)
            })?,
            None => false,
        };
        // y (+)= x W^T (x W for [in, out] storage)
        frozen_product(
            &self.weight,
            self.transposed,
            x,
            m,
            &mut y,
            has_bias,
            self.name(),
        )?;
        // SAFETY: x [m, in], A [r, in], B [out, r]; y [m, out] and h [m, r] are this call's
        // buffers.
        unsafe {
            gemm_f32(
                (m, r, in_f),
                h.as_mut_ptr(),
                r,
                false,
                x.as_ptr(),
                (in_f, 1),
                a.as_ptr(),
                (1, in_f),
                self.scale,
                true,
            );
            gemm_f32(
                (m, out_f, r),
                y.as_mut_ptr(),
                out_f,
                true,
                h.as_ptr(),
                (r, 1),
                b.as_ptr(),
                (1, r),
                1.0,
                true,
            );
        }
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("non-empty dims") = out_f;
        Ok((
            candle_core::CpuStorage::F32(y),
            candle_core::Shape::from(dims),
        ))
    }

    fn bwd(
        &self,
        x_t: &Tensor,
        a_t: &Tensor,
        b_t: &Tensor,
        _y: &Tensor,
        g_t: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g_t = g_t.contiguous()?;
        let (out_f, in_f) = self.base_dims()?;
        let r = a_t.dim(0)?;
        let m = x_t.elem_count() / in_f.max(1);
        let want_dx = x_t.track_op();
        let mut gb = vec![0f32; m * r];
        let mut h = vec![0f32; m * r];
        let mut dx = vec![0f32; if want_dx { m * in_f } else { 0 }];
        let mut da = vec![0f32; r * in_f];
        let mut db = vec![0f32; out_f * r];
        with_f32s([&g_t, x_t, a_t, b_t], self.name(), |[g, x, a, b]| {
            if want_dx {
                // dx = g W (g W^T for [in, out] storage), then + scale * gb A below
                frozen_product(
                    &self.weight,
                    !self.transposed,
                    g,
                    m,
                    &mut dx,
                    false,
                    self.name(),
                )?;
            }
            // SAFETY: g [m, out], x [m, in], A [r, in], B [out, r]; every destination is one
            // of this call's buffers with the stated shape.
            unsafe {
                // gb = g B
                gemm_f32(
                    (m, r, out_f),
                    gb.as_mut_ptr(),
                    r,
                    false,
                    g.as_ptr(),
                    (out_f, 1),
                    b.as_ptr(),
                    (r, 1),
                    1.0,
                    true,
                );
                if want_dx {
                    gemm_f32(
                        (m, in_f, r),
                        dx.as_mut_ptr(),
                        in_f,
                        true,
                        gb.as_ptr(),
                        (r, 1),
                        a.as_ptr(),
                        (in_f, 1),
                        self.scale,
                        true,
                    );
                }
                // h = scale * x A^T; dB = g^T h; dA = scale * gb^T x
                gemm_f32(
                    (m, r, in_f),
                    h.as_mut_ptr(),
                    r,
                    false,
                    x.as_ptr(),
                    (in_f, 1),
                    a.as_ptr(),
                    (1, in_f),
                    self.scale,
                    true,
                );
                gemm_f32(
                    (out_f, r, m),
                    db.as_mut_ptr(),
                    r,
                    false,
                    g.as_ptr(),
                    (1, out_f),
                    h.as_ptr(),
                    (r, 1),
                    1.0,
                    true,
                );
                gemm_f32(
                    (r, in_f, m),
                    da.as_mut_ptr(),
                    in_f,
                    false,
                    gb.as_ptr(),
                    (1, r),
                    x.as_ptr(),
                    (in_f, 1),
                    self.scale,
                    true,
                );
            }
            Ok(())
        })?;
        let dev = x_t.device();
        Ok((
            if want_dx {
                Some(Tensor::from_vec(dx, x_t.shape(), dev)?)
            } else {
                None
            },
            Some(Tensor::from_vec(da, a_t.shape(), dev)?),
            Some(Tensor::from_vec(db, b_t.shape(), dev)?),
        ))
    }
}

impl LinearLike for DenseLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match frozen_linear_forward(x, &self.weight, self.transposed)? {
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

#[cfg(test)]
mod frozen_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
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
            let d = max_diff(
                gf.get(x.as_tensor()).expect("grad"),
                gs.get(x.as_tensor()).expect("grad"),
            );
            assert!(
                d < 1e-5,
                "input gradient differs by {d} (transposed {transposed})"
            );
        }
        let tracked = Var::from_tensor(&Tensor::randn(0f32, 1.0, (7, 12), &dev)?)?;
        assert!(frozen_linear_forward(x.as_tensor(), tracked.as_tensor(), false)?.is_none());
        Ok(())
    }

    /// A bf16 weight under f32 activations: the ops compute in f32 on the widened weight, the
    /// same numbers as an f32 weight holding the bf16 values, whatever the block size (blocks
    /// that split K, that split N, ragged last blocks, or none: `sgemm` widening as it packs),
    /// with and without accumulation.
    #[test]
    fn bf16_weights_compute_as_their_f32_values() -> Result<()> {
        let dev = Device::Cpu;
        let (m, d0, d1) = (6, 13, 9);
        let w16 = Tensor::randn(0f32, 1.0, (d0, d1), &dev)?.to_dtype(DType::BF16)?;
        let w32 = w16.to_dtype(DType::F32)?;
        for plain in [false, true] {
            let (k, n) = if plain { (d0, d1) } else { (d1, d0) };
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
                .collect();
            let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
            for accumulate in [false, true] {
                let mut want = start.clone();
                frozen_product_in_blocks(
                    &w32,
                    plain,
                    &x,
                    m,
                    &mut want,
                    accumulate,
                    "test",
                    Some(1 << 20),
                )?;
                for block in [1, d1, 2 * d1 + 3, 5 * d1, 1 << 20] {
                    let mut got = start.clone();
                    frozen_product_in_blocks(
                        &w16,
                        plain,
                        &x,
                        m,
                        &mut got,
                        accumulate,
                        "test",
                        Some(block),
                    )?;
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        d < 1e-5,
                        "plain {plain} accumulate {accumulate} block {block}: {d}"
                    );
                }
                // The path frozen_product takes (on AVX2 CPUs, widening while packing).
                let mut got = start.clone();
                frozen_product(&w16, plain, &x, m, &mut got, accumulate, "test")?;
                let d = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0f32, f32::max);
                assert!(
                    d < 1e-5,
                    "plain {plain} accumulate {accumulate} frozen_product: {d}"
                );
            }
        }
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, d1), &dev)?)?;
        let (a, b) = (
            Tensor::randn(0f32, 1.0, (2, d1), &dev)?,
            Tensor::randn(0f32, 1.0, (d0, 2), &dev)?,
        );
        let probe = Tensor::randn(0f32, 1.0, (2, 3, d0), &dev)?;
        let (l16, l32) = (DenseLinear::new(w16, None)?, DenseLinear::new(w32, None)?);
        let pairs = [
            (l16.forward(x.as_tensor())?, l32.forward(x.as_tensor())?),
            (
                lowrank_linear_forward(x.as_tensor(), &l16, &a, &b, 0.5)?.expect("applies"),
                lowrank_linear_forward(x.as_tensor(), &l32, &a, &b, 0.5)?.expect("applies"),
            ),
        ];
        for (y16, y32) in pairs {
            assert_eq!(y16.dtype(), DType::F32);
            assert!(max_diff(&y16, &y32) < 1e-5);
            let g16 = (y16 * &probe)?.sum_all()?.backward()?;
            let g32 = (y32 * &probe)?.sum_all()?.backward()?;
            assert!(
                max_diff(
                    g16.get(x.as_tensor()).expect("grad"),
                    g32.get(x.as_tensor()).expect("grad")
                ) < 1e-5
            );
        }
        Ok(())
    }

    /// The fused dense + low-rank op equals base-then-LoRA in both weight layouts, with and
    /// without bias, with the same gradients for the input, A and B; an untracked input gets
    /// no input gradient computed.
    #[test]
    fn lowrank_linear_equals_the_op_chain_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (inp, out, r, scale) = (12, 7, 3, 2.5);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, inp), &dev)?)?;
        let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (r, inp), &dev)?)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (out, r), &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 5, out), &dev)?;
        for (transposed, bias) in [(false, false), (false, true), (true, true)] {
            let shape = if transposed { (inp, out) } else { (out, inp) };
            let w = Tensor::randn(0f32, 1.0, shape, &dev)?;
            let bias = if bias {
                Some(Tensor::randn(0f32, 1.0, out, &dev)?)
            } else {
                None
            };
            let layer = DenseLinear::build(w, bias, transposed)?;
            let fused =
                lowrank_linear_forward(x.as_tensor(), &layer, a.as_tensor(), b.as_tensor(), scale)?
                    .expect("applies");
            let h = (linear_forward(x.as_tensor(), a.as_tensor(), false)? * scale)?;
            let chain =
                (layer.forward(x.as_tensor())? + linear_forward(&h, b.as_tensor(), false)?)?;
            // The two sum in different orders: f32 rounding relative to the outputs' magnitude
            // (random values up to ~30 here; an absolute 1e-5 failed once at 1.1e-5).
            let magnitude = chain.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let d = max_diff(&fused, &chain);
            assert!(
                d < 4e-6 * magnitude,
                "outputs differ by {d} (largest |output| {magnitude})"
            );
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (chain * &probe)?.sum_all()?.backward()?;
            for v in [&x, &a, &b] {
                let d = max_diff(
                    gf.get(v.as_tensor()).expect("grad"),
                    gc.get(v.as_tensor()).expect("grad"),
                );
                assert!(
                    d < 1e-4,
                    "gradient differs by {d} (transposed {transposed})"
                );
            }
        }
        let frozen_x = x.as_tensor().detach();
        let layer = DenseLinear::new(Tensor::randn(0f32, 1.0, (out, inp), &dev)?, None)?;
        let y = lowrank_linear_forward(&frozen_x, &layer, a.as_tensor(), b.as_tensor(), scale)?
            .expect("applies");
        let g = y.sum_all()?.backward()?;
        assert!(
            g.get(&frozen_x).is_none()
                && g.get(a.as_tensor()).is_some()
                && g.get(b.as_tensor()).is_some()
        );
        Ok(())
    }
}
