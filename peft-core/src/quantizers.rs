//! Weight quantizers other crates provide (the quantization crate registers its formats), for
//! methods whose initialisation needs a quantize-dequantize round trip (LoRA's LoftQ) without
//! depending on the crate that implements the format. Registered through
//! [`register_quantizer!`](crate::register_quantizer); looked up by name.

use crate::error::{PeftError, Result};

/// Quantizes a row-major `[rows, cols]` f32 matrix and returns its dequantized values.
pub type RoundTripFn = fn(&[f32], usize, usize) -> Result<Vec<f32>>;

/// One registered quantizer.
#[derive(Debug)]
pub struct QuantizerRegistration {
    /// Its name (`nf4-nodq`, `int8`).
    pub name: &'static str,
    /// One line saying what it does.
    pub description: &'static str,
    /// The round trip.
    pub round_trip: RoundTripFn,
}

inventory::collect!(QuantizerRegistration);

/// Registers a quantizer, at module level.
#[macro_export]
macro_rules! register_quantizer {
    ($registration:expr) => {
        $crate::inventory::submit! { $registration }
    };
}

/// The names of the registered quantizers.
pub fn available_quantizers() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = inventory::iter::<QuantizerRegistration>
        .into_iter()
        .map(|r| r.name)
        .collect();
    names.sort_unstable();
    names
}

/// `values` (`[rows, cols]`) quantized with the quantizer `name` and dequantized again.
pub fn round_trip(name: &str, values: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>> {
    let reg = inventory::iter::<QuantizerRegistration>
        .into_iter()
        .find(|r| r.name == name)
        .ok_or_else(|| {
            PeftError::InvalidState(format!(
                "no quantizer `{name}` in this build (registered: {}); link the quantization \
                 crate (`peft-quant`, the `quant` feature of `peft`)",
                available_quantizers().join(", ")
            ))
        })?;
    let out = (reg.round_trip)(values, rows, cols)?;
    if out.len() != values.len() {
        return Err(PeftError::InvalidState(format!(
            "quantizer `{name}` returned {} values for a [{rows}, {cols}] matrix",
            out.len()
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unknown_quantizer_is_a_clear_error() {
        let err = super::round_trip("no-such-format", &[1.0], 1, 1)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no-such-format") && err.contains("peft-quant"),
            "{err}"
        );
    }
}
