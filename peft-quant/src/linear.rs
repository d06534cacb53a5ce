//! [`QuantLinear`]: a frozen linear layer over a [`QuantWeight`], usable as a slot under any
//! method. Its forward pass is a candle custom op whose backward returns the gradient with
//! respect to the input only (the quantized weight is frozen), so LoRA, IA3 and prompt methods
//! train on it. Kernels are picked by [`crate::backend`].

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
use peft_core::{LinearLike, PeftError, Result};

use crate::blockwise::{Blockwise4bit, FourBit};
use crate::int8::Int8Rowwise;
use peft_kernels::quant::QuantWeight;

/// A quantization scheme for frozen linear weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum QuantScheme {
    /// LLM.int8: per-row absmax int8 weights; `threshold` > 0 keeps activation outlier
    /// columns in f32 (bitsandbytes' default 6.0).
    Int8 {
        /// Activation magnitude from which a column is an outlier (0: none).
        threshold: f32,
    },
    /// 4-bit blockwise (QLoRA).
    FourBit {
        /// NF4 or FP4.
        kind: FourBit,
        /// Values per block (64 in QLoRA).
        blocksize: usize,
        /// Store block maxima in 8 bits (blocks of 256).
        double_quant: bool,
    },
}

impl QuantScheme {
    /// NF4, blocks of 64, double quantization: QLoRA's defaults.
    pub const NF4: QuantScheme = QuantScheme::FourBit {
        kind: FourBit::Nf4,
        blocksize: 64,
        double_quant: true,
    };
    /// int8 with bitsandbytes' default outlier threshold 6.0.
    pub const INT8: QuantScheme = QuantScheme::Int8 { threshold: 6.0 };

    /// Parses `int8`, `nf4`, `fp4` (with the defaults above; `nf4-nodq` / `fp4-nodq` without
    /// double quantization).
    pub fn parse(name: &str) -> Result<Self> {
        let four = |kind, dq| QuantScheme::FourBit {
            kind,
            blocksize: 64,
            double_quant: dq,
        };
        Ok(match name {
            "int8" => QuantScheme::INT8,
            "nf4" => four(FourBit::Nf4, true),
            "nf4-nodq" => four(FourBit::Nf4, false),
            "fp4" => four(FourBit::Fp4, true),
            "fp4-nodq" => four(FourBit::Fp4, false),
            other => {
                return Err(PeftError::bad_input(
                    "quantization scheme",
                    "int8, nf4, nf4-nodq, fp4 or fp4-nodq",
                    format!("`{other}`"),
                ))
            }
        })
    }

    /// Quantizes a row-major `[rows, cols]` f32 weight.
    pub fn quantize(
        &self,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Arc<dyn QuantWeight>> {
        Ok(match *self {
            QuantScheme::Int8 { threshold } => {
                Arc::new(Int8Rowwise::quantize(values, rows, cols, threshold)?)
            }
            QuantScheme::FourBit {
                kind,
                blocksize,
                double_quant,
            } => Arc::new(Blockwise4bit::quantize(
                values,
                rows,
                cols,
                kind,
                blocksize,
                double_quant,
            )?),
        })
    }
}

impl fmt::Display for QuantScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuantScheme::Int8 { threshold } => write!(f, "int8 (threshold {threshold})"),
            QuantScheme::FourBit {
                kind,
                blocksize,
                double_quant,
            } => write!(
                f,
                "{} (blocks of {blocksize}{})",
                kind.name(),
                if *double_quant { ", double quant" } else { "" }
            ),
        }
    }
}

/// A frozen linear layer whose weight is quantized.
#[derive(Clone)]
pub struct QuantLinear {
    weight: Arc<dyn QuantWeight>,
    bias: Option<Tensor>,
    scheme: Option<QuantScheme>,
    dtype: DType,
    device: candle_core::Device,
}

impl fmt::Debug for QuantLinear {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "QuantLinear({} -> {}, {}, bias: {})",
            self.weight.cols(),
            self.weight.rows(),
            self.weight.format_name(),
            self.bias.is_some()
        )
    }
}

impl QuantLinear {
    /// A layer over an already quantized weight. `scheme` is what a merge re-quantizes with
    /// (`None` for formats that cannot be re-created, such as GGUF blocks: merging into them
    /// gives a dense layer). `dtype` is the activation dtype the model runs in.
    pub fn new(
        weight: Arc<dyn QuantWeight>,
        bias: Option<Tensor>,
        scheme: Option<QuantScheme>,
        dtype: DType,
        device: &candle_core::Device,
    ) -> Result<Self> {
        if let Some(b) = &bias {
            if b.dims() != [weight.rows()] {
                return Err(PeftError::bad_input(
                    "quantized linear bias",
                    format!("shape [{}]", weight.rows()),
                    format!("{:?}", b.dims()),
                ));
            }
        }
        Ok(QuantLinear {
            weight,
            bias,
            scheme,
            dtype,
            device: device.clone(),
        })
    }

    /// Quantizes a dense weight (`[out, in]`, or `[in, out]` when `transposed`).
    pub fn quantize(
        weight: &Tensor,
        bias: Option<Tensor>,
        transposed: bool,
        scheme: QuantScheme,
    ) -> Result<Self> {
        let dtype = weight.dtype();
        let w = if transposed {
            weight.t()?
        } else {
            weight.clone()
        };
        let (rows, cols) = w.dims2()?;
        let values = w
            .to_dtype(DType::F32)?
            .contiguous()?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let q = scheme.quantize(&values, rows, cols)?;
        Self::new(q, bias, Some(scheme), dtype, weight.device())
    }

    /// The quantized weight.
    pub fn quant_weight(&self) -> &Arc<dyn QuantWeight> {
        &self.weight
    }

    /// The scheme a merge re-quantizes with.
    pub fn scheme(&self) -> Option<QuantScheme> {
        self.scheme
    }

    /// The portable path (another device, or `PEFT_KERNELS=portable`): the weight dequantized
    /// onto `x`'s device (one layer's f32 weight at a time, dropped after the product) and
    /// multiplied with candle's matmul, or the format's own op-chain forward (LLM.int8); the
    /// gradient reaches `x` only, as through the CPU op.
    fn portable_forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = (self.weight.rows(), self.weight.cols());
        let in_dtype = x.dtype();
        let dims = x.dims().to_vec();
        if dims.last() != Some(&cols) {
            return Err(PeftError::bad_input(
                "quantized linear input",
                format!("last dimension {cols}"),
                format!("{dims:?}"),
            ));
        }
        let x2 = x.to_dtype(DType::F32)?.reshape(((), cols))?;
        let mut values = vec![0f32; rows * cols];
        self.weight.dequantize_into(0..rows, 0..cols, &mut values);
        let w = Tensor::from_vec(values, (rows, cols), x.device())?;
        let y = match self.weight.portable_forward(&x2, &w)? {
            Some(y) => y,
            None => peft_kernels::linear::frozen_matmul(&x2, &w.t()?)?,
        };
        let mut out = dims;
        *out.last_mut().expect("non-empty dims") = rows;
        let y = y.reshape(out)?.to_dtype(in_dtype)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_device(x.device())?.to_dtype(in_dtype)?)?,
            None => y,
        })
    }

    /// Bytes of the quantized weight in memory (bias excluded).
    pub fn resident_bytes(&self) -> usize {
        self.weight.resident_bytes()
    }
}

/// The custom op: `x W^T` forward (or `g W` when `input_grad`), gradient for the input only.
struct QMatmul {
    weight: Arc<dyn QuantWeight>,
    input_grad: bool,
}

impl CustomOp1 for QMatmul {
    fn name(&self) -> &'static str {
        if self.input_grad {
            "quant-matmul-input-grad"
        } else {
            "quant-matmul"
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (inner, outer) = if self.input_grad {
            (self.weight.rows(), self.weight.cols())
        } else {
            (self.weight.cols(), self.weight.rows())
        };
        let dims = layout.shape().dims();
        if dims.last() != Some(&inner) {
            candle_core::bail!(
                "{}: input's last dimension should be {inner}, found shape {dims:?}",
                self.name()
            );
        }
        let data = match storage {
            CpuStorage::F32(v) => v,
            other => candle_core::bail!(
                "{}: expected f32 input, found {:?}",
                self.name(),
                candle_core::backend::BackendStorage::dtype(other)
            ),
        };
        let x = match layout.contiguous_offsets() {
            Some((a, b)) => &data[a..b],
            None => candle_core::bail!("{}: input must be contiguous", self.name()),
        };
        let m = x.len() / inner;
        let y = if self.input_grad {
            peft_kernels::quant::matmul_gw(self.weight.as_ref(), x, m)
        } else {
            self.weight.forward(x, m)
        };
        let mut out = dims.to_vec();
        *out.last_mut().expect("non-empty dims") = outer;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        if self.input_grad {
            // Second derivatives are not needed by any method.
            return Ok(None);
        }
        let g = grad_res.contiguous()?;
        let op = QMatmul {
            weight: Arc::clone(&self.weight),
            input_grad: true,
        };
        Ok(Some(g.apply_op1_no_bwd(&op)?))
    }
}

impl LinearLike for QuantLinear {
    fn quantization_backend(&self) -> Option<&'static str> {
        Some(match self.scheme {
            Some(QuantScheme::Int8 { .. }) => "bnb 8bit",
            Some(QuantScheme::FourBit { .. }) => "bnb 4bit",
            // A GGUF file's own block formats (peft has no such backend).
            None => "gguf",
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        crate::backend::check_device(x.device())?;
        if !peft_kernels::fused(&[x]) {
            return self.portable_forward(x);
        }
        let in_dtype = x.dtype();
        let xf = if in_dtype == DType::F32 {
            x.contiguous()?
        } else {
            x.to_dtype(DType::F32)?.contiguous()?
        };
        let y = xf.apply_op1(QMatmul {
            weight: Arc::clone(&self.weight),
            input_grad: false,
        })?;
        let y = if in_dtype == DType::F32 {
            y
        } else {
            y.to_dtype(in_dtype)?
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(&b.to_dtype(in_dtype)?)?,
            None => y,
        })
    }
    fn in_features(&self) -> usize {
        self.weight.cols()
    }
    fn out_features(&self) -> usize {
        self.weight.rows()
    }
    fn weight(&self) -> Result<Tensor> {
        let (rows, cols) = (self.weight.rows(), self.weight.cols());
        let mut out = vec![0f32; rows * cols];
        self.weight.dequantize_into(0..rows, 0..cols, &mut out);
        Ok(Tensor::from_vec(out, (rows, cols), &self.device)?)
    }
    fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    fn dtype(&self) -> DType {
        DType::F32
    }
    fn with_weights(&self, weight: Tensor, bias: Option<Tensor>) -> Result<Arc<dyn LinearLike>> {
        match self.scheme {
            Some(scheme) => {
                crate::merge::warn_requantize(&self.weight.format_name());
                let mut layer = QuantLinear::quantize(&weight, bias, false, scheme)?;
                layer.dtype = self.dtype;
                Ok(Arc::new(layer))
            }
            None => Ok(Arc::new(peft_core::DenseLinear::new(
                weight.to_dtype(self.dtype)?,
                bias,
            )?)),
        }
    }
    fn with_bias(&self, bias: Tensor) -> Result<Arc<dyn LinearLike>> {
        Ok(Arc::new(QuantLinear {
            bias: Some(bias),
            ..self.clone()
        }))
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}
