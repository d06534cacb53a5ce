//! Kernel dispatch. Each entry names a device family and the instruction set its kernels use;
//! the first entry that serves a device wins. The CPU kernels pick AVX2+FMA or the scalar
//! loop at run time; every other device (and the CPU under `PEFT_KERNELS=portable`) takes the
//! portable path (dequantize onto the device, candle's matmul). CUDA kernels for the same
//! formats slot in as a new entry without touching the formats or the methods.

use candle_core::Device;
use peft_core::{PeftError, Result};

/// One kernel family.
#[derive(Debug)]
pub struct KernelBackend {
    /// Name shown in reports (`cpu-avx2`).
    pub name: &'static str,
    /// Whether it serves `device` on this machine.
    pub serves: fn(&Device) -> bool,
}

/// The dispatch list, most specific first.
pub static BACKENDS: &[KernelBackend] = &[
    KernelBackend {
        name: "cpu-avx2",
        serves: |d| d.is_cpu() && !peft_kernels::portable() && peft_kernels::quant::has_avx2(),
    },
    KernelBackend {
        name: "cpu-scalar",
        serves: |d| d.is_cpu() && !peft_kernels::portable(),
    },
    KernelBackend {
        // Any device (and the CPU under PEFT_KERNELS=portable): the weight dequantized onto
        // the device a layer at a time, then candle's matmul.
        name: "portable",
        serves: |_| true,
    },
];

/// The backend that runs quantized layers on `device`.
pub fn select(device: &Device) -> Result<&'static KernelBackend> {
    BACKENDS.iter().find(|b| (b.serves)(device)).ok_or_else(|| {
        PeftError::bad_input(
            "quantized layer device",
            format!(
                "a device with quantized kernels ({})",
                BACKENDS
                    .iter()
                    .map(|b| b.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            format!("{device:?}"),
        )
    })
}

/// Fails with a typed error when no backend serves `device`.
pub fn check_device(device: &Device) -> Result<()> {
    select(device).map(|_| ())
}
