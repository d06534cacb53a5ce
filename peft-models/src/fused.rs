//! Fused CPU ops with their own backward, for the hot spots of a training step: the softmax of
//! attention scores and RMS norm. Each replaces a chain of generic candle ops (and the
//! tensors that chain allocates and keeps for its backward) by one pass over the rows, and
//! keeps full gradients (candle's own fused versions drop them). Other devices and dtypes use
//! the op chains.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Tensor, D};
use peft_core::Result;
use rayon::prelude::*;

fn rows<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> candle_core::Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("{op}: expected f32");
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: expected a contiguous tensor"),
    }
}

fn last_dim(l: &Layout) -> usize {
    l.shape().dims().last().copied().unwrap_or(1).max(1)
}

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(candle_nn::ops::softmax(x, D::Minus1)?);
    }
    Ok(x.contiguous()?.apply_op1(Softmax)?)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = rows(s, l, self.name())?;
        let d = last_dim(l);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
            let max = r.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            if max == f32::NEG_INFINITY {
                // A fully masked row: candle's chain gives NaN here too; keep zeros instead
                // of NaN only where every entry is -inf (callers zero such rows anyway).
                return;
            }
            let mut sum = 0f32;
            for (oi, &v) in o.iter_mut().zip(r) {
                *oi = (v - max).exp();
                sum += *oi;
            }
            let inv = 1.0 / sum;
            for oi in o.iter_mut() {
                *oi *= inv;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> candle_core::Result<Option<Tensor>> {
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
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (y, g) = (rows(s1, l1, self.name())?, rows(s2, l2, self.name())?);
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
    if !x.device().is_cpu() || x.dtype() != DType::F32 || weight.dtype() != DType::F32 {
        return Ok(None);
    }
    Ok(Some(x.contiguous()?.apply_op2(&weight.contiguous()?, RmsNorm { eps: eps as f32 })?))
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
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (rows(s1, l1, self.name())?, rows(s2, l2, self.name())?);
        let d = last_dim(l1);
        if w.len() != d {
            candle_core::bail!("{}: weight of {} for rows of {d}", self.name(), w.len());
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d).zip(x.par_chunks(d)).for_each(|(o, r)| {
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
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let (xv, wv) = (x.flatten_all()?.to_vec1::<f32>()?, w.flatten_all()?.to_vec1::<f32>()?);
        let gv = g.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let mut dx = vec![0f32; xv.len()];
        let dw_parts: Vec<Vec<f32>> = dx
            .par_chunks_mut(d)
            .zip(xv.par_chunks(d).zip(gv.par_chunks(d)))
            .fold(
                || vec![0f32; d],
                |mut dw, (o, (r, gr))| {
                    let inv = self.inv_rms(r);
                    // n = x * inv; gw = g * w; dx = inv * (gw - n * mean(gw * n)); dw += g * n.
                    let mean: f32 = r
                        .iter()
                        .zip(gr)
                        .zip(&wv)
                        .map(|((xi, gi), wi)| gi * wi * xi * inv)
                        .sum::<f32>()
                        / d as f32;
                    for (j, oi) in o.iter_mut().enumerate() {
                        let n = r[j] * inv;
                        *oi = inv * (gr[j] * wv[j] - n * mean);
                        dw[j] += gr[j] * n;
                    }
                    dw
                },
            )
            .collect();
        let mut dw = vec![0f32; d];
        for part in dw_parts {
            for (a, b) in dw.iter_mut().zip(part) {
                *a += b;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn fused_ops_equal_the_op_chains_with_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 24), &dev)?)?;
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.3, 24, &dev)?)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 5, 24), &dev)?;

        let fused = softmax_last_dim(x.as_tensor())?;
        let chain = candle_nn::ops::softmax(x.as_tensor(), D::Minus1)?;
        assert!(max_diff(&fused, &chain) < 1e-6);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (chain * &probe)?.sum_all()?.backward()?;
        assert!(max_diff(gf.get(x.as_tensor()).unwrap(), gc.get(x.as_tensor()).unwrap()) < 1e-5);

        let fused = rms_norm(x.as_tensor(), w.as_tensor(), 1e-6)?.unwrap();
        let x32 = x.as_tensor();
        let var = x32.sqr()?.mean_keepdim(D::Minus1)?;
        let chain = x32.broadcast_mul(&(var + 1e-6)?.sqrt()?.recip()?)?.broadcast_mul(w.as_tensor())?;
        assert!(max_diff(&fused, &chain) < 1e-5);
        let gf = (fused * &probe)?.sum_all()?.backward()?;
        let gc = (chain * &probe)?.sum_all()?.backward()?;
        for v in [&x, &w] {
            let d = max_diff(gf.get(v.as_tensor()).unwrap(), gc.get(v.as_tensor()).unwrap());
            assert!(d < 1e-4, "rms norm gradient differs by {d}");
        }
        Ok(())
    }
}
