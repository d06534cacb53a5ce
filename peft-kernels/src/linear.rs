//! Dense-layer kernels: the matmul against a frozen weight whose backward gives the input
//! gradient only, and DoRA's per-feature rescaling in one pass.

use candle_core::{Result, Tensor};

use crate::cpu::fused_f32;
use crate::gemm::{frozen_product, is_frozen_cpu_matrix};
use crate::view::{cpu_f32_slice, with_f32s};

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
    if !(fused_f32(&[x]) && is_frozen_cpu_matrix(weight)) {
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

/// `x [m, k] @ rhs [k, n]` on any device, where `rhs` is frozen (a plain tensor that tracks no
/// gradient): the portable path's counterpart of [`frozen_linear_forward`]. candle's matmul
/// backward computes and keeps a gradient for the frozen operand too (a weight-sized tensor per
/// layer per step, on the GPU as on the CPU, and a third of the backward's arithmetic); this
/// op's backward computes `g rhs^T` for `x` only. Where `x` tracks nothing or `rhs` is
/// trainable it is candle's matmul.
pub fn frozen_matmul(x: &Tensor, rhs: &Tensor) -> Result<Tensor> {
    if !x.track_op() || rhs.track_op() || x.rank() != 2 || rhs.rank() != 2 {
        return x.matmul(rhs);
    }
    let (_, k) = x.dims2()?;
    let (k2, _) = rhs.dims2()?;
    if k != k2 || x.dtype() != rhs.dtype() || !x.device().same_device(rhs.device()) {
        // candle's matmul reports the mismatch.
        return x.matmul(rhs);
    }
    x.apply_op1(FrozenRhsMatmul { rhs: rhs.clone() })
}

struct FrozenRhsMatmul {
    rhs: Tensor,
}

impl FrozenRhsMatmul {
    fn fwd<S: candle_core::backend::BackendStorage>(
        &self,
        x: &S,
        xl: &candle_core::Layout,
        pick: impl Fn(&candle_core::Storage) -> Option<&S>,
    ) -> Result<(S, candle_core::Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (_, n) = self.rhs.dims2()?;
        let (storage, rl) = self.rhs.storage_and_layout();
        let w = pick(&storage).ok_or_else(|| {
            candle_core::Error::Msg("frozen-matmul: the weight is on another device".into())
        })?;
        let y = x.matmul(w, (1, m, n, k), xl, rl)?;
        Ok((y, candle_core::Shape::from((m, n))))
    }
}

impl candle_core::CustomOp1 for FrozenRhsMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        self.fwd(storage, layout, |s| match s {
            candle_core::Storage::Cpu(w) => Some(w),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        storage: &candle_core::CudaStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::CudaStorage, candle_core::Shape)> {
        self.fwd(storage, layout, |s| match s {
            candle_core::Storage::Cuda(w) => Some(w),
            _ => None,
        })
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        storage: &candle_core::MetalStorage,
        layout: &candle_core::Layout,
    ) -> Result<(candle_core::MetalStorage, candle_core::Shape)> {
        self.fwd(storage, layout, |s| match s {
            candle_core::Storage::Metal(w) => Some(w),
            _ => None,
        })
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.rhs.t()?)?))
    }
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

/// `z * scale + bias * (1 - scale)`, `scale` and `bias` `[n]` over `z`'s last dimension `n`:
/// DoRA's rescaling of a layer's output (peft's `y + (scale - 1) (y - bias) + scale * lora`
/// with `z = y + lora`), the bias frozen. On the CPU in f32 it is one pass forward and one
/// backward (`dz = g * scale`, `dscale = sum over rows of g * (z - bias)`), where candle's
/// broadcast ops keep more tensors and reduce over the leading dimensions in separate passes.
pub fn scale_features(z: &Tensor, scale: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let n = scale.dim(0)?;
    let fits = fused_f32(&[z, scale])
        && scale.rank() == 1
        && z.dims().last() == Some(&n)
        && bias.is_none_or(|b| fused_f32(&[b]) && !b.track_op() && b.dims() == [n]);
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
    z.contiguous()?.apply_op2(&scale.contiguous()?, op)
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{with_mode, KernelMode};
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

    /// The portable frozen matmul equals candle's matmul in value and input gradient, and the
    /// backward pass holds no gradient for the frozen operand (candle's matmul keeps one).
    #[test]
    fn frozen_matmul_gives_the_input_gradient_only() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (6, 12), &dev)?)?;
        let w = Tensor::randn(0f32, 1.0, (7, 12), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (6, 7), &dev)?;
        for rhs in [w.t()?, w.t()?.contiguous()?] {
            let a = frozen_matmul(x.as_tensor(), &rhs)?;
            let b = x.as_tensor().matmul(&rhs)?;
            assert!(max_diff(&a, &b) < 1e-6);
            let ga = (&a * &probe)?.sum_all()?.backward()?;
            let gb = (&b * &probe)?.sum_all()?.backward()?;
            let (dx_a, dx_b) = (ga.get(&x).expect("x grad"), gb.get(&x).expect("x grad"));
            assert!(max_diff(dx_a, dx_b) < 1e-5);
            assert!(
                ga.get(&rhs).is_none(),
                "no gradient kept for the frozen weight"
            );
            assert!(
                gb.get(&rhs).is_some(),
                "candle's matmul keeps one for the weight"
            );
        }
        // A trainable right-hand side is candle's matmul (its gradient is needed).
        let wv = Var::from_tensor(&w.t()?)?;
        let g = frozen_matmul(x.as_tensor(), wv.as_tensor())?
            .sum_all()?
            .backward()?;
        assert!(g.get(&wv).is_some());
        Ok(())
    }

    /// The frozen-weight op equals the matmul, in both weight layouts, with the same input
    /// gradient; a tracked weight is left to candle (its gradient is needed).
    #[test]
    fn frozen_linear_equals_matmul_and_gives_input_gradients() -> Result<()> {
        with_mode(KernelMode::Fused, || -> Result<()> {
            let dev = Device::Cpu;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 12), &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (2, 5, 7), &dev)?;
            for transposed in [false, true] {
                let shape = if transposed { (12, 7) } else { (7, 12) };
                let w = Tensor::randn(0f32, 1.0, shape, &dev)?;
                let fast = frozen_linear_forward(x.as_tensor(), &w, transposed)?.expect("applies");
                let slow = if transposed {
                    x.as_tensor().broadcast_matmul(&w)?
                } else {
                    x.as_tensor().broadcast_matmul(&w.t()?)?
                };
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
        })
    }
}
