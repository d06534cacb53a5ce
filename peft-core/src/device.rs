//! Choosing the device a model runs on: `cpu`, `cuda[:N]` or `metal[:N]`, as the command
//! line's `--device` takes it, with a typed error for a malformed name, for a device this
//! build was compiled without (the `cuda` / `metal` Cargo features), and for one the machine
//! does not have.

use candle_core::Device;

use crate::error::{PeftError, Result};

/// A parsed device name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// The CPU.
    Cpu,
    /// CUDA GPU number `N` (`cuda` is `cuda:0`).
    Cuda(usize),
    /// Metal GPU number `N` (`metal` is `metal:0`).
    Metal(usize),
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
            DeviceSpec::Metal(n) => write!(f, "metal:{n}"),
        }
    }
}

impl std::str::FromStr for DeviceSpec {
    type Err = PeftError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || PeftError::bad_input("device", "cpu, cuda, cuda:N, metal or metal:N", s);
        let (kind, index) = match s.trim().split_once(':') {
            Some((k, n)) => (k, Some(n.parse::<usize>().map_err(|_| bad())?)),
            None => (s.trim(), None),
        };
        match kind.to_ascii_lowercase().as_str() {
            "cpu" if index.is_none() => Ok(DeviceSpec::Cpu),
            "cuda" | "gpu" => Ok(DeviceSpec::Cuda(index.unwrap_or(0))),
            "metal" | "mps" => Ok(DeviceSpec::Metal(index.unwrap_or(0))),
            _ => Err(bad()),
        }
    }
}

/// Whether this build can run on CUDA (compiled with the `cuda` feature).
pub fn cuda_built() -> bool {
    candle_core::utils::cuda_is_available()
}

/// Whether this build can run on Metal (compiled with the `metal` feature).
pub fn metal_built() -> bool {
    candle_core::utils::metal_is_available()
}

impl DeviceSpec {
    /// Opens the device: an error names the device and says why (this build lacks the
    /// backend, or the machine has no such device).
    pub fn open(self) -> Result<Device> {
        let unbuilt = |feature: &str, how: &str| PeftError::Unsupported {
            source_name: "device".into(),
            key: "--device".into(),
            value: format!("\"{self}\""),
            reason: format!(
                "this build has no {} support: rebuild with `--features {feature}` ({how})",
                feature.to_uppercase()
            ),
        };
        let missing = |e: candle_core::Error| {
            PeftError::bad_input(
                "device",
                format!("{self} present on this machine"),
                // The cause only (candle appends a backtrace under RUST_BACKTRACE).
                format!("{e}")
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .to_string(),
            )
        };
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(_) if !cuda_built() => Err(unbuilt(
                "cuda",
                "scripts/build-cuda.sh compiles it, even on a machine without a GPU",
            )),
            DeviceSpec::Metal(_) if !metal_built() => {
                Err(unbuilt("metal", "on macOS with Apple silicon"))
            }
            DeviceSpec::Cuda(n) => Device::new_cuda(n).map_err(missing),
            DeviceSpec::Metal(n) => Device::new_metal(n).map_err(missing),
        }
    }
}

/// Parses and opens a device name (`cpu`, `cuda:1`, `metal`).
pub fn open_device(name: &str) -> Result<Device> {
    name.parse::<DeviceSpec>()?.open()
}

/// The name of an open device (`cpu`, `cuda:0`, `metal:0`).
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_bad_ones_say_what_was_expected() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("CUDA:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert_eq!("metal".parse::<DeviceSpec>().unwrap(), DeviceSpec::Metal(0));
        for bad in ["", "tpu", "cuda:x", "cpu:1", "cuda:-1"] {
            let e = bad.parse::<DeviceSpec>().unwrap_err().to_string();
            assert!(
                e.contains("cpu, cuda, cuda:N, metal or metal:N"),
                "{bad}: {e}"
            );
        }
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
        assert_eq!(device_name(&open_device("cpu").unwrap()), "cpu");
    }

    #[test]
    fn a_device_this_build_lacks_is_a_clear_error() {
        if !cuda_built() {
            let e = open_device("cuda:0").unwrap_err().to_string();
            assert!(
                e.contains("no CUDA support") && e.contains("--features cuda"),
                "{e}"
            );
        }
        if !metal_built() {
            let e = open_device("metal").unwrap_err().to_string();
            assert!(
                e.contains("no METAL support") && e.contains("--features metal"),
                "{e}"
            );
        }
    }
}
