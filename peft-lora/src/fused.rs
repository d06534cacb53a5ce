//! LoRA's fused CPU op: a frozen dense layer plus its low-rank update, forward and backward in
//! one op each (the portable path is the op chain in `layer`).

use candle_core::Tensor;
use peft_core::{DenseLinear, LinearLike, Result};
use peft_kernels::fused_f32;
use peft_kernels::gemm::{frozen_product, gemm_f32, is_frozen_cpu_matrix};
use peft_kernels::view::{cpu_f32_slice, with_f32s};

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
    let (weight, bias, transposed) = layer.parts();
    if !(fused_f32(&[x, a, b]) && is_frozen_cpu_matrix(weight))
        || bias.is_some_and(|b| !fused_f32(&[b]) || b.track_op())
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
        bias: bias.map(Tensor::contiguous).transpose()?,
        transposed,
        scale: scale as f32,
    };
    Ok(Some(x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        op,
    )?))
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};
    use peft_core::layers::linear_forward;
    use peft_kernels::{with_mode, KernelMode};

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

    /// A bf16 base weight under f32 activations: the fused op computes as on the f32 weight
    /// holding the bf16 values, outputs and input gradients.
    #[test]
    fn bf16_weights_compute_as_their_f32_values() -> Result<()> {
        with_mode(KernelMode::Fused, || -> Result<()> {
            let dev = Device::Cpu;
            let (d0, d1) = (13, 9);
            let w16 = Tensor::randn(0f32, 1.0, (d0, d1), &dev)?.to_dtype(DType::BF16)?;
            let w32 = w16.to_dtype(DType::F32)?;
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
        })
    }

    /// The fused dense + low-rank op equals base-then-LoRA in both weight layouts, with and
    /// without bias, with the same gradients for the input, A and B; an untracked input gets
    /// no input gradient computed.
    #[test]
    fn lowrank_linear_equals_the_op_chain_with_gradients() -> Result<()> {
        with_mode(KernelMode::Fused, || -> Result<()> {
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
                let layer = if transposed {
                    DenseLinear::new_transposed(w, bias)?
                } else {
                    DenseLinear::new(w, bias)?
                };
                let fused = lowrank_linear_forward(
                    x.as_tensor(),
                    &layer,
                    a.as_tensor(),
                    b.as_tensor(),
                    scale,
                )?
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
        })
    }
}
