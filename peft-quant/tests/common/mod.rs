//! Helpers the quantization tests share.

#![allow(dead_code)] // each test file uses its own subset
#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::path::Path;

use candle_core::Tensor;

/// The stored tensors of a safetensors file, sorted by name: (name, dtype, shape, bytes).
pub fn stored(path: &Path) -> Vec<(String, String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                format!("{:?}", v.dtype()),
                v.shape().to_vec(),
                v.data().to_vec(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Asserts two safetensors files hold the same tensors: names, dtypes, shapes and bytes.
#[track_caller]
pub fn assert_same_tensors(got: &Path, want: &Path, what: &str) {
    let (got, want) = (stored(got), stored(want));
    let names = |v: &[(String, String, Vec<usize>, Vec<u8>)]| {
        v.iter().map(|t| t.0.clone()).collect::<Vec<_>>()
    };
    assert_eq!(names(&got), names(&want), "{what}: tensor names");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!((&g.1, &g.2), (&w.1, &w.2), "{what}: {} dtype/shape", g.0);
        assert!(g.3 == w.3, "{what}: {} bytes differ", g.0);
    }
}

/// Largest absolute difference of two tensors.
pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    peft_quant::merge::max_abs_diff(a, b).unwrap()
}
