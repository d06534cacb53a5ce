//! The one f32 matrix-product entry point ([`gemm_f32`]: this crate's [`crate::sgemm`] where
//! the CPU has AVX2 and FMA, else the `gemm` crate) and the product against a frozen weight
//! kept in f32 or bf16 ([`frozen_product`]).

use candle_core::{DType, Tensor};

use crate::view::with_f32s;

/// `dst[m, n] (+)= alpha * lhs[m, k] rhs[k, n]` in f32 ([`crate::sgemm`] where the CPU has AVX2
/// and FMA, else the `gemm` crate); `dst` has row stride `dst_rs` (columns contiguous), `lhs`
/// and `rhs` are given by (row, column) strides.
/// `parallel` spreads one product over rayon's threads (else it runs on the calling thread).
///
/// # Safety
/// The pointers and strides must address valid `m x k`, `k x n` and `m x n` regions, and no
/// other thread may write `dst`'s region meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_f32(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    lhs: *const f32,
    (l_rs, l_cs): (usize, usize),
    rhs: *const f32,
    (r_rs, r_cs): (usize, usize),
    alpha: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads();
    #[cfg(target_arch = "x86_64")]
    if crate::sgemm::available() {
        let a = crate::sgemm::Operand {
            ptr: lhs,
            rs: l_rs,
            cs: l_cs,
        };
        let b = crate::sgemm::Rhs::F32(crate::sgemm::Operand {
            ptr: rhs,
            rs: r_rs,
            cs: r_cs,
        });
        // SAFETY: the caller's contract; the CPU check above.
        unsafe {
            crate::sgemm::sgemm(
                (m, n, k),
                dst,
                dst_rs,
                accumulate,
                a,
                b,
                alpha,
                if parallel { threads } else { 1 },
            )
        };
        return;
    }
    let parallelism = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs,
            l_cs as isize,
            l_rs as isize,
            rhs,
            r_cs as isize,
            r_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// The one "is this a frozen dense CPU layer weight" predicate: a 2-D weight on the CPU,
/// stored f32 or bf16 (widened to f32 as the products go; see [`frozen_product`]), not tracked
/// by autograd (its gradient is never needed), with the fused kernels switched on.
pub fn is_frozen_cpu_matrix(weight: &Tensor) -> bool {
    crate::cpu::fused(&[weight])
        && matches!(weight.dtype(), DType::F32 | DType::BF16)
        && weight.rank() == 2
        && !weight.is_variable()
        && !weight.track_op()
}

/// Stored bf16 rows widened at a time: about 4 MB of f32, so that a block stays in cache
/// between its conversion and its use, and a vocabulary-sized head never exists in f32.
const WIDEN_BLOCK_ELEMS: usize = 1 << 20;

/// `dst[m, N] (+)= x[m, K] op(W)` for a frozen matrix `W` stored `d0 x d1` (row-major), where
/// `op(W)` is `W` (`K = d0`, `N = d1`) when `plain`, else `W^T` (`K = d1`, `N = d0`); `dst` is
/// `[m, N]` row-major and `accumulate` adds to what it holds. An f32 `W` is one product read in
/// place. A bf16 `W` (frozen weights kept in half the memory while the arithmetic stays f32)
/// is widened by [`crate::sgemm`] as it packs each panel (no f32 copy of `W` at all), or, on a
/// CPU without AVX2, a block of stored rows at a time into one reused buffer; each block is a
/// slice of `K` (its partial products summed into `dst`) or of `N` (its columns of `dst`).
pub fn frozen_product(
    weight: &Tensor,
    plain: bool,
    x: &[f32],
    m: usize,
    dst: &mut [f32],
    accumulate: bool,
    what: &str,
) -> candle_core::Result<()> {
    frozen_product_in_blocks(weight, plain, x, m, dst, accumulate, what, None)
}

/// [`frozen_product`]; `block_elems` `Some(n)` widens a bf16 `W` about `n` values at a time
/// (the fallback, forced by tests), `None` lets [`crate::sgemm`] widen it while packing where the
/// CPU allows, else blocks of [`WIDEN_BLOCK_ELEMS`].
#[allow(clippy::too_many_arguments)]
fn frozen_product_in_blocks(
    weight: &Tensor,
    plain: bool,
    x: &[f32],
    m: usize,
    dst: &mut [f32],
    accumulate: bool,
    what: &str,
    block_elems: Option<usize>,
) -> candle_core::Result<()> {
    let (d0, d1) = weight.dims2()?;
    let (k, n) = if plain { (d0, d1) } else { (d1, d0) };
    if x.len() != m * k || dst.len() != m * n {
        candle_core::bail!(
            "{what}: expected a [{m}, {k}] input and a [{m}, {n}] output for a {d0}x{d1} weight"
        );
    }
    // One block of rows [r0, r0 + rows) of W, as f32, into dst.
    let block = |r0: usize, rows: usize, w: &[f32], dst: &mut [f32]| {
        // SAFETY: w holds rows x d1 values; x is [m, k] and dst [m, n] (checked above); the
        // offsets r0 + rows <= d0 stay within x's K (plain) or dst's N (not plain).
        unsafe {
            if plain {
                gemm_f32(
                    (m, n, rows),
                    dst.as_mut_ptr(),
                    n,
                    accumulate || r0 > 0,
                    x.as_ptr().add(r0),
                    (k, 1),
                    w.as_ptr(),
                    (d1, 1),
                    1.0,
                    true,
                );
            } else {
                gemm_f32(
                    (m, rows, k),
                    dst.as_mut_ptr().add(r0),
                    n,
                    accumulate,
                    x.as_ptr(),
                    (k, 1),
                    w.as_ptr(),
                    (1, d1),
                    1.0,
                    true,
                );
            }
        }
    };
    if weight.dtype() == DType::F32 {
        return with_f32s([weight], what, |[w]| {
            block(0, d0, w, dst);
            Ok(())
        });
    }
    let (guard, layout) = weight.storage_and_layout();
    let candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(data)) = &*guard else {
        candle_core::bail!(
            "{what}: expected an f32 or bf16 CPU weight, found {:?}",
            weight.dtype()
        );
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{what}: expected a contiguous weight");
    };
    let data = &data[start..end];
    #[cfg(target_arch = "x86_64")]
    if block_elems.is_none() && crate::sgemm::available() {
        use crate::sgemm::{Operand, Rhs};
        // op(W) = W^T of a row-major [d0, d1] W reads its column j as W's row j.
        let (rs, cs) = if plain { (d1, 1) } else { (1, d1) };
        let b = Rhs::Bf16 {
            ptr: data.as_ptr(),
            rs,
            cs,
        };
        // SAFETY: x is [m, k] and dst [m, n] (checked above); W is d0 x d1 contiguous; the CPU
        // checked.
        unsafe {
            crate::sgemm::sgemm(
                (m, n, k),
                dst.as_mut_ptr(),
                n,
                accumulate,
                Operand {
                    ptr: x.as_ptr(),
                    rs: k,
                    cs: 1,
                },
                b,
                1.0,
                rayon::current_num_threads(),
            );
        }
        return Ok(());
    }
    let block_elems = block_elems.unwrap_or(WIDEN_BLOCK_ELEMS);
    let rows_per_block = (block_elems / d1.max(1)).clamp(1, d0.max(1));
    let mut buf = vec![0f32; rows_per_block * d1];
    let mut r0 = 0;
    while r0 < d0 {
        let rows = rows_per_block.min(d0 - r0);
        let w = &mut buf[..rows * d1];
        crate::vmath::widen_bf16(&data[r0 * d1..(r0 + rows) * d1], w);
        block(r0, rows, w, dst);
        r0 += rows;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{with_mode, KernelMode};
    use candle_core::Device;

    /// A bf16 weight under f32 activations: the ops compute in f32 on the widened weight, the
    /// same numbers as an f32 weight holding the bf16 values, whatever the block size (blocks
    /// that split K, that split N, ragged last blocks, or none: `sgemm` widening as it packs),
    /// with and without accumulation.
    #[test]
    fn bf16_weights_compute_as_their_f32_values() -> candle_core::Result<()> {
        with_mode(KernelMode::Fused, || -> candle_core::Result<()> {
            let dev = Device::Cpu;
            let (m, d0, d1) = (6, 13, 9);
            let w16 = Tensor::randn(0f32, 1.0, (d0, d1), &dev)?.to_dtype(DType::BF16)?;
            let w32 = w16.to_dtype(DType::F32)?;
            for plain in [false, true] {
                let (k, n) = if plain { (d0, d1) } else { (d1, d0) };
                let x: Vec<f32> = (0..m * k)
                    .map(|i| ((i * 7 % 11) as f32 - 5.0) / 3.0)
                    .collect();
                let start: Vec<f32> = (0..m * n).map(|i| (i % 5) as f32).collect();
                for accumulate in [false, true] {
                    let mut want = start.clone();
                    frozen_product_in_blocks(
                        &w32,
                        plain,
                        &x,
                        m,
                        &mut want,
                        accumulate,
                        "test",
                        Some(1 << 20),
                    )?;
                    for block in [1, d1, 2 * d1 + 3, 5 * d1, 1 << 20] {
                        let mut got = start.clone();
                        frozen_product_in_blocks(
                            &w16,
                            plain,
                            &x,
                            m,
                            &mut got,
                            accumulate,
                            "test",
                            Some(block),
                        )?;
                        let d = got
                            .iter()
                            .zip(&want)
                            .map(|(a, b)| (a - b).abs())
                            .fold(0f32, f32::max);
                        assert!(
                            d < 1e-5,
                            "plain {plain} accumulate {accumulate} block {block}: {d}"
                        );
                    }
                    // The path frozen_product takes (on AVX2 CPUs, widening while packing).
                    let mut got = start.clone();
                    frozen_product(&w16, plain, &x, m, &mut got, accumulate, "test")?;
                    let d = got
                        .iter()
                        .zip(&want)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    assert!(
                        d < 1e-5,
                        "plain {plain} accumulate {accumulate} frozen_product: {d}"
                    );
                }
            }
            Ok(())
        })
    }
}
