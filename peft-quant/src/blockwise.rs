//! 4-bit blockwise weights (NF4 and FP4, QLoRA's scheme): each block of `blocksize`
//! consecutive values along a row keeps its absolute maximum; each value keeps the index of
//! the nearest code value after division by it, two indices per byte (first value in the
//! high nibble). With double quantization the block maxima are themselves stored in 8 bits
//! (the dynamic code, blocks of 256, less their mean). Bit for bit what bitsandbytes'
//! `quantize_4bit` / `dequantize_4bit` produce on the same matrix.

use std::ops::Range;

use crate::codebook::{dynamic_map, fp4, Buckets, NF4};
use peft_core::{PeftError, Result};
use peft_kernels::quant::{self as kernel, QuantWeight};

/// Which 4-bit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FourBit {
    /// NormalFloat4 (QLoRA).
    Nf4,
    /// 4-bit float (1 sign, 2 exponent, 1 mantissa bit).
    Fp4,
}

impl FourBit {
    /// The name bitsandbytes uses (`nf4`, `fp4`).
    pub fn name(self) -> &'static str {
        match self {
            FourBit::Nf4 => "nf4",
            FourBit::Fp4 => "fp4",
        }
    }

    /// The 16 code values.
    pub fn code(self) -> [f32; 16] {
        match self {
            FourBit::Nf4 => NF4,
            FourBit::Fp4 => fp4(),
        }
    }
}

/// Block size of the second-level (double) quantization of the block maxima.
pub const NESTED_BLOCKSIZE: usize = 256;

/// How the per-block maxima are stored.
#[derive(Debug, Clone)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// Double quantization: an 8-bit dynamic-code index per block, one f32 scale per 256
    /// blocks, and the mean that was subtracted first.
    Nested {
        /// Per-block index into `code`.
        q: Vec<u8>,
        /// Per group of 256 blocks, the absolute maximum of `absmax - offset`.
        absmax2: Vec<f32>,
        /// The 256-value dynamic code.
        code: Box<[f32; 256]>,
        /// The mean of the block maxima, added back after decoding.
        offset: f32,
    },
}

impl Absmax {
    /// The scale of block `i`.
    #[inline]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Absmax::Plain(v) => v[i],
            Absmax::Nested {
                q,
                absmax2,
                code,
                offset,
            } => code[q[i] as usize] * absmax2[i / NESTED_BLOCKSIZE] + offset,
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        match self {
            Absmax::Plain(v) => 4 * v.len(),
            Absmax::Nested { q, absmax2, .. } => q.len() + 4 * absmax2.len() + 4 * 256 + 4,
        }
    }
}

/// Quantizes `values` blockwise with `code` (bitsandbytes' CPU `quantize_blockwise`):
/// per block the absolute maximum, then each value divided by it mapped to the nearest code
/// index. A last partial block is allowed.
pub fn quantize_blockwise(values: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let buckets = Buckets::new(code);
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / m.max(1e-38);
        q.extend(
            block
                .iter()
                .map(|v| buckets.index((v * inv).clamp(-1.0, 1.0))),
        );
        absmax.push(m);
    }
    (q, absmax)
}

/// A frozen `[rows, cols]` weight in 4-bit blocks.
#[derive(Debug, Clone)]
pub struct Blockwise4bit {
    rows: usize,
    cols: usize,
    blocksize: usize,
    kind: FourBit,
    /// Two indices per byte, row-major.
    packed: Vec<u8>,
    absmax: Absmax,
    /// `pairs[b]` = the two code values byte `b` stands for.
    pairs: Box<[[f32; 2]; 256]>,
}

fn pair_table(code: &[f32; 16]) -> Box<[[f32; 2]; 256]> {
    let mut t = Box::new([[0f32; 2]; 256]);
    for (b, p) in t.iter_mut().enumerate() {
        *p = [code[b >> 4], code[b & 15]];
    }
    t
}

impl Blockwise4bit {
    /// Quantizes a row-major `[rows, cols]` matrix; `cols` must be a multiple of `blocksize`
    /// (so no block straddles two rows), `blocksize` a power of two from 32 to 4096.
    pub fn quantize(
        values: &[f32],
        rows: usize,
        cols: usize,
        kind: FourBit,
        blocksize: usize,
        double_quant: bool,
    ) -> Result<Self> {
        check_shape(rows, cols, blocksize, kind.name())?;
        if values.len() != rows * cols {
            return Err(PeftError::bad_input(
                "4-bit quantization",
                format!("{rows} x {cols} = {} values", rows * cols),
                values.len().to_string(),
            ));
        }
        let code = kind.code();
        let (q, absmax) = quantize_blockwise(values, &code, blocksize);
        let packed = q.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            nest(&absmax)
        } else {
            Absmax::Plain(absmax)
        };
        Ok(Blockwise4bit {
            rows,
            cols,
            blocksize,
            kind,
            packed,
            absmax,
            pairs: pair_table(&code),
        })
    }

    /// Builds from stored parts (a bitsandbytes checkpoint), checking their sizes.
    pub fn from_parts(
        rows: usize,
        cols: usize,
        kind: FourBit,
        blocksize: usize,
        packed: Vec<u8>,
        absmax: Absmax,
    ) -> Result<Self> {
        check_shape(rows, cols, blocksize, kind.name())?;
        let blocks = rows * cols / blocksize;
        if packed.len() != rows * cols / 2 {
            return Err(PeftError::bad_input(
                "4-bit weight data",
                format!("{} bytes for [{rows}, {cols}]", rows * cols / 2),
                format!("{} bytes", packed.len()),
            ));
        }
        let (n_absmax, n_nested) = match &absmax {
            Absmax::Plain(v) => (v.len(), blocks.div_ceil(NESTED_BLOCKSIZE)),
            Absmax::Nested { q, absmax2, .. } => (q.len(), absmax2.len()),
        };
        if n_absmax != blocks || n_nested != blocks.div_ceil(NESTED_BLOCKSIZE) {
            return Err(PeftError::bad_input(
                "4-bit block scales",
                format!(
                    "{blocks} block scales ({} second-level) for [{rows}, {cols}] in blocks of {blocksize}",
                    blocks.div_ceil(NESTED_BLOCKSIZE)
                ),
                format!("{n_absmax} ({n_nested} second-level)"),
            ));
        }
        Ok(Blockwise4bit {
            rows,
            cols,
            blocksize,
            kind,
            packed,
            absmax,
            pairs: pair_table(&kind.code()),
        })
    }

    /// The 4-bit code.
    pub fn kind(&self) -> FourBit {
        self.kind
    }
    /// Values per block.
    pub fn blocksize(&self) -> usize {
        self.blocksize
    }
    /// The packed indices (two per byte, first in the high nibble).
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }
    /// The block scales.
    pub fn absmax(&self) -> &Absmax {
        &self.absmax
    }

    /// Dequantizes one block (`bs / 2` bytes) into `out` with scale `s`.
    #[inline(always)]
    fn block_into(&self, bytes: &[u8], s: f32, out: &mut [f32]) {
        for (o, &b) in out.chunks_exact_mut(2).zip(bytes) {
            let p = self.pairs[b as usize];
            o[0] = p[0] * s;
            o[1] = p[1] * s;
        }
    }

    #[inline(always)]
    fn dequantize_generic(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let width = cols.len();
        let bs = self.blocksize;
        for (ri, r) in rows.enumerate() {
            let row_out = &mut out[ri * width..(ri + 1) * width];
            for (bi, c) in cols.clone().step_by(bs).enumerate() {
                let flat = r * self.cols + c;
                let s = self.absmax.get(flat / bs);
                let bytes = &self.packed[flat / 2..(flat + bs) / 2];
                self.block_into(bytes, s, &mut row_out[bi * bs..(bi + 1) * bs]);
            }
        }
    }

    /// The same tiles with an AVX2 decoder: 16 values per step, each nibble looked up in the
    /// 16-entry code with two in-register permutes and a blend, then scaled (the same f32
    /// product as the portable loop, so the values are identical).
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dequantize_avx2(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        use std::arch::x86_64::*;
        let code = self.kind.code();
        let width = cols.len();
        let bs = self.blocksize;
        // SAFETY: AVX2 is enabled for this function; every load reads 8 bytes inside a block
        // of bs / 2 >= 16 bytes and every store writes 16 floats inside a block of bs >= 32
        // output values (bs is a power of two >= 32, checked at construction).
        unsafe {
            let lo_tbl = _mm256_loadu_ps(code.as_ptr());
            let hi_tbl = _mm256_loadu_ps(code.as_ptr().add(8));
            let fifteen = _mm256_set1_epi32(15);
            let look = |idx: __m256i| {
                let a = _mm256_permutevar8x32_ps(lo_tbl, idx);
                let b = _mm256_permutevar8x32_ps(hi_tbl, idx);
                _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
            };
            for (ri, r) in rows.enumerate() {
                let row_out = out.as_mut_ptr().add(ri * width);
                for (bi, c) in cols.clone().step_by(bs).enumerate() {
                    let flat = r * self.cols + c;
                    let scale = _mm256_set1_ps(self.absmax.get(flat / bs));
                    let src = self.packed.as_ptr().add(flat / 2);
                    let dst = row_out.add(bi * bs);
                    for j in 0..bs / 16 {
                        let w = _mm256_cvtepu8_epi32(_mm_loadl_epi64(src.add(8 * j).cast()));
                        let vh = _mm256_mul_ps(look(_mm256_srli_epi32(w, 4)), scale);
                        let vl = _mm256_mul_ps(look(_mm256_and_si256(w, fifteen)), scale);
                        let t0 = _mm256_unpacklo_ps(vh, vl);
                        let t1 = _mm256_unpackhi_ps(vh, vl);
                        _mm256_storeu_ps(dst.add(16 * j), _mm256_permute2f128_ps(t0, t1, 0x20));
                        _mm256_storeu_ps(dst.add(16 * j + 8), _mm256_permute2f128_ps(t0, t1, 0x31));
                    }
                }
            }
        }
    }
}

/// bitsandbytes' native CPU `quantize_blockwise` with the dynamic code: per block the
/// absolute maximum; each value divided by it goes to the index its measured threshold table
/// gives (its binary search is not plain round-to-nearest; see `bnb_tables.rs`).
pub fn quantize_blockwise_dynamic(values: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let thresholds = crate::bnb_tables::DYNAMIC_THRESHOLD_BITS.map(f32::from_bits);
    let mut q = Vec::with_capacity(values.len());
    let mut absmax = Vec::with_capacity(values.len().div_ceil(blocksize));
    for block in values.chunks(blocksize) {
        let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        q.extend(block.iter().map(|v| {
            let z = v / m;
            if z.is_nan() {
                0
            } else {
                thresholds.partition_point(|&t| t <= z) as u8
            }
        }));
        absmax.push(m);
    }
    (q, absmax)
}

/// Double quantization of block maxima: subtract their mean, quantize blockwise (256) with
/// the dynamic code.
fn nest(absmax: &[f32]) -> Absmax {
    let offset = torch_mean_f32(absmax);
    let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
    let code = dynamic_map();
    let (q, absmax2) = quantize_blockwise_dynamic(&centred, NESTED_BLOCKSIZE);
    Absmax::Nested {
        q,
        absmax2,
        code: Box::new(code),
        offset,
    }
}

/// The mean as torch 2.x computes it for a contiguous float32 vector on an AVX2 CPU
/// (`sum / n`, the sum from `SumKernel.cpp`: 8-lane vectors, four interleaved accumulators, a
/// four-level cascade), so the double-quantization offset equals bitsandbytes' to the bit.
/// Past torch's parallel grain (32,768 blocks) torch splits the sum over threads and the last
/// bit depends on the thread count; this keeps the single-thread order.
pub fn torch_mean_f32(v: &[f32]) -> f32 {
    torch_sum_f32(v) / v.len() as f32
}

const LANES: usize = 8;
const ILP: usize = 4;
const LEVELS: usize = 4;

fn ceil_log2(x: usize) -> usize {
    if x <= 1 {
        0
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// torch's `multi_row_sum`: `size` rows of `ILP` items (each `W` lanes wide) summed with a
/// cascade of `LEVELS` accumulators.
#[allow(clippy::needless_range_loop)] // mirrors torch's loop order exactly
fn multi_row_sum<const W: usize>(
    load: impl Fn(usize, usize) -> [f32; W],
    size: usize,
) -> [[f32; W]; ILP] {
    let level_power = 4.max(ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let add = |a: &mut [f32; W], b: &[f32; W]| {
        for (x, y) in a.iter_mut().zip(b) {
            *x += y;
        }
    };
    let mut acc = [[[0f32; W]; ILP]; LEVELS];
    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for k in 0..ILP {
                add(&mut acc[0][k], &load(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            for k in 0..ILP {
                let lower = acc[j - 1][k];
                add(&mut acc[j][k], &lower);
                acc[j - 1][k] = [0f32; W];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    while i < size {
        for k in 0..ILP {
            add(&mut acc[0][k], &load(i, k));
        }
        i += 1;
    }
    for j in 1..LEVELS {
        for k in 0..ILP {
            let upper = acc[j][k];
            add(&mut acc[0][k], &upper);
        }
    }
    acc[0]
}

/// torch's `row_sum` over `n` items of `W` lanes.
fn row_sum<const W: usize>(load: impl Fn(usize) -> [f32; W], n: usize) -> [f32; W] {
    let size_ilp = n / ILP;
    let mut ps = multi_row_sum(|i, k| load(i * ILP + k), size_ilp);
    for i in size_ilp * ILP..n {
        let v = load(i);
        for (x, y) in ps[0].iter_mut().zip(&v) {
            *x += y;
        }
    }
    for k in 1..ILP {
        let p = ps[k];
        for (x, y) in ps[0].iter_mut().zip(&p) {
            *x += y;
        }
    }
    ps[0]
}

/// torch's float32 sum of a contiguous vector (see [`torch_mean_f32`]).
pub fn torch_sum_f32(v: &[f32]) -> f32 {
    let n = v.len();
    if n < LANES {
        return row_sum(|i| [v[i]], n)[0];
    }
    let vecs = n / LANES;
    let lanes = row_sum(
        |i| {
            let mut a = [0f32; LANES];
            a.copy_from_slice(&v[i * LANES..(i + 1) * LANES]);
            a
        },
        vecs,
    );
    let mut total = 0f32;
    for &x in &v[vecs * LANES..] {
        total += x;
    }
    for x in lanes {
        total += x;
    }
    total
}

fn check_shape(rows: usize, cols: usize, blocksize: usize, what: &str) -> Result<()> {
    if !blocksize.is_power_of_two() || !(32..=4096).contains(&blocksize) {
        return Err(PeftError::bad_input(
            format!("{what} block size"),
            "a power of two from 32 to 4096",
            blocksize.to_string(),
        ));
    }
    if cols == 0 || rows == 0 || !cols.is_multiple_of(blocksize) {
        return Err(PeftError::bad_input(
            format!("{what} quantization of a [{rows}, {cols}] weight"),
            format!("in_features a multiple of the block size {blocksize}"),
            format!("in_features {cols}"),
        ));
    }
    Ok(())
}

impl QuantWeight for Blockwise4bit {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn block_cols(&self) -> usize {
        self.blocksize
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
        self.packed.len() + self.absmax.bytes()
    }
    fn as_any(&self) -> &dyn std::any::Any
    where
        Self: 'static,
    {
        self
    }
    fn format_name(&self) -> String {
        let dq = if matches!(self.absmax, Absmax::Nested { .. }) {
            ", double quant"
        } else {
            ""
        };
        format!("{} (blocks of {}{dq})", self.kind.name(), self.blocksize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 decoder and the portable loop give identical values.
    #[test]
    fn avx2_and_portable_decoders_agree() {
        if !kernel::has_avx2() {
            return;
        }
        let values: Vec<f32> = (0..48 * 256)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 1e-3 * (1.0 + (i % 13) as f32))
            .collect();
        for (kind, bs, dq) in [
            (FourBit::Nf4, 64, true),
            (FourBit::Fp4, 32, false),
            (FourBit::Nf4, 256, false),
        ] {
            let q = Blockwise4bit::quantize(&values, 48, 256, kind, bs, dq).unwrap();
            for (rows, cols) in [(0..48, 0..256), (3..7, bs..256)] {
                let n = rows.len() * cols.len();
                let (mut a, mut b) = (vec![0f32; n], vec![0f32; n]);
                q.dequantize_generic(rows.clone(), cols.clone(), &mut a);
                // SAFETY: AVX2 was detected above.
                unsafe { q.dequantize_avx2(rows, cols, &mut b) };
                assert_eq!(a, b, "{kind:?} blocks of {bs}");
            }
        }
    }
}
