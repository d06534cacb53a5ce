//! `peft-quant`: quantized frozen base layers for peft-rs.
//!
//! Large bases are kept quantized while adapters train on top of them (QLoRA): int8 with
//! per-row scales and LLM.int8's outlier decomposition ([`int8`]), 4-bit NF4/FP4 in blocks of
//! 64 with double-quantized scales ([`blockwise`]), and GGUF's block formats read straight from
//! a `.gguf` file ([`ggml`]). Each format implements [`QuantWeight`]; [`QuantLinear`] wraps one
//! as a [`peft_core::LinearLike`] slot, so every method (LoRA, IA3, prompt methods) runs on a
//! quantized base without knowing it. The matmul never materialises the f32 weight: it
//! dequantizes tiles with SIMD and multiplies them with `gemm` ([`kernel`]), and its backward
//! gives the input gradient only. The [`factory`] module's base-layer factories build a
//! model's linear layers quantized as the model is declared, for any architecture:
//! from a bitsandbytes checkpoint (what transformers saves for a `BitsAndBytesConfig` model),
//! from a dense checkpoint quantized on load, or from a GGUF file's blocks; [`quantize_model`]
//! swaps an already loaded model's layers; [`checkpoint`] writes bitsandbytes-format folders. Values match bitsandbytes bit for bit
//! (fixtures from `tools/reference/make_quant_fixtures.py`).

pub mod backend;
pub mod blockwise;
mod bnb_tables;
pub mod checkpoint;
pub mod codebook;
pub mod factory;
pub mod ggml;
pub mod int8;
pub use peft_kernels::quant as kernel;
pub mod linear;
pub mod merge;
pub mod model;

pub use blockwise::{Absmax, Blockwise4bit, FourBit};
pub use factory::{BnbCheckpoint, GgufBlocks, QuantizeOnLoad};
pub use int8::Int8Rowwise;
pub use kernel::QuantWeight;
pub use linear::{QuantLinear, QuantScheme};
pub use model::{quantize_model, quantized_layers, QuantReport};

/// A quantize-dequantize round trip of one scheme, for [`peft_core::quantizers`].
fn round_trip(
    scheme: QuantScheme,
    values: &[f32],
    rows: usize,
    cols: usize,
) -> peft_core::Result<Vec<f32>> {
    let q = scheme.quantize(values, rows, cols)?;
    let mut out = vec![0f32; rows * cols];
    q.dequantize_into(0..rows, 0..cols, &mut out);
    Ok(out)
}

/// bitsandbytes' NF4 of a whole tensor, flattened (blocks of 64 may span rows, the last may be
/// partial), as `Params4bit(..., compress_statistics=False)` quantizes it.
fn round_trip_nf4(values: &[f32], _rows: usize, _cols: usize) -> peft_core::Result<Vec<f32>> {
    let code = FourBit::Nf4.code();
    let (q, absmax) = blockwise::quantize_blockwise(values, &code, 64);
    Ok(q.iter()
        .enumerate()
        .map(|(i, &c)| code[usize::from(c)] * absmax[i / 64])
        .collect())
}

fn round_trip_int8(values: &[f32], rows: usize, cols: usize) -> peft_core::Result<Vec<f32>> {
    round_trip(QuantScheme::Int8 { threshold: 0.0 }, values, rows, cols)
}

peft_core::register_quantizer!(peft_core::quantizers::QuantizerRegistration {
    name: "nf4-nodq",
    description: "bitsandbytes NF4, blocks of 64, f32 block maxima (no double quantization)",
    round_trip: round_trip_nf4,
});

peft_core::register_quantizer!(peft_core::quantizers::QuantizerRegistration {
    name: "int8",
    description: "bitsandbytes int8, per-row absmax scales (LLM.int8's weight format)",
    round_trip: round_trip_int8,
});
