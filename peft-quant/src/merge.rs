//! Merging adapters into a quantized base: the base is dequantized, the adapter deltas added
//! in f32, and the result quantized again. Rounding makes the merged model differ from the
//! unmerged one (unlike a dense merge); callers say so and measure by how much
//! ([`max_abs_diff`] of outputs before and after).

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{DType, Tensor};
use peft_core::Result;

static WARNED: AtomicBool = AtomicBool::new(false);

/// Logs, once per process, that merging re-quantizes.
pub fn warn_requantize(format: &str) {
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            "merging into a quantized base ({format}): weights are dequantized, merged and \
             quantized again; rounding changes the outputs slightly (compare before and after)"
        );
    }
}

/// The largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}
