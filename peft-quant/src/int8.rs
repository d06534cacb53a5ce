//! int8 weights, LLM.int8 style (bitsandbytes' `Linear8bitLt`): each row of the weight keeps
//! its absolute maximum (`SCB`) and `round(w * 127 / max)` as int8 (`CB`), computed from the
//! float16 weight as bitsandbytes does. The forward pass quantizes the activations per row the
//! same way and multiplies in integers; with a threshold, activation columns holding a value
//! of at least that magnitude are left out of the integer product and multiplied in f32
//! against the dequantized weight columns (the outlier decomposition).

use std::ops::Range;

use candle_core::{DType, Tensor};
use half::f16;

use peft_core::{PeftError, Result};
use peft_kernels::quant::{self as kernel, QuantWeight};

/// bitsandbytes' `1 / 127` as written in `int8_vectorwise_dequant`.
#[allow(clippy::excessive_precision)]
const INV_127: f32 = 7.874_015_718_698_502e-3;
/// bitsandbytes' `1 / (127 * 127)` as written in `int8_mm_dequant`.
const INV_127_SQ: f32 = 6.200_124e-5;

/// A frozen `[rows, cols]` int8 weight with per-row scales.
#[derive(Debug, Clone)]
pub struct Int8Rowwise {
    rows: usize,
    cols: usize,
    cb: Vec<i8>,
    scb: Vec<f32>,
    threshold: f32,
}

/// Per-row absmax int8 quantization of `values` (`rows` rows), bitsandbytes'
/// `int8_vectorwise_quant` with threshold 0: returns the int8 values and the row maxima.
pub fn vectorwise_quant(values: &[f32], cols: usize) -> (Vec<i8>, Vec<f32>) {
    let mut q = Vec::with_capacity(values.len());
    let mut stats = Vec::with_capacity(values.len() / cols.max(1));
    for row in values.chunks(cols) {
        let m = row.iter().fold(0f32, |m, v| m.max(v.abs()));
        // torch evaluates `127.0 / t` as `reciprocal(t) * 127.0`.
        let s = (1.0 / m) * 127.0;
        q.extend(row.iter().map(|&v| to_i8(v * s)));
        stats.push(m);
    }
    (q, stats)
}

/// torch's `round(x).to(int8)`: half to even; NaN (a zero row) to 0.
#[inline]
fn to_i8(x: f32) -> i8 {
    if x.is_nan() {
        0
    } else {
        x.round_ties_even().clamp(-128.0, 127.0) as i8
    }
}

/// torch's `round` (half to even) in tensor ops: candle's `round` takes halves away from zero.
fn round_half_even(x: &Tensor) -> candle_core::Result<Tensor> {
    let away = x.round()?;
    let tie = (x - x.floor()?)?.eq(0.5)?;
    let even = ((x * 0.5)?.round()? * 2.0)?;
    // A tie rounds to the even one of floor and floor + 1: 2 * round(x / 2) is that one when x
    // / 2 is not itself a tie (x = 2j + 0.5 or 2j + 1.5, never a quarter).
    tie.where_cond(&even, &away)
}

/// Rounds through float16, as bitsandbytes casts weights and activations before quantizing.
fn through_f16(values: &[f32]) -> Vec<f32> {
    values.iter().map(|&v| f16::from_f32(v).to_f32()).collect()
}

impl Int8Rowwise {
    /// Quantizes a row-major `[rows, cols]` weight. `threshold` > 0 turns on the outlier
    /// decomposition of activations in the forward pass (bitsandbytes' default is 6.0).
    pub fn quantize(values: &[f32], rows: usize, cols: usize, threshold: f32) -> Result<Self> {
        if values.len() != rows * cols || rows == 0 || cols == 0 {
            return Err(PeftError::bad_input(
                "int8 quantization",
                format!("a non-empty [{rows}, {cols}] weight"),
                format!("{} values", values.len()),
            ));
        }
        let (cb, scb) = vectorwise_quant(&through_f16(values), cols);
        Self::from_parts(rows, cols, cb, scb, threshold)
    }

    /// Builds from stored parts (`weight` int8 and `SCB` of a bitsandbytes checkpoint).
    pub fn from_parts(
        rows: usize,
        cols: usize,
        cb: Vec<i8>,
        scb: Vec<f32>,
        threshold: f32,
    ) -> Result<Self> {
        if cb.len() != rows * cols || scb.len() != rows {
            return Err(PeftError::bad_input(
                "int8 weight",
                format!("{} values and {rows} row scales", rows * cols),
                format!("{} values and {} row scales", cb.len(), scb.len()),
            ));
        }
        if threshold.is_nan() || threshold < 0.0 {
            return Err(PeftError::bad_input(
                "int8 outlier threshold",
                "a number >= 0",
                threshold.to_string(),
            ));
        }
        Ok(Int8Rowwise {
            rows,
            cols,
            cb,
            scb,
            threshold,
        })
    }

    /// The int8 values (`CB`), row-major.
    pub fn cb(&self) -> &[i8] {
        &self.cb
    }
    /// The row maxima (`SCB`).
    pub fn scb(&self) -> &[f32] {
        &self.scb
    }
    /// The outlier threshold (0: none).
    pub fn threshold(&self) -> f32 {
        self.threshold
    }

    #[inline(always)]
    fn dequantize_generic(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let width = cols.len();
        for (ri, r) in rows.enumerate() {
            let s = self.scb[r];
            let src = &self.cb[r * self.cols + cols.start..r * self.cols + cols.end];
            for (o, &q) in out[ri * width..(ri + 1) * width].iter_mut().zip(src) {
                *o = f32::from(q) * s * INV_127;
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_avx2(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        self.dequantize_generic(rows, cols, out)
    }
}

/// The raw int8 values as f32 (no scale), for the integer product of the forward pass.
#[derive(Debug)]
struct RawInt8<'a>(&'a Int8Rowwise);

impl RawInt8<'_> {
    #[inline(always)]
    fn generic(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let w = self.0;
        let width = cols.len();
        for (ri, r) in rows.enumerate() {
            let src = &w.cb[r * w.cols + cols.start..r * w.cols + cols.end];
            for (o, &q) in out[ri * width..(ri + 1) * width].iter_mut().zip(src) {
                *o = f32::from(q);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        self.generic(rows, cols, out)
    }
}

impl QuantWeight for RawInt8<'_> {
    fn rows(&self) -> usize {
        self.0.rows
    }
    fn cols(&self) -> usize {
        self.0.cols
    }
    fn block_cols(&self) -> usize {
        1
    }
    fn dequantize_into(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if kernel::has_avx2() {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { self.avx2(rows, cols, out) };
            return;
        }
        self.generic(rows, cols, out)
    }
    fn resident_bytes(&self) -> usize {
        0
    }
    fn as_any(&self) -> &dyn std::any::Any
    where
        Self: 'static,
    {
        self
    }
    fn format_name(&self) -> String {
        "int8 (raw)".into()
    }
}

impl QuantWeight for Int8Rowwise {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn block_cols(&self) -> usize {
        1
    }
    fn dequantize_into(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if kernel::has_avx2() {
            // SAFETY: AVX2 and FMA were detected at run time.
            unsafe { self.dequantize_avx2(rows, cols, out) };
            return;
        }
        self.dequantize_generic(rows, cols, out)
    }
    fn resident_bytes(&self) -> usize {
        self.cb.len() + 4 * self.scb.len()
    }
    fn as_any(&self) -> &dyn std::any::Any
    where
        Self: 'static,
    {
        self
    }
    fn format_name(&self) -> String {
        if self.threshold > 0.0 {
            format!("int8 (LLM.int8, outlier threshold {})", self.threshold)
        } else {
            "int8 (LLM.int8)".into()
        }
    }

    /// [`Self::forward`] in candle tensor ops (the portable path, any device): the same
    /// float16 rounding, per-row int8 with torch's half-to-even rounding, outlier columns, and
    /// integer product rescaled by both row maxima; the gradient of `x` is `g W` with the
    /// dequantized `w`, as bitsandbytes' backward gives.
    fn portable_forward(&self, x: &Tensor, w: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dev = x.device();
        let m = x.dim(0)?;
        let x = x.to_dtype(DType::F32)?;
        let xh = x.detach().to_dtype(DType::F16)?.to_dtype(DType::F32)?;
        let zero = xh.zeros_like()?;
        let (a, outliers) = if self.threshold > 0.0 {
            let big = xh.abs()?.ge(f64::from(self.threshold))?;
            let cols = big.to_dtype(DType::F32)?.max_keepdim(0)?;
            (big.where_cond(&zero, &xh)?, Some(cols))
        } else {
            (xh, None)
        };
        let sa = a.abs()?.max_keepdim(1)?;
        // torch: 127 / t is reciprocal(t) * 127; a zero row gives NaN, quantized to 0.
        let scaled = a.broadcast_mul(&(sa.recip()? * 127.0)?)?;
        let scaled = scaled.eq(&scaled)?.where_cond(&scaled, &zero)?;
        let mut q = round_half_even(&scaled)?.clamp(-128f32, 127f32)?;
        if let (Some(cols), true) = (&outliers, m > 1) {
            q = q.broadcast_mul(&(1.0 - cols)?)?;
        }
        let cb: Vec<f32> = self.cb.iter().map(|&v| f32::from(v)).collect();
        let cb = Tensor::from_vec(cb, (self.rows, self.cols), dev)?;
        let scb = Tensor::from_slice(&self.scb, (1, self.rows), dev)?;
        let acc = q.matmul(&cb.t()?)?;
        let mut y = (acc.broadcast_mul(&sa.broadcast_mul(&scb)?)? * f64::from(INV_127_SQ))?;
        if let Some(cols) = &outliers {
            y = (y + x.detach().broadcast_mul(cols)?.matmul(&w.t()?)?)?;
        }
        // The value above, the gradient of x W^T.
        let linear = peft_kernels::linear::frozen_matmul(&x, &w.t()?)?;
        Ok(Some((&linear + (y - linear.detach())?)?))
    }

    /// LLM.int8's forward (bitsandbytes' `MatMul8bitLt`): activations through float16,
    /// per-row int8, the integer product rescaled by both row maxima, outlier columns in f32.
    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let (k, n) = (self.cols, self.rows);
        let xh = through_f16(x);
        let mut outlier_cols: Vec<usize> = Vec::new();
        let mut a = xh.clone();
        if self.threshold > 0.0 {
            let mut is_outlier = vec![false; k];
            for row in xh.chunks(k) {
                for (j, v) in row.iter().enumerate() {
                    if v.abs() >= self.threshold {
                        is_outlier[j] = true;
                    }
                }
            }
            // Values at or over the threshold are zeroed before the row maxima are taken;
            // then whole outlier columns are left out of the integer product.
            for v in a.iter_mut() {
                if v.abs() >= self.threshold {
                    *v = 0.0;
                }
            }
            outlier_cols = (0..k).filter(|&j| is_outlier[j]).collect();
        }
        let (mut qa, sa) = vectorwise_quant(&a, k);
        if m > 1 {
            for row in qa.chunks_mut(k) {
                for &j in &outlier_cols {
                    row[j] = 0;
                }
            }
        }
        let qa_f: Vec<f32> = qa.iter().map(|&q| f32::from(q)).collect();
        let acc = kernel::matmul_xwt(&RawInt8(self), &qa_f, m);
        let mut y = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                // The integer product is exact in f32 up to 2^24, then truncated to int32.
                let prod = acc[i * n + j].trunc();
                y[i * n + j] = prod * (sa[i] * self.scb[j]) * INV_127_SQ;
            }
        }
        if !outlier_cols.is_empty() {
            // y += x[:, C] @ dequant(W)[:, C]^T, in f32.
            let c = outlier_cols.len();
            let mut sub_x = vec![0f32; m * c];
            for i in 0..m {
                for (ci, &j) in outlier_cols.iter().enumerate() {
                    sub_x[i * c + ci] = x[i * k + j];
                }
            }
            let mut sub_w = vec![0f32; n * c];
            for r in 0..n {
                for (ci, &j) in outlier_cols.iter().enumerate() {
                    sub_w[r * c + ci] = f32::from(self.cb[r * k + j]) * self.scb[r] * INV_127;
                }
            }
            kernel::gemm_add_xwt(&sub_x, &sub_w, m, c, n, &mut y);
        }
        y
    }
}
