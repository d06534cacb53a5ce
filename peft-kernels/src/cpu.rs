//! The one CPU feature probe, and the switch between the fused CPU kernels and the portable
//! candle-op path.
//!
//! Every fused op in this crate asks [`fused`] (or [`fused_f32`]) before it runs: it answers
//! no for a tensor that is not on the CPU (a CUDA or Metal tensor takes the portable path
//! automatically) and for every tensor when the environment variable `PEFT_KERNELS=portable` is
//! set, so the path a GPU runs is the one the test suite checks on the CPU.

use std::sync::OnceLock;

use candle_core::{DType, Tensor};

/// What the running CPU offers the kernels (probed once).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuFeatures {
    /// AVX2 and FMA (the 8-lane kernels: sgemm's 6 x 16 tile, `exp`, SiLU, dequantizing).
    pub avx2_fma: bool,
    /// AVX-512F (sgemm's 12 x 32 tile).
    pub avx512f: bool,
}

/// The CPU's features, probed once.
pub fn features() -> CpuFeatures {
    static FEATURES: OnceLock<CpuFeatures> = OnceLock::new();
    *FEATURES.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                avx2_fma: std::is_x86_feature_detected!("avx2")
                    && std::is_x86_feature_detected!("fma"),
                avx512f: std::is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures {
                avx2_fma: false,
                avx512f: false,
            }
        }
    })
}

/// Whether the CPU has AVX2 and FMA.
pub fn has_avx2_fma() -> bool {
    features().avx2_fma
}

/// The instruction set the CPU kernels use here (`avx512f`, `avx2+fma` or `scalar`), or
/// `portable` when the fused kernels are switched off.
pub fn simd_level() -> &'static str {
    let f = features();
    if portable() {
        "portable"
    } else if f.avx512f && f.avx2_fma {
        "avx512f"
    } else if f.avx2_fma {
        "avx2+fma"
    } else {
        "scalar"
    }
}

/// Which implementation the ops use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelMode {
    /// The fused CPU kernels where a tensor is on the CPU, the portable path elsewhere.
    Fused,
    /// The portable path (candle tensor ops with their own gradients) everywhere.
    Portable,
}

thread_local! {
    static OVERRIDE: std::cell::Cell<Option<KernelMode>> = const { std::cell::Cell::new(None) };
}

/// The mode in force on this thread: the one [`with_mode`] set, else the one chosen by
/// `PEFT_KERNELS` (`portable`, or unset / `fused`), read once. Any other value is reported
/// once on stderr and treated as unset.
pub fn mode() -> KernelMode {
    static MODE: OnceLock<KernelMode> = OnceLock::new();
    OVERRIDE.with(std::cell::Cell::get).unwrap_or_else(|| {
        *MODE.get_or_init(|| parse_mode(std::env::var("PEFT_KERNELS").ok().as_deref()))
    })
}

/// Runs `f` with the ops dispatched in `mode` on this thread (the ops choose their path on the
/// calling thread, forward and backward), whatever `PEFT_KERNELS` says: a kernel's own tests
/// check it under the portable suite too, and a benchmark compares both paths in one process.
pub fn with_mode<R>(mode: KernelMode, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelMode>);
    impl Drop for Restore {
        fn drop(&mut self) {
            OVERRIDE.with(|o| o.set(self.0));
        }
    }
    let _restore = Restore(OVERRIDE.with(|o| o.replace(Some(mode))));
    f()
}

fn parse_mode(value: Option<&str>) -> KernelMode {
    match value.map(str::trim) {
        Some("portable") => KernelMode::Portable,
        None | Some("") | Some("fused") => KernelMode::Fused,
        Some(other) => {
            eprintln!(
                "warning: PEFT_KERNELS={other:?} is not one of \"portable\" or \"fused\"; using the fused kernels"
            );
            KernelMode::Fused
        }
    }
}

/// Whether every op takes the portable path (`PEFT_KERNELS=portable`).
pub fn portable() -> bool {
    mode() == KernelMode::Portable
}

/// Whether a fused CPU kernel may run on these tensors: all on the CPU, and the kernels not
/// switched off.
pub fn fused(tensors: &[&Tensor]) -> bool {
    !portable() && tensors.iter().all(|t| t.device().is_cpu())
}

/// [`fused`], and every tensor f32.
pub fn fused_f32(tensors: &[&Tensor]) -> bool {
    fused(tensors) && tensors.iter().all(|t| t.dtype() == DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mode_is_parsed_from_the_variable() {
        assert_eq!(parse_mode(None), KernelMode::Fused);
        assert_eq!(parse_mode(Some("")), KernelMode::Fused);
        assert_eq!(parse_mode(Some("fused")), KernelMode::Fused);
        assert_eq!(parse_mode(Some(" portable ")), KernelMode::Portable);
        assert_eq!(parse_mode(Some("gpu")), KernelMode::Fused);
    }

    #[test]
    fn with_mode_overrides_the_variable_on_this_thread_only() {
        let outer = mode();
        with_mode(KernelMode::Portable, || {
            assert!(portable());
            with_mode(KernelMode::Fused, || assert!(!portable()));
            assert!(portable());
            let other = std::thread::spawn(mode).join().expect("thread");
            assert_eq!(other, outer);
        });
        assert_eq!(mode(), outer);
    }
}
