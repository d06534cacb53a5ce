//! GGUF/GGML block formats used directly as frozen weights: the bytes of a `.gguf` tensor are
//! kept as stored, and tiles are decoded with candle's per-format block decoders when the
//! kernels ask for them. Rows can be permuted (whole rows of blocks move), which is how
//! llama.cpp's q/k permutation is undone without dequantizing.

use std::ops::Range;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use half::{bf16, f16};
use peft_core::{PeftError, Result};

use peft_kernels::quant::QuantWeight;

/// A `[rows, cols]` weight in a GGML block format.
#[derive(Debug, Clone)]
pub struct GgmlWeight {
    dtype: GgmlDType,
    rows: usize,
    cols: usize,
    row_bytes: usize,
    /// The raw blocks, 8-byte aligned (every block type's alignment divides 8).
    data: Vec<u64>,
}

impl GgmlWeight {
    /// Takes the stored bytes of a 2-D `QTensor`.
    pub fn from_qtensor(q: &QTensor) -> Result<Self> {
        let (rows, cols) = q.shape().dims2()?;
        let dtype = q.dtype();
        let bytes = q.data()?;
        Self::from_bytes(dtype, rows, cols, &bytes)
    }

    /// Builds from raw block bytes, row-major.
    pub fn from_bytes(dtype: GgmlDType, rows: usize, cols: usize, bytes: &[u8]) -> Result<Self> {
        let bs = dtype.block_size();
        if !cols.is_multiple_of(bs) {
            return Err(PeftError::bad_input(
                format!("{dtype:?} weight [{rows}, {cols}]"),
                format!("in_features a multiple of the block size {bs}"),
                cols.to_string(),
            ));
        }
        if matches!(dtype, GgmlDType::Q8_1) {
            return Err(PeftError::bad_input(
                "GGUF weight type",
                "F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 or a K-quant",
                format!("{dtype:?}"),
            ));
        }
        let row_bytes = cols / bs * dtype.type_size();
        if bytes.len() != rows * row_bytes {
            return Err(PeftError::bad_input(
                format!("{dtype:?} weight [{rows}, {cols}]"),
                format!("{} bytes", rows * row_bytes),
                format!("{} bytes", bytes.len()),
            ));
        }
        let mut data = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `data` holds at least `bytes.len()` bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                data.as_mut_ptr().cast::<u8>(),
                bytes.len(),
            );
        }
        Ok(GgmlWeight {
            dtype,
            rows,
            cols,
            row_bytes,
            data,
        })
    }

    /// The GGML type.
    pub fn dtype(&self) -> GgmlDType {
        self.dtype
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: `data` is initialised and holds at least rows * row_bytes bytes.
        unsafe {
            std::slice::from_raw_parts(self.data.as_ptr().cast::<u8>(), self.rows * self.row_bytes)
        }
    }

    /// Undoes llama.cpp's q/k permutation for `heads` heads (see
    /// `peft_models::gguf::reverse_permute`), moving whole rows.
    pub fn reverse_permute(&self, heads: usize) -> Result<Self> {
        if heads == 0 || !self.rows.is_multiple_of(2 * heads) {
            return Err(PeftError::bad_input(
                "q/k projection rows",
                format!("a multiple of 2 x {heads} heads"),
                self.rows.to_string(),
            ));
        }
        let half = self.rows / heads / 2;
        let src = self.bytes();
        let mut out = vec![0u8; src.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..half {
                    let to = h * 2 * half + j * half + i;
                    let from = h * 2 * half + i * 2 + j;
                    out[to * self.row_bytes..(to + 1) * self.row_bytes]
                        .copy_from_slice(&src[from * self.row_bytes..(from + 1) * self.row_bytes]);
                }
            }
        }
        Self::from_bytes(self.dtype, self.rows, self.cols, &out)
    }

    fn decode<T: GgmlType>(&self, bytes: &[u8], out: &mut [f32]) {
        let n = bytes.len() / std::mem::size_of::<T>();
        // SAFETY: `bytes` starts on a block boundary of 8-byte-aligned storage (every row and
        // block offset is a multiple of the block size, whose alignment divides 8 and the
        // block byte size), and holds `n` whole blocks of `T`, a plain-data block type.
        let blocks = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), n) };
        T::to_float(blocks, out);
    }

    fn decode_run(&self, bytes: &[u8], out: &mut [f32]) {
        match self.dtype {
            GgmlDType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            GgmlDType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            GgmlDType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            GgmlDType::Q4_0 => self.decode::<BlockQ4_0>(bytes, out),
            GgmlDType::Q4_1 => self.decode::<BlockQ4_1>(bytes, out),
            GgmlDType::Q5_0 => self.decode::<BlockQ5_0>(bytes, out),
            GgmlDType::Q5_1 => self.decode::<BlockQ5_1>(bytes, out),
            GgmlDType::Q8_0 => self.decode::<BlockQ8_0>(bytes, out),
            GgmlDType::Q2K => self.decode::<BlockQ2K>(bytes, out),
            GgmlDType::Q3K => self.decode::<BlockQ3K>(bytes, out),
            GgmlDType::Q4K => self.decode::<BlockQ4K>(bytes, out),
            GgmlDType::Q5K => self.decode::<BlockQ5K>(bytes, out),
            GgmlDType::Q6K => self.decode::<BlockQ6K>(bytes, out),
            GgmlDType::Q8K => self.decode::<BlockQ8K>(bytes, out),
            // Refused in `from_bytes`.
            GgmlDType::Q8_1 => out.fill(f32::NAN),
        }
    }
}

impl QuantWeight for GgmlWeight {
    fn rows(&self) -> usize {
        self.rows
    }
    fn cols(&self) -> usize {
        self.cols
    }
    fn block_cols(&self) -> usize {
        self.dtype.block_size()
    }
    fn dequantize_into(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let bs = self.dtype.block_size();
        let ts = self.dtype.type_size();
        let width = cols.len();
        let all = self.bytes();
        for (ri, r) in rows.enumerate() {
            let start = r * self.row_bytes + cols.start / bs * ts;
            let end = r * self.row_bytes + cols.end.div_ceil(bs) * ts;
            self.decode_run(&all[start..end], &mut out[ri * width..(ri + 1) * width]);
        }
    }
    fn resident_bytes(&self) -> usize {
        self.rows * self.row_bytes
    }
    fn as_any(&self) -> &dyn std::any::Any
    where
        Self: 'static,
    {
        self
    }
    fn format_name(&self) -> String {
        format!("GGUF {:?}", self.dtype)
    }
}
