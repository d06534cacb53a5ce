//! `peft-kernels`: every fused CPU kernel of peft-rs, in one place.
//!
//! - [`cpu`]: the one CPU feature probe, and the switch to the portable path
//!   (`PEFT_KERNELS=portable`, or any tensor off the CPU);
//! - [`view`]: reading tensors' CPU values in place (contiguous slices, strided 4-D views);
//! - [`gemm`]: the one f32 product entry point and the product against a frozen f32/bf16
//!   weight; [`sgemm`], the blocked AVX2/AVX-512 kernel behind it;
//! - [`vmath`]: vectorised `exp`, SiLU and bf16 widening;
//! - [`linear`]: the frozen-weight matmul (input gradient only) and DoRA's feature scaling;
//! - [`loss`]: the fused cross-entropy and the fused output head + cross-entropy;
//! - [`nn`]: softmax, RMS norm and batched matmuls with their backward passes;
//! - [`attention`]: the fused attention, rotary embedding and SwiGLU;
//! - [`quant`]: the tile-dequantizing products of frozen quantized weights.
//!
//! Every entry point that runs a fused op returns `None` (or takes its own op chain) where the
//! op does not apply: a tensor on another device, another dtype, a shape it does not handle,
//! or the portable mode. The callers (`peft-core`'s layers and losses, `peft-models`' ops,
//! `peft-quant`'s layers) then run the same computation as candle tensor ops, which candle
//! runs on CUDA and Metal and differentiates itself.

pub mod attention;
pub mod cpu;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod nn;
pub mod quant;
#[cfg(target_arch = "x86_64")]
pub mod sgemm;
pub mod view;
pub mod vmath;

pub use cpu::{fused, fused_f32, portable, with_mode, KernelMode};

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::{with_mode, KernelMode};

    /// In the portable mode no fused op runs, even on CPU f32 tensors the kernels handle.
    #[test]
    fn the_portable_mode_turns_every_fused_op_off() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3, 8), &dev)?;
        let w = Tensor::randn(0f32, 1.0, (4, 8), &dev)?;
        let norm = Tensor::ones(8, DType::F32, &dev)?;
        let q = Tensor::randn(0f32, 1.0, (1, 2, 3, 4), &dev)?;
        let cos = Tensor::ones((3, 4), DType::F32, &dev)?;
        let all_none = || -> candle_core::Result<Vec<bool>> {
            Ok(vec![
                crate::linear::frozen_linear_forward(&x, &w, false)?.is_none(),
                crate::nn::softmax_last_dim(&x)?.is_none(),
                crate::nn::rms_norm(&x, &norm, 1e-6)?.is_none(),
                crate::nn::batched_matmul(&x, &x.transpose(1, 2)?)?.is_none(),
                crate::attention::attention(&q, &q, &q, 0.5, None)?.is_none(),
                crate::attention::rope_heads(&x, 2, &cos, &cos)?.is_none(),
                crate::attention::swiglu(&x, &x)?.is_none(),
                crate::loss::cross_entropy(&x.flatten_to(1)?, vec![0; 6].into(), 6)?.is_none(),
                !crate::gemm::is_frozen_cpu_matrix(&w),
            ])
        };
        let portable = with_mode(KernelMode::Portable, all_none)?;
        assert!(portable.iter().all(|&none| none), "{portable:?}");
        let fused = with_mode(KernelMode::Fused, all_none)?;
        assert!(fused.iter().all(|&none| !none), "{fused:?}");
        Ok(())
    }
}
