//! Fused CPU ops with their own backward, for the hot spots of a training step: the softmax of
//! attention scores and RMS norm. Each replaces a chain of generic candle ops (and the
//! tensors that chain allocates and keeps for its backward) by one pass over the rows, and
//! keeps full gradients (candle's own fused versions drop them). Each returns `None` where it
//! does not apply (other devices and dtypes, the portable mode): the callers (`peft-models`'
//! ops) then take the op chains.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::cpu::fused_f32;
use crate::view::{cpu_f32_slice, with_f32s};

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// Softmax over the last dimension of an f32 CPU tensor, with its backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Option<Tensor>> {
    if !fused_f32(&[x]) || x.rank() == 0 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op1(Softmax)?))
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(s, l, self.name())?;
        let d = last_dim(l);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, r)| {
                o.copy_from_slice(r);
                let (max, sum) = crate::vmath::exp_minus_max(o);
                if max == f32::NEG_INFINITY {
                    // A fully masked row: candle's chain gives NaN here too; keep zeros instead
                    // of NaN only where every entry is -inf (callers zero such rows anyway).
                    o.fill(0.0);
                    return;
                }
                let inv = 1.0 / sum;
                for oi in o.iter_mut() {
                    *oi *= inv;
                }
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

/// `dx = y * (g - sum(g * y))` row by row.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (
            cpu_f32_slice(s1, l1, self.name())?,
            cpu_f32_slice(s2, l2, self.name())?,
        );
        let d = last_dim(l1);
        let mut out = vec![0f32; y.len()];
        out.par_chunks_mut(d)
            .zip(y.par_chunks(d).zip(g.par_chunks(d)))
            .for_each(|(o, (yr, gr))| {
                let dot: f32 = yr.iter().zip(gr).map(|(a, b)| a * b).sum();
                for ((oi, &yi), &gi) in o.iter_mut().zip(yr).zip(gr) {
                    *oi = yi * (gi - dot);
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// HF `LlamaRMSNorm` on f32 tensors: `x / sqrt(mean(x^2) + eps) * weight`, gradients for both.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    if !fused_f32(&[x, weight]) {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(
        &weight.contiguous()?,
        RmsNorm { eps: eps as f32 },
    )?))
}

struct RmsNorm {
    eps: f32,
}

impl RmsNorm {
    fn inv_rms(&self, r: &[f32]) -> f32 {
        let ms = r.iter().map(|v| v * v).sum::<f32>() / r.len() as f32;
        1.0 / (ms + self.eps).sqrt()
    }
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            cpu_f32_slice(s1, l1, self.name())?,
            cpu_f32_slice(s2, l2, self.name())?,
        );
        let d = last_dim(l1);
        if w.len() != d {
            candle_core::bail!("{}: weight of {} for rows of {d}", self.name(), w.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .for_each(|(o, r)| {
                let inv = self.inv_rms(r);
                for ((oi, &xi), &wi) in o.iter_mut().zip(r).zip(w) {
                    *oi = xi * inv * wi;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        // A frozen norm weight (the usual case under PEFT) gets no gradient.
        let want_dw = w.track_op();
        let g = g.contiguous()?;
        let (dx, dw) = with_f32s([x, w, &g], "rms-norm backward", |[xv, wv, gv]| {
            let mut dx = vec![0f32; xv.len()];
            let dw_parts: Vec<Vec<f32>> = dx
                .par_chunks_mut(d)
                .zip(xv.par_chunks(d).zip(gv.par_chunks(d)))
                .fold(
                    || if want_dw { vec![0f32; d] } else { Vec::new() },
                    |mut dw, (o, (r, gr))| {
                        let inv = self.inv_rms(r);
                        // n = x * inv; gw = g * w; dx = inv * (gw - n * mean(gw * n)); dw += g * n.
                        let mean: f32 = r
                            .iter()
                            .zip(gr)
                            .zip(wv)
                            .map(|((xi, gi), wi)| gi * wi * xi * inv)
                            .sum::<f32>()
                            / d as f32;
                        for (j, oi) in o.iter_mut().enumerate() {
                            *oi = inv * (gr[j] * wv[j] - r[j] * inv * mean);
                        }
                        for (j, dwj) in dw.iter_mut().enumerate() {
                            *dwj += gr[j] * r[j] * inv;
                        }
                        dw
                    },
                )
                .collect();
            let dw = want_dw.then(|| {
                let mut dw = vec![0f32; d];
                for part in dw_parts {
                    for (a, b) in dw.iter_mut().zip(part) {
                        *a += b;
                    }
                }
                dw
            });
            Ok((dx, dw))
        })?;
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            dw.map(|dw| Tensor::from_vec(dw, w.shape(), w.device()))
                .transpose()?,
        ))
    }
}

/// Batched matmul `a @ b` over the leading dimensions of contiguous f32 tensors
/// (`[.., m, k] x [.., k, n]`), the batches spread over threads and each product run on one
/// thread: attention's per-head products are too small to split (candle runs the batches one
/// after another, each split across all threads). Backward through the same op with the
/// operands read transposed (no copies). `None` elsewhere (the caller runs candle's matmul).
pub fn batched_matmul(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    fused_bmm(a, b, false)
}

/// Batched `a @ b^T` for `a` `[.., m, k]` and `b` `[.., n, k]` (attention scores `q k^T`)
/// without copying the transpose; see [`batched_matmul`].
pub fn batched_matmul_nt(a: &Tensor, b: &Tensor) -> Result<Option<Tensor>> {
    fused_bmm(a, b, true)
}

/// `a @ op(b)` through [`Bmm`] (`op` the transpose when `tb`) where the fused kernels apply:
/// f32 CPU tensors of rank 3 or more with the same leading dimensions.
fn fused_bmm(a: &Tensor, b: &Tensor, tb: bool) -> Result<Option<Tensor>> {
    let (ad, bd) = (a.dims(), b.dims());
    if !fused_f32(&[a, b])
        || ad.len() < 3
        || ad.len() != bd.len()
        || ad[..ad.len() - 2] != bd[..bd.len() - 2]
    {
        return Ok(None);
    }
    Ok(Some(
        a.contiguous()?
            .apply_op2(&b.contiguous()?, Bmm { ta: false, tb })?,
    ))
}

/// `op(a) @ op(b)` per batch, where `op` transposes the last two dimensions when asked.
struct Bmm {
    ta: bool,
    tb: bool,
}

impl Bmm {
    /// (batches, m, k, n) of `op(a) @ op(b)`.
    fn dims(&self, la: &Layout, lb: &Layout) -> Result<(usize, usize, usize, usize)> {
        let (ad, bd) = (la.shape().dims(), lb.shape().dims());
        let r = ad.len();
        let batches: usize = ad[..r - 2].iter().product();
        let (m, k) = if self.ta {
            (ad[r - 1], ad[r - 2])
        } else {
            (ad[r - 2], ad[r - 1])
        };
        let (k2, n) = if self.tb {
            (bd[r - 1], bd[r - 2])
        } else {
            (bd[r - 2], bd[r - 1])
        };
        if k != k2 || bd.len() != r || bd[..r - 2].iter().product::<usize>() != batches {
            candle_core::bail!("fused-bmm: shapes {ad:?} and {bd:?} do not multiply");
        }
        Ok((batches, m, k, n))
    }
}

impl CustomOp2 for Bmm {
    fn name(&self) -> &'static str {
        "fused-bmm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, b) = (
            cpu_f32_slice(s1, l1, self.name())?,
            cpu_f32_slice(s2, l2, self.name())?,
        );
        let (batches, m, k, n) = self.dims(l1, l2)?;
        let mut out = vec![0f32; batches * m * n];
        // Strides of op(a) [m, k] and op(b) [k, n] inside one batch.
        let (a_rs, a_cs) = if self.ta { (1, m) } else { (k, 1) };
        let (b_rs, b_cs) = if self.tb { (1, k) } else { (n, 1) };
        if m * n > 0 {
            out.par_chunks_mut(m * n).enumerate().for_each(|(i, o)| {
                let (pa, pb) = (
                    &a[i * m * k..(i + 1) * m * k],
                    &b[i * k * n..(i + 1) * k * n],
                );
                // SAFETY: the slices hold exactly one batch of each operand and of the result,
                // and the strides describe those extents.
                unsafe {
                    crate::gemm::gemm_f32(
                        (m, n, k),
                        o.as_mut_ptr(),
                        n,
                        false,
                        pa.as_ptr(),
                        (a_rs, a_cs),
                        pb.as_ptr(),
                        (b_rs, b_cs),
                        1.0,
                        false,
                    );
                }
            });
        }
        let mut shape = l1.shape().dims().to_vec();
        let r = shape.len();
        shape[r - 2] = m;
        shape[r - 1] = n;
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _c: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = g.contiguous()?;
        // c = op(a) op(b): d op(a) = g op(b)^T, d op(b) = op(a)^T g; transpose back when the
        // operand itself was read transposed.
        let da = if self.ta {
            b.apply_op2_no_bwd(
                &g,
                &Bmm {
                    ta: self.tb,
                    tb: true,
                },
            )?
        } else {
            g.apply_op2_no_bwd(
                b,
                &Bmm {
                    ta: false,
                    tb: !self.tb,
                },
            )?
        };
        let db = if self.tb {
            g.apply_op2_no_bwd(
                a,
                &Bmm {
                    ta: true,
                    tb: self.ta,
                },
            )?
        } else {
            a.apply_op2_no_bwd(
                &g,
                &Bmm {
                    ta: !self.ta,
                    tb: false,
                },
            )?
        };
        Ok((Some(da), Some(db)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{with_mode, KernelMode};
    use candle_core::{Device, Var, D};

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

    #[test]
    fn fused_ops_equal_the_op_chains_with_gradients() -> Result<()> {
        with_mode(KernelMode::Fused, || -> Result<()> {
            let dev = Device::Cpu;
            let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)?)?;
            let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)?;

            let fused = softmax_last_dim(x.as_tensor())?.unwrap();
            let chain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
            assert!(max_diff(&fused, &chain) < 1e-6);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (chain * &probe)?.sum_all()?.backward()?;
            assert!(
                max_diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gc.get(x.as_tensor()).unwrap()
                ) < 1e-5
            );

            let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)?.unwrap();
            let x32 = x.as_tensor();
            let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
            let chain = x32
                .broadcast_mul(&(var + 1e-6)?.sqrt()?.recip()?)?
                .broadcast_mul(w.as_tensor())?;
            assert!(max_diff(&fused, &chain) < 1e-5);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gc = (chain * &probe)?.sum_all()?.backward()?;
            for v in [&x, &w] {
                let d = max_diff(
                    gf.get(v.as_tensor()).unwrap(),
                    gc.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-4, "rms norm gradient differs by {d}");
            }
            // A frozen weight: the same input gradient, none for the weight.
            let frozen = w.as_tensor().detach();
            let fused = rms_norm(x.as_tensor(), &frozen, 1e-6)?.unwrap();
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            assert!(
                max_diff(
                    gf.get(x.as_tensor()).unwrap(),
                    gc.get(x.as_tensor()).unwrap()
                ) < 1e-4
            );
            assert!(
                gf.get(&frozen).is_none(),
                "a frozen norm weight got a gradient"
            );
            Ok(())
        })
    }

    #[test]
    fn batched_matmul_equals_matmul_with_gradients() -> Result<()> {
        with_mode(KernelMode::Fused, || -> Result<()> {
            let dev = Device::Cpu;
            let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 7), &dev)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 7, 4), &dev)?)?;
            let probe = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev)?;
            let fused = batched_matmul(a.as_tensor(), b.as_tensor())?.unwrap();
            let plain = a.as_tensor().matmul(b.as_tensor())?;
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gp = (plain * &probe)?.sum_all()?.backward()?;
            for v in [&a, &b] {
                let d = max_diff(
                    gf.get(v.as_tensor()).unwrap(),
                    gp.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "bmm gradient differs by {d}");
            }
            // a @ k^T read transposed, gradients included.
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 4, 7), &dev)?)?;
            let fused = batched_matmul_nt(a.as_tensor(), k.as_tensor())?.unwrap();
            let plain = a.as_tensor().matmul(&k.as_tensor().t()?)?;
            assert!(max_diff(&fused, &plain) < 1e-5);
            let gf = (fused * &probe)?.sum_all()?.backward()?;
            let gp = (plain * &probe)?.sum_all()?.backward()?;
            for v in [&a, &k] {
                let d = max_diff(
                    gf.get(v.as_tensor()).unwrap(),
                    gp.get(v.as_tensor()).unwrap(),
                );
                assert!(d < 1e-5, "bmm_nt gradient differs by {d}");
            }
            Ok(())
        })
    }
}
