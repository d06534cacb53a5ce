//! Differentiable building blocks shared by the models: RMS norm, rotary embeddings,
//! attention masks and masked softmax attention. Only ops with a backward pass are used here
//! (candle's fused `rms_norm`, `rope` and `softmax_last_dim` drop gradients silently).

use candle_core::{DType, Device, Tensor, D};
use peft_core::{PeftError, Result};

/// HF `LlamaRMSNorm`: normalise in f32, cast back, then scale by `weight`.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(y) = peft_kernels::nn::rms_norm(x, weight, eps)? {
        return Ok(y);
    }
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let variance = x32.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = x32.broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)?;
    Ok(normed.to_dtype(dtype)?.broadcast_mul(weight)?)
}

/// `nn.LayerNorm` over the last dimension: normalise in f32, then scale and shift.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x32 = x.to_dtype(DType::F32)?;
    let mean = x32.mean_keepdim(D::Minus1)?;
    let centred = x32.broadcast_sub(&mean)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let normed = centred
        .broadcast_mul(&(variance + eps)?.sqrt()?.recip()?)?
        .to_dtype(dtype)?;
    let scaled = normed.broadcast_mul(weight)?;
    Ok(match bias {
        Some(b) => scaled.broadcast_add(b)?,
        None => scaled,
    })
}

/// `x * sigmoid(x)`, written with differentiable primitives.
pub fn silu(x: &Tensor) -> Result<Tensor> {
    Ok(x.silu()?)
}

/// The activation named by `hidden_act` in config.json.
pub fn activation(name: &str, x: &Tensor) -> Result<Tensor> {
    match name {
        "silu" | "swish" => silu(x),
        "gelu" => Ok(x.gelu_erf()?),
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(x.gelu()?),
        "relu" => Ok(x.relu()?),
        other => Err(PeftError::bad_input(
            "hidden_act",
            "silu, gelu, gelu_new, gelu_pytorch_tanh or relu",
            other,
        )),
    }
}

/// Rotary position embedding tables, computed in f32 as transformers does.
#[derive(Debug, Clone)]
pub struct Rotary {
    inv_freq: Tensor,
    attention_scaling: f64,
}

impl Rotary {
    /// Builds the table from per-pair inverse frequencies.
    pub fn new(inv_freq: Vec<f32>, attention_scaling: f64, device: &Device) -> Result<Self> {
        let n = inv_freq.len();
        Ok(Rotary {
            inv_freq: Tensor::from_vec(inv_freq, (1, 1, n), device)?,
            attention_scaling,
        })
    }

    /// `(cos, sin)` of shape `[B, 1, T, head_dim]` in `dtype` for `positions [B, T]`.
    pub fn cos_sin(&self, positions: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let pos = positions.to_dtype(DType::F32)?.unsqueeze(D::Minus1)?; // [B, T, 1]
        let freqs = pos.broadcast_mul(&self.inv_freq)?; // [B, T, D/2]
        let emb = Tensor::cat(&[&freqs, &freqs], D::Minus1)?.unsqueeze(1)?; // [B, 1, T, D]
        let mut cos = emb.cos()?;
        let mut sin = emb.sin()?;
        if self.attention_scaling != 1.0 {
            cos = (cos * self.attention_scaling)?;
            sin = (sin * self.attention_scaling)?;
        }
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

/// Applies rotary embeddings to `x [B, H, T, D]`: `x * cos + rotate_half(x) * sin`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let half = d / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, d - half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?)
}

/// A linear layer's output `x [B, T, heads * D]` as rotated heads `[B, heads, T, D]` (one
/// fused op on the CPU in f32).
pub fn rope_heads(x: &Tensor, heads: usize, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    if let Some(y) = peft_kernels::attention::rope_heads(x, heads, cos, sin)? {
        return Ok(y);
    }
    let (b, t, hd) = x.dims3()?;
    let x = x.reshape((b, t, heads, hd / heads))?.transpose(1, 2)?;
    apply_rotary(&x, cos, sin)
}

/// `act(gate) * up`, the gated MLP (one fused op for SiLU on the CPU in f32).
pub fn gated(act: &str, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if matches!(act, "silu" | "swish") {
        if let Some(y) = peft_kernels::attention::swiglu(gate, up)? {
            return Ok(y);
        }
    }
    Ok((activation(act, gate)? * up)?)
}

pub use peft_kernels::attention::AttentionMask;

const MASKED: f32 = -1.0e30;

/// Builds the causal (optionally sliding-window) mask for `t` new positions after `past`
/// cached ones, combined with a 2-D padding mask `[B, past + t]` of 1/0.
pub fn causal_mask(
    attention_mask: Option<&Tensor>,
    batch: usize,
    t: usize,
    past: usize,
    sliding_window: Option<usize>,
    device: &Device,
) -> Result<Option<AttentionMask>> {
    let s = past + t;
    let padding: Option<Vec<Vec<f32>>> = match attention_mask {
        Some(m) => {
            if m.dims() != [batch, s] {
                return Err(PeftError::bad_input(
                    "attention_mask",
                    format!("shape [{batch}, {s}] (batch, cached + new positions)"),
                    format!("{:?}", m.dims()),
                ));
            }
            Some(m.to_dtype(DType::F32)?.to_vec2::<f32>()?)
        }
        None => None,
    };
    let window_bites = sliding_window.is_some_and(|w| s > w);
    let all_visible = padding
        .as_ref()
        .is_none_or(|p| p.iter().all(|row| row.iter().all(|v| *v != 0.0)));
    if all_visible && t == 1 && !window_bites {
        return Ok(None);
    }
    let mut data = Vec::with_capacity(batch * t * s);
    let mut valid = Vec::with_capacity(batch * t);
    for b in 0..batch {
        for i in 0..t {
            let q = past + i;
            let mut any = false;
            for j in 0..s {
                let causal = j <= q;
                let in_window = sliding_window.is_none_or(|w| q - j.min(q) < w);
                let not_pad = padding.as_ref().is_none_or(|p| p[b][j] != 0.0);
                let ok = causal && in_window && not_pad;
                any |= ok;
                data.push(if ok { 0.0 } else { MASKED });
            }
            valid.push(if any { 1.0f32 } else { 0.0 });
        }
    }
    let additive = Tensor::from_vec(data, (batch, 1, t, s), device)?;
    let row_valid = if valid.iter().all(|v| *v == 1.0) {
        None
    } else {
        Some(Tensor::from_vec(valid, (batch, 1, t, 1), device)?)
    };
    Ok(Some(AttentionMask {
        additive,
        row_valid,
        causal_past: Some(past),
    }))
}

/// Repeats key/value heads `[B, KV, S, D]` to `[B, KV * n_rep, S, D]` (grouped-query attention).
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv, n_rep, s, d))?
        .reshape((b, kv * n_rep, s, d))?)
}

/// Appends this step's keys and values `[B, KV, T, D]` to layer `layer`'s cache (if any) and
/// returns the full keys and values to attend over.
pub fn cache_kv(
    k: Tensor,
    v: Tensor,
    layer: usize,
    cache: Option<&mut peft_core::KvCache>,
) -> Result<(Tensor, Tensor)> {
    let Some(cache) = cache else {
        return Ok((k, v));
    };
    let (k, v) = match cache.get(layer) {
        Some((pk, pv)) => (
            Tensor::cat(&[&pk.to_dtype(k.dtype())?, &k], 2)?.contiguous()?,
            Tensor::cat(&[&pv.to_dtype(v.dtype())?, &v], 2)?.contiguous()?,
        ),
        None => (k.contiguous()?, v.contiguous()?),
    };
    cache.set(layer, (k.clone(), v.clone()));
    Ok((k, v))
}

/// Scaled dot-product attention of `q [B, H, T, D]` over `k, v [B, KV, S, D]` (`H` a
/// multiple of `KV`: grouped-query heads), softmax in f32. On the CPU in f32 one fused op
/// (see [`peft_kernels::attention`]) whose result is a `[B, H, T, D]` view of a `[B, T, H, D]`
/// buffer.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&AttentionMask>,
) -> Result<Tensor> {
    if let Some(out) = peft_kernels::attention::attention(q, k, v, scale, mask)? {
        return Ok(out);
    }
    let (h, kv) = (q.dim(1)?, k.dim(1)?);
    let (k, v) = if kv != 0 && h != kv && h % kv == 0 {
        (repeat_kv(k, h / kv)?, repeat_kv(v, h / kv)?)
    } else {
        (k.clone(), v.clone())
    };
    let (k, v) = (&k, &v);
    let dtype = q.dtype();
    let scores = match peft_kernels::nn::batched_matmul_nt(q, k)? {
        Some(s) => s,
        None => q.contiguous()?.matmul(&k.contiguous()?.t()?)?,
    };
    let scores = (scores * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.additive)?,
        None => scores,
    };
    let mut probs = match peft_kernels::nn::softmax_last_dim(&scores)? {
        Some(p) => p,
        None => candle_nn::ops::softmax(&scores, D::Minus1)?,
    };
    if let Some(valid) = mask.and_then(|m| m.row_valid.as_ref()) {
        probs = probs.broadcast_mul(valid)?;
    }
    let probs = probs.to_dtype(dtype)?;
    Ok(match peft_kernels::nn::batched_matmul(&probs, v)? {
        Some(out) => out,
        None => probs.matmul(&v.contiguous()?)?,
    })
}
