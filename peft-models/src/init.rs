//! Tensor sources for model constructors that are not loading a checkpoint: seeded random
//! weights (tests, demos, benchmarks) and shape-only placeholders (counting parameters from a
//! config without allocating the weights).

use candle_core::{DType, Device, Tensor};
use peft_core::Result;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Random weights as transformers initialises them: biases zero, 1-D weights (norm scales)
/// one, everything else normal with standard deviation `std`. Reproducible from `seed`.
pub fn random_source(
    seed: u64,
    std: f32,
    dtype: impl Into<crate::Precision>,
    device: &Device,
) -> impl FnMut(&str, &[usize]) -> Result<Tensor> {
    let precision = dtype.into();
    let mut rng = StdRng::seed_from_u64(seed);
    let device = device.clone();
    move |name: &str, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let data: Vec<f32> = if name.ends_with(".bias") {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else {
            (0..n)
                .map(|_| {
                    let u1: f32 = 1.0 - rng.random::<f32>();
                    let u2: f32 = rng.random::<f32>();
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect()
        };
        Ok(Tensor::from_vec(data, shape, &device)?.to_dtype(precision.dtype_for(shape.len()))?)
    }
}

/// Zero-cost placeholders with the right shapes: one f32 zero broadcast to `shape`. A model
/// built from them can be counted, listed and adapted, but its outputs are meaningless.
pub fn shape_only_source(device: &Device) -> impl FnMut(&str, &[usize]) -> Result<Tensor> {
    let device = device.clone();
    move |_name: &str, shape: &[usize]| {
        Ok(Tensor::zeros((), DType::F32, &device)?.broadcast_as(shape)?)
    }
}
