//! CPU kernels for frozen quantized weights. Neither product ever holds the whole f32 weight:
//! the weight is dequantized a tile at a time into a small per-thread buffer (SIMD where the
//! CPU has it, detected at run time) and each tile goes through `gemm`'s matrix kernel.
//!
//! - [`matmul_xwt`]: `y = x W^T` (`x` `[m, k]`, `W` `[n, k]`), tiles of whole weight rows,
//!   threads over output columns;
//! - [`matmul_gw`]: `dx = g W` (`g` `[m, n]`), the gradient with respect to the input, tiles of
//!   weight columns (whole quantization blocks), threads over input columns.

use std::fmt::Debug;
use std::ops::Range;

use rayon::prelude::*;

/// A frozen `[rows, cols]` (`[out, in]`) matrix kept in a quantized format and read back a
/// tile at a time. Implemented by each format (NF4/FP4, int8, GGUF blocks); the kernels and the
/// linear layer only see this trait.
pub trait QuantWeight: Send + Sync + Debug {
    /// Output features.
    fn rows(&self) -> usize;
    /// Input features.
    fn cols(&self) -> usize;
    /// Columns per quantization block: tiles asked of [`QuantWeight::dequantize_into`] start
    /// and end on multiples of it.
    fn block_cols(&self) -> usize;
    /// Writes rows `rows` x columns `cols` as f32 into `out` (row-major, `cols.len()` wide).
    fn dequantize_into(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]);
    /// Bytes the quantized data occupies in memory.
    fn resident_bytes(&self) -> usize;
    /// A short description (`nf4 (blocks of 64, double quant)`).
    fn format_name(&self) -> String;
    /// For downcasting to the concrete format (saving checkpoints).
    fn as_any(&self) -> &dyn std::any::Any
    where
        Self: 'static;
    /// `x W^T` for `x` `[m, cols]` (row-major); formats whose forward pass differs from
    /// "dequantize, then multiply" (LLM.int8) override it.
    fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        matmul_xwt(self, x, m)
    }
    /// The portable forward of a format whose forward is not "dequantize, then multiply":
    /// `x [m, cols]` (f32, any device) times the weight in candle tensor ops, the same values
    /// as [`QuantWeight::forward`], the gradient reaching `x` as through `x W^T` of the
    /// dequantized weight `w` (given `[rows, cols]`, on `x`'s device). `None` (the default)
    /// means the portable path is `x w^T` itself.
    fn portable_forward(
        &self,
        x: &candle_core::Tensor,
        w: &candle_core::Tensor,
    ) -> candle_core::Result<Option<candle_core::Tensor>> {
        let _ = (x, w);
        Ok(None)
    }
}

/// Whether AVX2 and FMA are available (the one probe, [`crate::cpu`]).
pub fn has_avx2() -> bool {
    crate::cpu::has_avx2_fma()
}

/// What runs quantized products here: `portable` (dequantize, then candle's matmul) under
/// `PEFT_KERNELS=portable`, else the tile kernels' `avx2+fma` or `scalar` dequantizing.
pub fn simd_level() -> &'static str {
    if crate::cpu::portable() {
        "portable"
    } else if has_avx2() {
        "avx2+fma"
    } else {
        "scalar"
    }
}

/// Target bytes of one dequantized tile (fits in L2 beside the gemm panels).
const TILE_BYTES: usize = 192 * 1024;

use crate::view::SharedMut;

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]` with explicit strides, on the calling thread: the
/// one gemm entry point, [`crate::gemm::gemm_f32`].
///
/// # Safety
/// The pointers must cover the strided extents given.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_into(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    lhs_rs: usize,
    lhs_cs: usize,
    rhs: *const f32,
    rhs_rs: usize,
    rhs_cs: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe {
        crate::gemm::gemm_f32(
            (m, n, k),
            dst,
            dst_rs,
            accumulate,
            lhs,
            (lhs_rs, lhs_cs),
            rhs,
            (rhs_rs, rhs_cs),
            1.0,
            false,
        )
    }
}

/// Rows of `x` up to which [`matmul_xwt`] takes dot products instead of calling `gemm`
/// (decoding: `gemm` would pack each freshly dequantized tile once more for a single row).
const SMALL_M: usize = 8;

#[inline(always)]
fn dot_generic(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 16;
    let mut acc = [0f32; L];
    let (ca, cb) = (a.chunks_exact(L), b.chunks_exact(L));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    dot_generic(a, b)
}

/// A dot product, vectorised with AVX2 where the CPU has it.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if has_avx2() {
        // SAFETY: AVX2 and FMA were detected at run time.
        return unsafe { dot_avx2(a, b) };
    }
    dot_generic(a, b)
}

/// `y = x W^T` for a few rows of `x`: tiles of 32 weight rows decoded into L1 and dotted.
fn matmul_xwt_small<W: QuantWeight + ?Sized>(w: &W, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, k) = (w.rows(), w.cols());
    const TILE: usize = 32;
    let tiles: Vec<usize> = (0..n).step_by(TILE).collect();
    let dst = SharedMut(y.as_mut_ptr());
    let work = |&r0: &usize| {
        let r1 = (r0 + TILE).min(n);
        let mut buf = vec![0f32; (r1 - r0) * k];
        w.dequantize_into(r0..r1, 0..k, &mut buf);
        let dst = &dst;
        for i in 0..m {
            let xi = &x[i * k..(i + 1) * k];
            for (j, row) in buf.chunks_exact(k).enumerate() {
                // SAFETY: this tile writes y[i, r0 + j] for its own rows only.
                unsafe { *dst.get().add(i * n + r0 + j) = dot(xi, row) };
            }
        }
    };
    if tiles.len() > 1 && rayon::current_num_threads() > 1 {
        tiles.par_iter().for_each(work);
    } else {
        tiles.iter().for_each(work);
    }
}

/// `y = x W^T`: `x` `[m, k]` row-major, result `[m, n]`.
pub fn matmul_xwt<W: QuantWeight + ?Sized>(w: &W, x: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(x.len(), m * k, "matmul_xwt: x is not [m, k]");
    let mut y = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return y;
    }
    if m <= SMALL_M {
        matmul_xwt_small(w, x, m, &mut y);
        return y;
    }
    let tile_rows = (TILE_BYTES / (4 * k)).clamp(8, 256).min(n);
    let tiles: Vec<usize> = (0..n).step_by(tile_rows).collect();
    let dst = SharedMut(y.as_mut_ptr());
    let work = |&r0: &usize| {
        let r1 = (r0 + tile_rows).min(n);
        let mut buf = vec![0f32; (r1 - r0) * k];
        w.dequantize_into(r0..r1, 0..k, &mut buf);
        let dst = &dst;
        // SAFETY: this tile writes columns r0..r1 of y only; buf is [r1-r0, k] row-major,
        // read as the [k, r1-r0] matrix W_tile^T.
        unsafe {
            gemm_into(
                m,
                r1 - r0,
                k,
                dst.get().add(r0),
                n,
                false,
                x.as_ptr(),
                k,
                1,
                buf.as_ptr(),
                1,
                k,
            );
        }
    };
    if tiles.len() > 1 && rayon::current_num_threads() > 1 {
        tiles.par_iter().for_each(work);
    } else {
        tiles.iter().for_each(work);
    }
    y
}

/// `dx = g W`: `g` `[m, n]` row-major, result `[m, k]` (the input gradient of `x W^T`).
pub fn matmul_gw<W: QuantWeight + ?Sized>(w: &W, g: &[f32], m: usize) -> Vec<f32> {
    let (n, k) = (w.rows(), w.cols());
    assert_eq!(g.len(), m * n, "matmul_gw: g is not [m, n]");
    let mut dx = vec![0f32; m * k];
    if m == 0 || k == 0 {
        return dx;
    }
    let bc = w.block_cols().max(1);
    // Column chunks of whole blocks; row chunks keep the tile within TILE_BYTES.
    let chunk_cols = (256 / bc).max(1) * bc;
    let chunk_cols = chunk_cols.min(k.div_ceil(bc) * bc);
    let tile_rows = (TILE_BYTES / (4 * chunk_cols)).max(16);
    let chunks: Vec<usize> = (0..k).step_by(chunk_cols).collect();
    let dst = SharedMut(dx.as_mut_ptr());
    let work = |&c0: &usize| {
        let c1 = (c0 + chunk_cols).min(k);
        let width = c1 - c0;
        let mut buf = vec![0f32; tile_rows.min(n) * width];
        let dst = &dst;
        for (t, r0) in (0..n).step_by(tile_rows).enumerate() {
            let r1 = (r0 + tile_rows).min(n);
            let tile = &mut buf[..(r1 - r0) * width];
            w.dequantize_into(r0..r1, c0..c1, tile);
            // SAFETY: this chunk writes columns c0..c1 of dx only; g[:, r0..r1] is read with
            // row stride n; the tile is [r1-r0, width] row-major.
            unsafe {
                gemm_into(
                    m,
                    width,
                    r1 - r0,
                    dst.get().add(c0),
                    k,
                    t > 0,
                    g.as_ptr().add(r0),
                    n,
                    1,
                    tile.as_ptr(),
                    width,
                    1,
                );
            }
        }
    };
    if chunks.len() > 1 && rayon::current_num_threads() > 1 {
        chunks.par_iter().for_each(work);
    } else {
        chunks.iter().for_each(work);
    }
    dx
}

/// `y[m, n] += x[m, c] * w[n, c]^T` for small dense operands (LLM.int8's outlier columns).
pub fn gemm_add_xwt(x: &[f32], w: &[f32], m: usize, c: usize, n: usize, y: &mut [f32]) {
    assert!(x.len() == m * c && w.len() == n * c && y.len() == m * n);
    // SAFETY: the three slices have exactly the extents described.
    unsafe {
        gemm_into(
            m,
            n,
            c,
            y.as_mut_ptr(),
            n,
            true,
            x.as_ptr(),
            c,
            1,
            w.as_ptr(),
            1,
            c,
        );
    }
}
