//! Adapters whose whole effect is a weight update `ΔW` computed from their parameters:
//! `y = base(x) + x ΔWᵀ`, merged as `W + ΔW` (LoHa's Hadamard product, LoKr's Kronecker
//! product; FourierFT's spectrum and the like next). A method implements [`DeltaWeight`] for
//! its factors and wraps it in a [`DeltaLinear`], which supplies the forward pass, merging and
//! the LyCORIS family's two training-time drops (peft's `module_dropout` and `rank_dropout`).

use std::fmt::Debug;

use candle_core::{DType, Tensor};

use crate::error::{PeftError, Result};
use crate::layers::LinearLike;
use crate::method::LinearAdapter;
use crate::nn::Dropout;

/// The weight update of one layer.
pub trait DeltaWeight: Send + Sync + Debug {
    /// `ΔW`, scaled, laid out `[out, in]`, f32, differentiable in the adapter's parameters.
    fn delta_weight(&self) -> Result<Tensor>;
}

/// Refuses a layer that stores its weight `[in, out]` (transformers' `Conv1D`, GPT-2), as peft's
/// LyCORIS-style methods do: they adapt `nn.Linear` (and convolutions) only, so an adapter
/// made here on such a layer could not load in peft.
pub fn require_linear_layout(path: &str, base: &dyn LinearLike, method: &str) -> Result<()> {
    if base.stores_transposed() {
        return Err(PeftError::UnsupportedModule {
            path: path.to_string(),
            kind: "a Conv1D layer (weight stored [in, out], as GPT-2's)".into(),
            method: method.to_string(),
            supported: "nn.Linear layers (peft refuses Conv1D for this method too)".into(),
        });
    }
    Ok(())
}

/// `f` applied to `x` viewed as rows of `in_features` values in f32 (`[n, in_features]`); its
/// `[n, out]` result is shaped back like `x`, the last dimension `out`, in `dtype`. The shape
/// plumbing of an adapter that computes per row (an update added to the output, or an input
/// transform).
pub fn map_rows(
    x: &Tensor,
    in_features: usize,
    dtype: DType,
    f: impl FnOnce(Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let rows = x.elem_count() / in_features.max(1);
    let out = f(x.to_dtype(DType::F32)?.reshape((rows, in_features))?)?;
    let mut dims = x.dims().to_vec();
    if let Some(last) = dims.last_mut() {
        *last = out.dim(1)?;
    }
    Ok(out.reshape(dims)?.to_dtype(dtype)?)
}

/// The random drops applied in training (peft's LyCORIS layers).
#[derive(Debug)]
pub struct Drops {
    /// `module_dropout`: the whole update is skipped with this probability.
    module: Dropout,
    /// `rank_dropout`: each output row of `ΔW` is zeroed with this probability.
    rank: Dropout,
    /// Whether the kept rows are rescaled by one over their mean (LoHa always; LoKr with
    /// `rank_dropout_scale`).
    rescale_rank: bool,
}

impl Drops {
    /// Drops with probabilities `module_dropout` and `rank_dropout`, seeded from `seed`.
    pub fn new(module_dropout: f64, rank_dropout: f64, rescale_rank: bool, seed: u64) -> Self {
        Drops {
            module: Dropout::new(module_dropout, seed),
            rank: Dropout::new(rank_dropout, seed ^ 0x5DEE_CE66_D1CE_4E5B),
            rescale_rank,
        }
    }

    /// No drops.
    pub fn none() -> Self {
        Self::new(0.0, 0.0, false, 0)
    }
}

/// A [`LinearAdapter`] adding `x ΔWᵀ` to the base output.
#[derive(Debug)]
pub struct DeltaLinear<D> {
    delta: D,
    drops: Drops,
}

impl<D: DeltaWeight> DeltaLinear<D> {
    /// Wraps a weight update.
    pub fn new(delta: D, drops: Drops) -> Self {
        DeltaLinear { delta, drops }
    }

    /// The weight update.
    pub fn delta(&self) -> &D {
        &self.delta
    }

    /// `ΔW` with rank dropout applied (training): peft keeps row `i` when `u_i > p` and, when
    /// rescaling, divides the mask by its mean (a mask with no row kept stays zero rather than
    /// peft's division by zero).
    fn training_delta(&self) -> Result<Tensor> {
        let dw = self.delta.delta_weight()?;
        let p = self.drops.rank.p();
        if p <= 0.0 {
            return Ok(dw);
        }
        let rows = dw.dim(0)?;
        let mut mask: Vec<f32> = self
            .drops
            .rank
            .uniforms(rows)
            .into_iter()
            .map(|u| if u > p { 1.0 } else { 0.0 })
            .collect();
        if self.drops.rescale_rank {
            let mean = mask.iter().sum::<f32>() / rows.max(1) as f32;
            if mean > 0.0 {
                mask.iter_mut().for_each(|m| *m /= mean);
            }
        }
        let mask = Tensor::from_vec(mask, (rows, 1), dw.device())?;
        Ok(dw.broadcast_mul(&mask)?)
    }
}

impl<D: DeltaWeight> LinearAdapter for DeltaLinear<D> {
    fn adapt_output(
        &self,
        _base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        let dw = if training {
            // peft: the update runs when `torch.rand(1) > module_dropout`.
            let p = self.drops.module.p();
            if p > 0.0 && self.drops.module.uniforms(1)[0] <= p {
                return Ok(y);
            }
            self.training_delta()?
        } else {
            self.delta.delta_weight()?
        };
        let update = map_rows(x, dw.dim(1)?, y.dtype(), |x2| Ok(x2.matmul(&dw.t()?)?))?;
        Ok((y + update)?)
    }

    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let dw = self.delta.delta_weight()?;
        if dw.dims() != weight.dims() {
            return Err(PeftError::InvalidState(format!(
                "the weight update is {:?} but the layer's weight is {:?}",
                dw.dims(),
                weight.dims()
            )));
        }
        Ok(((weight + dw)?, bias.cloned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::DenseLinear;
    use candle_core::Device;

    /// A fixed update: `ΔW = [[1, 2], [3, 4], [5, 6]]` (3 outputs, 2 inputs).
    #[derive(Debug)]
    struct Fixed(Tensor);

    impl DeltaWeight for Fixed {
        fn delta_weight(&self) -> Result<Tensor> {
            Ok(self.0.clone())
        }
    }

    fn fixed() -> Fixed {
        let dw = Tensor::new(&[[1f32, 2.], [3., 4.], [5., 6.]], &Device::Cpu).unwrap();
        Fixed(dw)
    }

    fn base() -> DenseLinear {
        DenseLinear::new(
            Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap(),
            None,
        )
        .unwrap()
    }

    fn rows(t: &Tensor) -> Vec<Vec<f32>> {
        t.to_vec2::<f32>().unwrap()
    }

    #[test]
    fn adds_x_times_delta_transposed_and_merges() {
        let layer = DeltaLinear::new(fixed(), Drops::none());
        let x = Tensor::new(&[[1f32, 1.], [2., -1.]], &Device::Cpu).unwrap();
        let y = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        let out = layer.adapt_output(&base(), &x, y, false).unwrap();
        assert_eq!(rows(&out), vec![vec![4., 8., 12.], vec![1., 3., 5.]]);
        let w = Tensor::ones((3, 2), DType::F32, &Device::Cpu).unwrap();
        let (merged, bias) = layer.merge(&w, None, &w).unwrap();
        assert_eq!(
            rows(&merged),
            vec![vec![2., 3.], vec![4., 5.], vec![6., 7.]]
        );
        assert!(bias.is_none());
        let wrong = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
        assert!(matches!(
            layer.merge(&wrong, None, &wrong),
            Err(PeftError::InvalidState(_))
        ));
    }

    #[test]
    fn module_dropout_one_skips_the_update_in_training_only() {
        let layer = DeltaLinear::new(fixed(), Drops::new(1.0, 0.0, false, 7));
        let x = Tensor::new(&[[1f32, 1.]], &Device::Cpu).unwrap();
        let y = Tensor::ones((1, 3), DType::F32, &Device::Cpu).unwrap();
        let trained = layer.adapt_output(&base(), &x, y.clone(), true).unwrap();
        assert_eq!(rows(&trained), vec![vec![1., 1., 1.]]);
        let eval = layer.adapt_output(&base(), &x, y, false).unwrap();
        assert_eq!(rows(&eval), vec![vec![4., 8., 12.]]);
    }

    #[test]
    fn rank_dropout_zeroes_whole_rows_and_rescales_the_rest() {
        for rescale in [false, true] {
            let layer = DeltaLinear::new(fixed(), Drops::new(0.0, 0.5, rescale, 11));
            let mut seen_partial = false;
            for _ in 0..32 {
                let dw = rows(&layer.training_delta().unwrap());
                let kept: Vec<bool> = dw.iter().map(|r| r[0] != 0.0).collect();
                let n = kept.iter().filter(|k| **k).count();
                let factor = if rescale && n > 0 {
                    3.0 / n as f32
                } else {
                    1.0
                };
                for (i, row) in dw.iter().enumerate() {
                    let want: Vec<f32> = if kept[i] {
                        [2 * i + 1, 2 * i + 2]
                            .iter()
                            .map(|v| *v as f32 * factor)
                            .collect()
                    } else {
                        vec![0.0, 0.0]
                    };
                    for (a, b) in row.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-6, "row {i}: {row:?} vs {want:?}");
                    }
                }
                seen_partial |= n > 0 && n < 3;
            }
            assert!(
                seen_partial,
                "p = 0.5 over 32 draws kept every row or none each time"
            );
        }
    }

    #[test]
    fn transposed_layers_are_refused() {
        let w = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let conv1d = DenseLinear::new_transposed(w, None).unwrap();
        let err = require_linear_layout("h.0.attn.c_attn", &conv1d, "LOHA").unwrap_err();
        assert!(matches!(err, PeftError::UnsupportedModule { .. }), "{err}");
        assert!(err.to_string().contains("h.0.attn.c_attn"));
        assert!(require_linear_layout("q_proj", &base(), "LOHA").is_ok());
    }
}
