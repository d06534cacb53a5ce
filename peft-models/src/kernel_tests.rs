//! The fused attention, rotary and SwiGLU kernels (`peft-kernels`) against the models' op
//! chains, outputs and gradients, run with the fused kernels forced on.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use candle_core::{DType, Tensor};
use candle_core::{Device, Var, D};
use peft_core::Result;
use peft_kernels::attention::{attention, rope_heads, swiglu, AttentionMask};
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

fn grads_agree(fused: &Tensor, chain: &Tensor, vars: &[&Var], tol: f32) {
    let probe = Tensor::randn(0f32, 1.0, fused.shape(), fused.device()).unwrap();
    let gf = (fused * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let gc = (chain * &probe)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    for (i, v) in vars.iter().enumerate() {
        let (a, b) = (
            gf.get(v.as_tensor()).expect("fused grad"),
            gc.get(v.as_tensor()).expect("chain grad"),
        );
        let d = max_diff(a, b);
        assert!(d < tol, "gradient {i} differs by {d}");
    }
}

/// The op chain the fused attention replaces (with repeat_kv for grouped heads).
fn chain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    mask: Option<&AttentionMask>,
) -> Tensor {
    let rep = q.dim(1).unwrap() / k.dim(1).unwrap();
    let (k, v) = (
        crate::ops::repeat_kv(k, rep).unwrap(),
        crate::ops::repeat_kv(v, rep).unwrap(),
    );
    let scores = (q.contiguous().unwrap().matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let scores = match mask {
        Some(m) => scores.broadcast_add(&m.additive).unwrap(),
        None => scores,
    };
    let mut p = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
    if let Some(valid) = mask.and_then(|m| m.row_valid.as_ref()) {
        p = p.broadcast_mul(valid).unwrap();
    }
    p.matmul(&v.contiguous().unwrap()).unwrap()
}

#[test]
fn fused_attention_equals_the_chain_with_gradients() -> Result<()> {
    with_mode(KernelMode::Fused, || -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, kv, t, d) = (2, 6, 2, 7, 8);
        // q read through a transpose, as the model hands it over.
        let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h, d), &dev)?)?;
        let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, kv, t, d), &dev)?)?;
        let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, kv, d), &dev)?)?;
        let qh = q.as_tensor().transpose(1, 2)?;
        let vh = v.as_tensor().transpose(1, 2)?;
        // Left padding on the second row: its first two queries attend to nothing.
        let pad = Tensor::new(
            &[[1f32, 1., 1., 1., 1., 1., 1.], [0., 0., 1., 1., 1., 1., 1.]],
            &dev,
        )?;
        let with_pad = crate::ops::causal_mask(Some(&pad), b, t, 0, None, &dev)?;
        let window = crate::ops::causal_mask(None, b, t, 0, Some(3), &dev)?;
        // A per-head additive bias (T5's position bias) broadcast over the batch.
        let bias = AttentionMask {
            additive: Tensor::randn(0f32, 1.0, (1, h, t, t), &dev)?,
            row_valid: None,
            causal_past: None,
        };
        for mask in [None, with_pad.as_ref(), window.as_ref(), Some(&bias)] {
            let fused = attention(&qh, k.as_tensor(), &vh, 0.3, mask)?.expect("fused path");
            let chain = chain_attention(&qh, k.as_tensor(), &vh, 0.3, mask);
            assert!(
                max_diff(&fused, &chain) < 1e-5,
                "outputs differ by {}",
                max_diff(&fused, &chain)
            );
            grads_agree(&fused, &chain, &[&q, &k, &v], 1e-4);
        }
        // Causal masks over several row blocks, fresh and after cached positions.
        for (t, past) in [(150, 0), (70, 30)] {
            let s = past + t;
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 4, t, d), &dev)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, s, d), &dev)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, 2, s, d), &dev)?)?;
            let mut pad = vec![1f32; s];
            pad[..3].fill(0.0);
            let pad = Tensor::from_vec(pad, (1, s), &dev)?;
            let mask = crate::ops::causal_mask(Some(&pad), 1, t, past, None, &dev)?;
            assert_eq!(mask.as_ref().and_then(|m| m.causal_past), Some(past));
            let fused = attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                0.3,
                mask.as_ref(),
            )?
            .expect("fused path");
            let chain = chain_attention(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                0.3,
                mask.as_ref(),
            );
            assert!(
                max_diff(&fused, &chain) < 1e-5,
                "causal blocks: outputs differ by {}",
                max_diff(&fused, &chain)
            );
            grads_agree(&fused, &chain, &[&q, &k, &v], 1e-4);
        }
        // Decoding: one query over five cached positions, no mask.
        let q1 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, h, 1, d), &dev)?)?;
        let k5 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, kv, 5, d), &dev)?)?;
        let v5 = Var::from_tensor(&Tensor::randn(0f32, 1.0, (1, kv, 5, d), &dev)?)?;
        let fused = attention(q1.as_tensor(), k5.as_tensor(), v5.as_tensor(), 0.5, None)?
            .expect("fused path");
        let chain = chain_attention(q1.as_tensor(), k5.as_tensor(), v5.as_tensor(), 0.5, None);
        assert!(max_diff(&fused, &chain) < 1e-5);
        grads_agree(&fused, &chain, &[&q1, &k5, &v5], 1e-4);
        Ok(())
    })
}

#[test]
fn fused_rope_and_swiglu_equal_the_chains_with_gradients() -> Result<()> {
    with_mode(KernelMode::Fused, || -> Result<()> {
        let dev = Device::Cpu;
        let (b, t, h, d) = (2, 5, 3, 8);
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, t, h * d), &dev)?)?;
        let rot = crate::ops::Rotary::new(vec![1.0, 0.3, 0.05, 0.01], 1.3, &dev)?;
        let pos = Tensor::new(&[[0u32, 1, 2, 3, 4], [7, 8, 9, 10, 11]], &dev)?;
        let (cos, sin) = rot.cos_sin(&pos, DType::F32)?;
        let fused = rope_heads(x.as_tensor(), h, &cos, &sin)?.expect("fused path");
        let heads = x.as_tensor().reshape((b, t, h, d))?.transpose(1, 2)?;
        let chain = crate::ops::apply_rotary(&heads, &cos, &sin)?;
        assert!(
            max_diff(&fused, &chain) == 0.0,
            "rope differs by {}",
            max_diff(&fused, &chain)
        );
        grads_agree(&fused, &chain, &[&x], 1e-5);

        let gate = Var::from_tensor(&Tensor::randn(0f32, 3.0, (3, 7, 33), &dev)?)?;
        let up = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7, 33), &dev)?)?;
        let fused = swiglu(gate.as_tensor(), up.as_tensor())?.expect("fused path");
        let chain = (gate.as_tensor().silu()? * up.as_tensor())?;
        assert!(max_diff(&fused, &chain) < 1e-6);
        grads_agree(&fused, &chain, &[&gate, &up], 1e-5);
        Ok(())
    })
}
