//! Fused CPU attention, rotary embedding and SwiGLU, each one op with its own backward.
//!
//! - [`attention`]: `softmax(q k^T * scale + mask) v` per head in one pass. It reads `q`, `k`,
//!   `v` in place through their strides (the `[B, T, H, D] -> [B, H, T, D]` transposes are never
//!   copied), maps query heads onto grouped key/value heads itself (no `repeat_kv` copies),
//!   and writes its output already in `[B, T, H, D]` order, so the output projection reads it
//!   without a copy. It keeps only each row's log-sum-exp for the backward, which recomputes the
//!   probabilities one head at a time: the op chain it replaces kept four `[B, H, T, S]`
//!   tensors per layer alive until the backward (scores, scaled, masked, probabilities).
//! - [`rope_heads`]: the rotation of a linear layer's `[B, T, H * D]` output into `[B, H, T, D]`
//!   heads in one pass (the chain: a transpose copy, two narrows, a negation, a concatenation,
//!   two broadcast products and a sum, each a tensor kept for the backward).
//! - [`swiglu`]: `silu(gate) * up` in one pass, keeping only its two inputs.
//!
//! Each returns `None` where it does not apply (other devices and dtypes, masks that carry
//! gradients, the portable mode); the callers (`peft-models`' ops) then take the op chains.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::view::{cpu_f32_slice, with_f32s, SharedMut, View4};

/// An attention mask as the models build it.
#[derive(Debug, Clone)]
pub struct AttentionMask {
    /// `[B, 1, T, S]` f32: 0 where attending, a large negative number elsewhere.
    pub additive: Tensor,
    /// `[B, 1, T, 1]` f32: 0 for query rows that may attend to nothing (left padding), whose
    /// output is then zero, as torch's SDPA (transformers' default attention) returns.
    pub row_valid: Option<Tensor>,
    /// `Some(past)` when `additive` hides every key after `past + t` from query row `t`
    /// (a causal mask after `past` cached positions), so attention may skip those keys.
    pub causal_past: Option<usize>,
}

/// A view of a locked tensor's CPU storage.
fn locked_view<'a>(g: &'a (candle_core::StorageRef<'_>, &Layout), what: &str) -> Result<View4<'a>> {
    View4::locked(g, &format!("fused-attention: {what}"))
}

/// `dst[m, n] (+)= alpha * lhs[m, k] rhs[k, n]` on the calling thread (the per-head products
/// are spread over threads by the callers).
///
/// # Safety
/// As [`crate::gemm::gemm_f32`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm1(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (usize, usize),
    rhs: *const f32,
    rhs_strides: (usize, usize),
    alpha: f32,
) {
    // SAFETY: the caller's contract.
    unsafe {
        crate::gemm::gemm_f32(
            (m, n, k),
            dst,
            dst_rs,
            accumulate,
            lhs,
            lhs_strides,
            rhs,
            rhs_strides,
            alpha,
            false,
        )
    }
}

fn cpu_f32(t: &Tensor) -> bool {
    crate::cpu::fused_f32(&[t])
}

/// Scaled dot-product attention of `q [B, H, T, D]` over `k, v [B, KV, S, D]` (`H` a multiple
/// of `KV`: grouped-query heads), softmax in f32, rows that may attend to nothing zeroed as
/// torch's SDPA does. Returns `[B, H, T, D]` (on the CPU a transposed view of a `[B, T, H, D]`
/// buffer, so `.transpose(1, 2)` then a reshape costs nothing).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&AttentionMask>,
) -> Result<Option<Tensor>> {
    let mask_ok = mask.is_none_or(|m| {
        cpu_f32(&m.additive)
            && !m.additive.track_op()
            && m.row_valid
                .as_ref()
                .is_none_or(|r| cpu_f32(r) && !r.track_op())
    });
    if !(cpu_f32(q) && cpu_f32(k) && cpu_f32(v) && mask_ok) || q.rank() != 4 {
        return Ok(None);
    }
    let (b, h, t, d) = q.dims4()?;
    let (kb, kv, s, kd) = k.dims4()?;
    if kb != b || kd != d || kv == 0 || h % kv != 0 || v.dims() != [b, kv, s, d] {
        return Ok(None);
    }
    let additive = match mask {
        Some(m) => match m.additive.broadcast_as((b, h, t, s)) {
            Ok(a) => Some(a),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    let row_valid = match mask.and_then(|m| m.row_valid.as_ref()) {
        Some(r) => match r.broadcast_as((b, h, t, 1)) {
            Ok(r) => Some(r),
            Err(_) => return Ok(None),
        },
        None => None,
    };
    let op = FusedAttention {
        scale: scale as f32,
        causal_past: mask.and_then(|m| m.causal_past),
        additive,
        row_valid,
        lse: Mutex::new(None),
    };
    Ok(Some(q.apply_op3(k, v, op)?.transpose(1, 2)?))
}

/// Query rows per block under a causal mask.
const CAUSAL_BLOCK: usize = 64;

struct FusedAttention {
    scale: f32,
    /// `Some(past)` when the mask hides every key after `past + t` from query row `t`.
    causal_past: Option<usize>,
    /// The additive mask broadcast to `[B, H, T, S]` (stride 0 where it broadcasts).
    additive: Option<Tensor>,
    /// `[B, H, T, 1]`: 0 for rows that attend to nothing.
    row_valid: Option<Tensor>,
    /// Each row's log-sum-exp `[B, H, T]` from the forward, for the backward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

/// The mask and row-validity values as plain views (held storage guards).
struct MaskViews<'a> {
    additive: Option<View4<'a>>,
    valid: Option<View4<'a>>,
}

impl FusedAttention {
    fn with_masks<R>(&self, f: impl FnOnce(&MaskViews<'_>) -> Result<R>) -> Result<R> {
        let ga = self.additive.as_ref().map(|a| a.storage_and_layout());
        let gv = self.row_valid.as_ref().map(|r| r.storage_and_layout());
        let views = MaskViews {
            additive: ga
                .as_ref()
                .map(|g| locked_view(g, "the mask"))
                .transpose()?,
            valid: gv
                .as_ref()
                .map(|g| locked_view(g, "the row mask"))
                .transpose()?,
        };
        f(&views)
    }

    /// Fills `p [t1 - t0, se]` with query rows `t0..t1` of head `(bi, hi)` against keys
    /// `0..se`: the scaled, masked scores `q k^T * scale + mask`.
    #[allow(clippy::too_many_arguments)]
    fn scores(
        &self,
        (q, k): (&View4<'_>, &View4<'_>),
        masks: &MaskViews<'_>,
        bi: usize,
        hi: usize,
        (t0, t1): (usize, usize),
        se: usize,
        p: &mut [f32],
    ) {
        let [_, h, _, d] = q.dims;
        let kv = k.dims[1];
        let kh = hi / (h / kv);
        let tb = t1 - t0;
        // SAFETY: rows t0..t1 of q's [T, D] block of head hi, rows 0..se of k's [S, D] block of
        // head kh, and p's [tb, se].
        unsafe {
            let q_rows = q.at(bi, hi).add(t0 * q.st[2]);
            gemm1(
                tb,
                se,
                d,
                p.as_mut_ptr(),
                se,
                false,
                q_rows,
                (q.st[2], q.st[3]),
                k.at(bi, kh),
                (k.st[3], k.st[2]),
                1.0,
            );
        }
        for (i, row) in p[..tb * se].chunks_mut(se.max(1)).enumerate() {
            match &masks.additive {
                Some(m) => {
                    for (si, x) in row.iter_mut().enumerate() {
                        *x = *x * self.scale + m.get([bi, hi, t0 + i, si]);
                    }
                }
                None => row.iter_mut().for_each(|x| *x *= self.scale),
            }
        }
    }

    /// Query-row blocks `(t0, t1)` and the keys each needs (`0..se`): with a causal mask,
    /// row `t` sees at most keys `0..past + t + 1`, so the masked upper triangle is skipped.
    fn row_blocks(&self, t: usize, s: usize) -> Vec<(usize, usize, usize)> {
        let block = if self.causal_past.is_some() {
            CAUSAL_BLOCK
        } else {
            t.max(1)
        };
        (0..t)
            .step_by(block)
            .map(|t0| {
                let t1 = (t0 + block).min(t);
                let se = self.causal_past.map_or(s, |past| (past + t1).min(s));
                (t0, t1, se)
            })
            .collect()
    }

    fn row_is_valid(masks: &MaskViews<'_>, bi: usize, hi: usize, ti: usize) -> bool {
        masks
            .valid
            .as_ref()
            .is_none_or(|v| v.get([bi, hi, ti, 0]) != 0.0)
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            View4::new(s1, l1, "q")?,
            View4::new(s2, l2, "k")?,
            View4::new(s3, l3, "v")?,
        );
        let [b, h, t, d] = q.dims;
        let s = k.dims[2];
        let kv = k.dims[1];
        let mut out = vec![0f32; b * t * h * d];
        let mut lse = vec![0f32; b * h * t];
        let out_ptr = SharedMut(out.as_mut_ptr());
        self.with_masks(|masks| {
            lse.par_chunks_mut(t.max(1))
                .enumerate()
                .for_each(|(bh, lse_rows)| {
                    let (bi, hi) = (bh / h, bh % h);
                    let kh = hi / (h / kv);
                    let blocks = self.row_blocks(t, s);
                    let mut p = vec![0f32; blocks.first().map_or(0, |&(t0, t1, _)| t1 - t0) * s];
                    for &(t0, t1, se) in &blocks {
                        self.scores((&q, &k), masks, bi, hi, (t0, t1), se, &mut p);
                        let rows = p[..(t1 - t0) * se].chunks_mut(se.max(1));
                        for (i, (row, l)) in rows.zip(lse_rows[t0..t1].iter_mut()).enumerate() {
                            let (max, sum) = crate::vmath::exp_minus_max(row);
                            *l = max + sum.ln();
                            let inv = if Self::row_is_valid(masks, bi, hi, t0 + i) {
                                1.0 / sum
                            } else {
                                0.0
                            };
                            row.iter_mut().for_each(|x| *x *= inv);
                        }
                        // SAFETY: head hi of batch bi writes out[bi, t0..t1, hi, :] only (rows of
                        // stride H * D), disjoint from every other (bi, hi); rows 0..se of v's
                        // [S, D] block of head kh.
                        unsafe {
                            let dst = out_ptr.get().add((bi * t + t0) * h * d + hi * d);
                            gemm1(
                                t1 - t0,
                                d,
                                se,
                                dst,
                                h * d,
                                false,
                                p.as_ptr(),
                                (se, 1),
                                v.at(bi, kh),
                                (v.st[2], v.st[3]),
                                1.0,
                            );
                        }
                    }
                });
            Ok(())
        })?;
        *self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused-attention: poisoned lock".into()))? =
            Some(Arc::new(lse));
        Ok((CpuStorage::F32(out), Shape::from((b, t, h, d))))
    }

    fn bwd(
        &self,
        q_t: &Tensor,
        k_t: &Tensor,
        v_t: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused-attention: poisoned lock".into()))?
            .clone()
            .ok_or_else(|| {
                candle_core::Error::Msg("fused-attention: backward before forward".into())
            })?;
        let grad = grad.contiguous()?;
        let (gq, gk, gv, gg) = (
            q_t.storage_and_layout(),
            k_t.storage_and_layout(),
            v_t.storage_and_layout(),
            grad.storage_and_layout(),
        );
        let (q, k, v, go) = (
            locked_view(&gq, "q")?,
            locked_view(&gk, "k")?,
            locked_view(&gv, "v")?,
            locked_view(&gg, "the output gradient")?,
        );
        let [b, h, t, d] = q.dims;
        let [_, kv, s, _] = k.dims;
        let rep = h / kv;
        let mut dq = vec![0f32; b * h * t * d];
        let mut dk = vec![0f32; b * kv * s * d];
        let mut dv = vec![0f32; b * kv * s * d];
        self.with_masks(|masks| {
            dq.par_chunks_mut((rep * t * d).max(1))
                .zip(
                    dk.par_chunks_mut((s * d).max(1))
                        .zip(dv.par_chunks_mut((s * d).max(1))),
                )
                .enumerate()
                .for_each(|(bk, (dq_g, (dk_g, dv_g)))| {
                    let (bi, kh) = (bk / kv, bk % kv);
                    let blocks = self.row_blocks(t, s);
                    let rows_max = blocks.first().map_or(0, |&(t0, t1, _)| t1 - t0);
                    let mut p = vec![0f32; rows_max * s];
                    let mut dp = vec![0f32; rows_max * s];
                    for r in 0..rep {
                        let hi = kh * rep + r;
                        let lse_rows = &lse[(bi * h + hi) * t..(bi * h + hi + 1) * t];
                        for &(t0, t1, se) in &blocks {
                            let tb = t1 - t0;
                            self.scores((&q, &k), masks, bi, hi, (t0, t1), se, &mut p);
                            for (i, row) in p[..tb * se].chunks_mut(se.max(1)).enumerate() {
                                if Self::row_is_valid(masks, bi, hi, t0 + i) {
                                    crate::vmath::exp_shifted_sum(row, lse_rows[t0 + i]);
                                } else {
                                    row.fill(0.0);
                                }
                            }
                            // go[bi, t0.., hi, :] is [tb, D] with row stride H * D.
                            let go_h = go.at(bi, 0).wrapping_add(t0 * h * d + hi * d);
                            let q_rows = q.at(bi, hi).wrapping_add(t0 * q.st[2]);
                            // SAFETY: each call reads blocks of q/k/v/go/p/dp within their
                            // extents and writes this task's own dq/dk/dv chunks (rows 0..se of
                            // dk/dv, rows t0..t1 of head r in dq) or local buffers.
                            unsafe {
                                // dV += P^T dO
                                gemm1(
                                    se,
                                    d,
                                    tb,
                                    dv_g.as_mut_ptr(),
                                    d,
                                    true,
                                    p.as_ptr(),
                                    (1, se),
                                    go_h,
                                    (h * d, 1),
                                    1.0,
                                );
                                // dP = dO V^T
                                gemm1(
                                    tb,
                                    se,
                                    d,
                                    dp.as_mut_ptr(),
                                    se,
                                    false,
                                    go_h,
                                    (h * d, 1),
                                    v.at(bi, kh),
                                    (v.st[3], v.st[2]),
                                    1.0,
                                );
                            }
                            for (pr, dr) in p[..tb * se]
                                .chunks(se.max(1))
                                .zip(dp[..tb * se].chunks_mut(se.max(1)))
                            {
                                let dot: f32 = pr.iter().zip(dr.iter()).map(|(a, b)| a * b).sum();
                                for (x, &pi) in dr.iter_mut().zip(pr) {
                                    *x = pi * (*x - dot) * self.scale;
                                }
                            }
                            // SAFETY: as above.
                            unsafe {
                                // dQ = dS K
                                gemm1(
                                    tb,
                                    d,
                                    se,
                                    dq_g.as_mut_ptr().add(r * t * d + t0 * d),
                                    d,
                                    false,
                                    dp.as_ptr(),
                                    (se, 1),
                                    k.at(bi, kh),
                                    (k.st[2], k.st[3]),
                                    1.0,
                                );
                                // dK += dS^T Q
                                gemm1(
                                    se,
                                    d,
                                    tb,
                                    dk_g.as_mut_ptr(),
                                    d,
                                    true,
                                    dp.as_ptr(),
                                    (1, se),
                                    q_rows,
                                    (q.st[2], q.st[3]),
                                    1.0,
                                );
                            }
                        }
                    }
                });
            Ok(())
        })?;
        let dev = q_t.device();
        Ok((
            Some(Tensor::from_vec(dq, (b, h, t, d), dev)?),
            Some(Tensor::from_vec(dk, (b, kv, s, d), dev)?),
            Some(Tensor::from_vec(dv, (b, kv, s, d), dev)?),
        ))
    }
}

/// Rotary embedding of a linear layer's output `x [B, T, H * D]` into heads `[B, H, T, D]`:
/// `x * cos + rotate_half(x) * sin`, with `cos`, `sin` `[B, 1, T, D]` (or broadcastable to it).
/// `None` where the fused op does not apply.
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Option<Tensor>> {
    if !(cpu_f32(x) && cpu_f32(cos) && cpu_f32(sin)) || x.rank() != 3 || heads == 0 {
        return Ok(None);
    }
    let (b, t, hd) = x.dims3()?;
    let d = hd / heads;
    if d * heads != hd || !d.is_multiple_of(2) || cos.track_op() || sin.track_op() {
        return Ok(None);
    }
    let (Ok(c), Ok(s)) = (
        cos.broadcast_as((b, 1, t, d)),
        sin.broadcast_as((b, 1, t, d)),
    ) else {
        return Ok(None);
    };
    let op = Rope {
        heads,
        cos: Arc::new(c.contiguous()?.flatten_all()?.to_vec1()?),
        sin: Arc::new(s.contiguous()?.flatten_all()?.to_vec1()?),
        backward: false,
    };
    Ok(Some(x.contiguous()?.apply_op1(op)?))
}

/// Forward: `[B, T, H * D] -> [B, H, T, D]` rotated; backward (`backward: true`): the
/// transposed map `[B, H, T, D] -> [B, T, H * D]`.
struct Rope {
    heads: usize,
    /// `[B, T, D]`
    cos: Arc<Vec<f32>>,
    sin: Arc<Vec<f32>>,
    backward: bool,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = cpu_f32_slice(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let h = self.heads;
        let (b, t, d) = if self.backward {
            (dims[0], dims[2], dims[3])
        } else {
            (dims[0], dims[1], dims[2] / h)
        };
        let half = d / 2;
        if self.cos.len() != b * t * d {
            candle_core::bail!(
                "fused-rope: tables of {} values for {b} x {t} x {d}",
                self.cos.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        if !self.backward {
            // Output chunk (bi, hi) is [T, D]; its input rows are x[bi, ti, hi * D ..].
            out.par_chunks_mut((t * d).max(1))
                .enumerate()
                .for_each(|(bh, o)| {
                    let (bi, hi) = (bh / h, bh % h);
                    for ti in 0..t {
                        let xr = &x[(bi * t + ti) * h * d + hi * d..][..d];
                        let (c, s) = (
                            &self.cos[(bi * t + ti) * d..][..d],
                            &self.sin[(bi * t + ti) * d..][..d],
                        );
                        let or = &mut o[ti * d..(ti + 1) * d];
                        for i in 0..half {
                            or[i] = xr[i] * c[i] + (-xr[i + half]) * s[i];
                            or[i + half] = xr[i + half] * c[i + half] + xr[i] * s[i + half];
                        }
                    }
                });
            return Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))));
        }
        // Gradient row (bi, ti) is [H * D]; its inputs are g[bi, hi, ti, ..] for each head.
        out.par_chunks_mut((h * d).max(1))
            .enumerate()
            .for_each(|(bt, o)| {
                let (bi, ti) = (bt / t, bt % t);
                let (c, s) = (&self.cos[bt * d..][..d], &self.sin[bt * d..][..d]);
                for hi in 0..h {
                    let g = &x[((bi * h + hi) * t + ti) * d..][..d];
                    let or = &mut o[hi * d..(hi + 1) * d];
                    for i in 0..half {
                        or[i] = g[i] * c[i] + g[i + half] * s[i + half];
                        or[i + half] = g[i + half] * c[i + half] - g[i] * s[i];
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, t, h * d))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = Rope {
            heads: self.heads,
            cos: Arc::clone(&self.cos),
            sin: Arc::clone(&self.sin),
            backward: true,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&op)?))
    }
}

/// `silu(gate) * up` (LLaMA's gated MLP) in one op; `None` where it does not apply.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    if !(cpu_f32(gate) && cpu_f32(up)) || gate.dims() != up.dims() {
        return Ok(None);
    }
    Ok(Some(
        gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?,
    ))
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (
            cpu_f32_slice(s1, l1, self.name())?,
            cpu_f32_slice(s2, l2, self.name())?,
        );
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(o, (g, u))| {
                crate::vmath::silu_into(g, o, None);
                for (oi, &ui) in o.iter_mut().zip(u) {
                    *oi *= ui;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let n = gate.elem_count();
        let mut dg = vec![0f32; n];
        let mut du = vec![0f32; n];
        with_f32s([gate, up, &grad], self.name(), |[g, u, go]| {
            dg.par_chunks_mut(4096)
                .zip(du.par_chunks_mut(4096))
                .zip(
                    g.par_chunks(4096)
                        .zip(u.par_chunks(4096))
                        .zip(go.par_chunks(4096)),
                )
                .for_each(|((dg, du), ((g, u), go))| {
                    // du = go * silu(g); dg = go * u * s * (1 + g (1 - s)), s = sigmoid(g).
                    crate::vmath::silu_into(g, du, Some(&mut *dg));
                    for i in 0..g.len() {
                        let s = dg[i];
                        dg[i] = go[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                        du[i] *= go[i];
                    }
                });
            Ok(())
        })?;
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}
