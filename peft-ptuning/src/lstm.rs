//! A bidirectional, multi-layer LSTM with torch's parameter names and maths
//! (`weight_ih_l{k}[_reverse]`, gates in the order input, forget, cell, output), written with
//! differentiable candle ops so gradients reach every weight. Sequences here are the virtual
//! tokens (a few dozen steps), so a step loop is cheap.

use candle_core::{Tensor, D};
use peft_core::layers::linear_forward;
use peft_core::nn::Dropout;
use peft_core::{Init, ParamBuilder, Result};

#[derive(Debug)]
struct Direction {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Tensor,
    b_hh: Tensor,
}

/// `torch.nn.LSTM(input_size, hidden_size, num_layers, dropout, bidirectional=True, batch_first=True)`.
#[derive(Debug)]
pub struct BiLstm {
    layers: Vec<[Direction; 2]>,
    hidden: usize,
    dropout: Dropout,
}

impl BiLstm {
    /// Builds (or loads) the weights under `params`, initialised uniform on `±1/sqrt(hidden)`.
    pub fn new(
        params: &ParamBuilder,
        input: usize,
        hidden: usize,
        num_layers: usize,
        dropout: f64,
    ) -> Result<Self> {
        let bound = 1.0 / (hidden as f64).sqrt();
        let init = Init::Uniform {
            low: -bound,
            high: bound,
        };
        let mut layers = Vec::with_capacity(num_layers);
        for k in 0..num_layers {
            let in_k = if k == 0 { input } else { 2 * hidden };
            let dir = |suffix: &str| -> Result<Direction> {
                Ok(Direction {
                    w_ih: params.get(
                        &[4 * hidden, in_k],
                        &format!("weight_ih_l{k}{suffix}"),
                        init,
                    )?,
                    w_hh: params.get(
                        &[4 * hidden, hidden],
                        &format!("weight_hh_l{k}{suffix}"),
                        init,
                    )?,
                    b_ih: params.get(&[4 * hidden], &format!("bias_ih_l{k}{suffix}"), init)?,
                    b_hh: params.get(&[4 * hidden], &format!("bias_hh_l{k}{suffix}"), init)?,
                })
            };
            layers.push([dir("")?, dir("_reverse")?]);
        }
        Ok(BiLstm {
            layers,
            hidden,
            dropout: Dropout::new(dropout, params.seed("dropout")),
        })
    }

    fn run(&self, d: &Direction, xs: &Tensor, reverse: bool) -> Result<Tensor> {
        let (t, _) = xs.dims2()?;
        let h4 = self.hidden;
        // Input projections for every step at once: [T, 4H].
        let gates_x = linear_forward(xs, &d.w_ih, false)?.broadcast_add(&(&d.b_ih + &d.b_hh)?)?;
        let mut h = Tensor::zeros((1, h4), xs.dtype(), xs.device())?;
        let mut c = h.clone();
        let mut outs = vec![None; t];
        let order: Vec<usize> = if reverse {
            (0..t).rev().collect()
        } else {
            (0..t).collect()
        };
        for step in order {
            let gates = (gates_x.narrow(0, step, 1)? + linear_forward(&h, &d.w_hh, false)?)?;
            let i = candle_nn::ops::sigmoid(&gates.narrow(D::Minus1, 0, h4)?)?;
            let f = candle_nn::ops::sigmoid(&gates.narrow(D::Minus1, h4, h4)?)?;
            let g = gates.narrow(D::Minus1, 2 * h4, h4)?.tanh()?;
            let o = candle_nn::ops::sigmoid(&gates.narrow(D::Minus1, 3 * h4, h4)?)?;
            c = ((f * &c)? + (i * g)?)?;
            h = (o * c.tanh()?)?;
            outs[step] = Some(h.clone());
        }
        let outs: Vec<Tensor> = outs.into_iter().flatten().collect();
        Ok(Tensor::cat(&outs, 0)?)
    }

    /// Runs the sequence `xs [T, input]` and returns `[T, 2 * hidden]` (forward and backward
    /// outputs concatenated), with dropout between layers in training.
    pub fn forward(&self, xs: &Tensor, training: bool) -> Result<Tensor> {
        let mut x = xs.clone();
        for (k, [fwd, bwd]) in self.layers.iter().enumerate() {
            if k > 0 {
                x = self.dropout.forward(&x, training)?;
            }
            x = Tensor::cat(
                &[&self.run(fwd, &x, false)?, &self.run(bwd, &x, true)?],
                D::Minus1,
            )?;
        }
        Ok(x)
    }
}
