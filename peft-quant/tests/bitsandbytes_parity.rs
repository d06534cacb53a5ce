//! peft-quant against bitsandbytes 0.50.2 (CPU backend) on the same matrices.
//! Reference: tools/reference/make_quant_fixtures.py (`blockwise()`), which runs
//! `quantize_4bit` / `dequantize_4bit` / `matmul_4bit`, `int8_vectorwise_quant` and
//! MatMul8bitLt's forward ops and stores what they return.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::LinearLike;
use peft_quant::codebook::dynamic_map;
use peft_quant::{
    Absmax, Blockwise4bit, FourBit, Int8Rowwise, QuantLinear, QuantScheme, QuantWeight,
};

type R = Result<(), Box<dyn std::error::Error>>;

fn fixtures() -> HashMap<String, Tensor> {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/blockwise.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).expect("blockwise fixture")
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn u8s(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn max_rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

/// Asserts equality, reporting the number of differing entries and the first few.
fn assert_same<T: PartialEq + std::fmt::Debug>(got: &[T], want: &[T], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let bad: Vec<(usize, &T, &T)> = got
        .iter()
        .zip(want)
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, (a, b))| (i, a, b))
        .collect();
    assert!(
        bad.is_empty(),
        "{what}: {} of {} differ, first (index, got, want): {:?}",
        bad.len(),
        got.len(),
        &bad[..bad.len().min(5)]
    );
}

fn dequantized(w: &dyn QuantWeight) -> Vec<f32> {
    let mut out = vec![0f32; w.rows() * w.cols()];
    w.dequantize_into(0..w.rows(), 0..w.cols(), &mut out);
    out
}

#[test]
fn dynamic_map_is_bitsandbytes() {
    let fx = fixtures();
    assert_same(&dynamic_map(), &f32s(&fx["dynamic_map"]), "dynamic map");
}

#[test]
fn four_bit_quantization_matches_value_for_value() -> R {
    let fx = fixtures();
    let w = &fx["nf4.w"];
    let (rows, cols) = w.dims2()?;
    let values = f32s(w);
    for (tag, kind, blocksize, dq) in [
        ("nf4.dq", FourBit::Nf4, 64, true),
        ("nf4.plain", FourBit::Nf4, 64, false),
        ("nf4.b128", FourBit::Nf4, 128, false),
        ("fp4.dq", FourBit::Fp4, 64, true),
    ] {
        let q = Blockwise4bit::quantize(&values, rows, cols, kind, blocksize, dq)?;
        let want_packed = u8s(&fx[&format!("{tag}.packed")]);
        assert_same(q.packed(), &want_packed, &format!("{tag} packed"));
        if let Some(absmax) = fx.get(&format!("{tag}.absmax")) {
            match q.absmax() {
                Absmax::Plain(v) => assert_same(v, &f32s(absmax), &format!("{tag} absmax")),
                Absmax::Nested {
                    q: codes,
                    absmax2,
                    offset,
                    ..
                } => {
                    assert_same(codes, &u8s(absmax), &format!("{tag} 8-bit absmax codes"));
                    assert_same(absmax2, &f32s(&fx[&format!("{tag}.nested_absmax")]), tag);
                    assert_eq!(
                        *offset,
                        f32s(&fx[&format!("{tag}.offset")])[0],
                        "{tag} offset"
                    );
                }
            }
        }
        let got = dequantized(&q);
        let want = f32s(&fx[&format!("{tag}.deq")]);
        assert_same(&got, &want, &format!("{tag} dequantized"));
    }
    Ok(())
}

#[test]
fn nf4_linear_matches_matmul_4bit() -> R {
    let fx = fixtures();
    let layer = QuantLinear::quantize(&fx["nf4.w"], None, false, QuantScheme::NF4)?;
    let y = layer.forward(&fx["nf4.x"])?;
    let err = max_rel(&f32s(&y), &f32s(&fx["nf4.y"]));
    assert!(err < 1e-4, "max relative error {err}");
    Ok(())
}

#[test]
fn int8_quantization_and_llm_int8_forward_match() -> R {
    let fx = fixtures();
    let w = &fx["int8.w"];
    let (rows, cols) = w.dims2()?;
    let q = Int8Rowwise::quantize(&f32s(w), rows, cols, 0.0)?;
    let want_cb: Vec<i8> = fx["int8.cb"]
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&v| v as i8)
        .collect();
    assert_same(q.cb(), &want_cb, "int8 CB");
    assert_same(q.scb(), &f32s(&fx["int8.scb"]), "int8 SCB");
    assert_same(&dequantized(&q), &f32s(&fx["int8.deq"]), "int8 dequantized");
    for threshold in [0.0f32, 6.0] {
        let layer = QuantLinear::quantize(
            w,
            Some(fx["int8.bias"].clone()),
            false,
            QuantScheme::Int8 { threshold },
        )?;
        let y = layer.forward(&fx["int8.x"])?;
        let want = f32s(&fx[&format!("int8.y_t{}", threshold as i32)]);
        let err = max_rel(&f32s(&y), &want);
        assert!(
            err < 1e-5,
            "threshold {threshold}: max relative error {err}"
        );
    }
    Ok(())
}

#[test]
fn shapes_that_do_not_fit_the_blocks_are_refused() {
    let values = vec![0.5f32; 4 * 100];
    let err = Blockwise4bit::quantize(&values, 4, 100, FourBit::Nf4, 64, true).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("multiple of the block size 64") && msg.contains("100"),
        "{msg}"
    );
    let err = Blockwise4bit::quantize(&values, 4, 100, FourBit::Nf4, 48, true).unwrap_err();
    assert!(err.to_string().contains("power of two"), "{err}");
    let err = Blockwise4bit::quantize(&values[..10], 4, 64, FourBit::Nf4, 64, true).unwrap_err();
    assert!(err.to_string().contains("256 values"), "{err}");
    let err = Int8Rowwise::quantize(&values, 4, 100, f32::NAN).unwrap_err();
    assert!(err.to_string().contains("threshold"), "{err}");
    let layer = QuantLinear::quantize(
        &Tensor::ones((8, 64), DType::F32, &Device::Cpu).unwrap(),
        None,
        false,
        QuantScheme::NF4,
    )
    .unwrap();
    let err = layer
        .forward(&Tensor::ones((2, 63), DType::F32, &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(err.to_string().contains("64"), "{err}");
}

/// Kernels against a dense product of the dequantized weight, over awkward shapes.
#[test]
fn tiled_kernels_equal_dense_products() -> R {
    let dev = Device::Cpu;
    for &(m, n, k) in &[
        (1, 7, 64),
        (3, 300, 128),
        (37, 65, 192),
        (130, 513, 256),
        (5, 40, 1024),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?;
        let g = Tensor::randn(0f32, 1.0, (m, n), &dev)?;
        for scheme in [QuantScheme::NF4, QuantScheme::Int8 { threshold: 0.0 }] {
            let layer = QuantLinear::quantize(&w, None, false, scheme)?;
            let qw: Arc<dyn QuantWeight> = Arc::clone(layer.quant_weight());
            let deq = Tensor::from_vec(dequantized(qw.as_ref()), (n, k), &dev)?;
            let dx = peft_quant::kernel::matmul_gw(qw.as_ref(), &f32s(&g), m);
            let want_dx = f32s(&g.matmul(&deq)?);
            assert!(max_rel(&dx, &want_dx) < 1e-4, "g W ({m},{n},{k}) {scheme}");
            if matches!(scheme, QuantScheme::FourBit { .. }) {
                let y = peft_quant::kernel::matmul_xwt(qw.as_ref(), &f32s(&x), m);
                let want = f32s(&x.matmul(&deq.t()?)?);
                assert!(max_rel(&y, &want) < 1e-4, "x W^T ({m},{n},{k})");
            }
        }
    }
    Ok(())
}

/// The input gradient through a quantized layer equals the dense one of its dequantized weight.
#[test]
fn backward_gives_the_input_gradient() -> R {
    let dev = Device::Cpu;
    let w = Tensor::randn(0f32, 1.0, (96, 128), &dev)?;
    let layer = QuantLinear::quantize(&w, None, false, QuantScheme::NF4)?;
    let deq = layer.weight()?;
    let x = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 128), &dev)?)?;
    let loss = layer.forward(x.as_tensor())?.sqr()?.sum_all()?;
    let grads = loss.backward()?;
    let got = grads.get(x.as_tensor()).expect("input gradient");
    let dense = x.as_tensor().broadcast_matmul(&deq.t()?)?;
    let want = (dense * 2.0)?.broadcast_matmul(&deq)?;
    assert!(max_rel(&f32s(got), &f32s(&want)) < 1e-4);
    Ok(())
}

#[test]
fn nested_quantizer_thresholds_are_the_measured_ones() {
    let fx = fixtures();
    assert_same(
        &peft_quant::codebook::dynamic_thresholds(),
        &f32s(&fx["dynamic_thresholds"]),
        "thresholds",
    );
}

/// Resident size of the frozen weights on SmolLM2's shapes: NF4 with double quantization at
/// most 0.57 bytes per parameter, int8 at most 1.02.
#[test]
fn resident_bytes_per_parameter() {
    for (rows, cols) in [(576, 576), (1536, 576), (576, 1536), (192, 576)] {
        let w = Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).unwrap();
        let per_param = |scheme| {
            let l = QuantLinear::quantize(&w, None, false, scheme).unwrap();
            l.resident_bytes() as f64 / (rows * cols) as f64
        };
        let nf4 = per_param(QuantScheme::NF4);
        let int8 = per_param(QuantScheme::INT8);
        assert!(nf4 <= 0.57, "[{rows}, {cols}] NF4: {nf4} bytes/param");
        assert!(int8 <= 1.02, "[{rows}, {cols}] int8: {int8} bytes/param");
    }
}

/// Tiles (as the kernels ask for them) equal the same region of the whole dequantized matrix.
#[test]
fn tiles_equal_the_whole() {
    let w = Tensor::randn(0f32, 1.0, (37, 256), &Device::Cpu).unwrap();
    for scheme in [
        QuantScheme::NF4,
        QuantScheme::parse("fp4-nodq").unwrap(),
        QuantScheme::INT8,
    ] {
        let l = QuantLinear::quantize(&w, None, false, scheme).unwrap();
        let q = l.quant_weight();
        let full = dequantized(q.as_ref());
        // Tiles of rows and of whole blocks of columns, as the kernels ask for them.
        for (r0, r1, c0, c1) in [(0, 37, 0, 256), (5, 9, 64, 192), (36, 37, 128, 256)] {
            let mut tile = vec![0f32; (r1 - r0) * (c1 - c0)];
            q.dequantize_into(r0..r1, c0..c1, &mut tile);
            for r in r0..r1 {
                assert_eq!(
                    &tile[(r - r0) * (c1 - c0)..(r - r0 + 1) * (c1 - c0)],
                    &full[r * 256 + c0..r * 256 + c1],
                    "{scheme}: row {r}"
                );
            }
        }
    }
    assert_eq!(
        peft_quant::kernel::simd_level(),
        if peft_kernels::portable() {
            "portable"
        } else if peft_quant::kernel::has_avx2() {
            "avx2+fma"
        } else {
            "scalar"
        }
    );
}
