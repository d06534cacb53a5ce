//! Reading and writing tensor files: adapter checkpoints in peft's layout, and whole models as
//! Hugging Face folders. Writes are atomic (a temporary file in the same folder, flushed, then
//! renamed), so a crash never leaves a half-written checkpoint under the real name.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::error::{PeftError, Result};
use crate::model::AdaptableModel;

/// peft's adapter weights file.
pub const WEIGHTS_NAME: &str = "adapter_model.safetensors";
/// The older pickled adapter weights file.
pub const WEIGHTS_NAME_BIN: &str = "adapter_model.bin";

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(PeftError::io(path, e));
    }
    Ok(())
}

/// Serialises tensors as safetensors with metadata `{"format": "pt"}`, as torch does.
pub fn safetensors_bytes(tensors: &[(String, Tensor)]) -> Result<Vec<u8>> {
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let mut contiguous = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        contiguous.push((name.as_str(), t.contiguous()?));
    }
    safetensors::tensor::serialize(contiguous.iter().map(|(n, t)| (*n, t)), Some(metadata))
        .map_err(|e| PeftError::InvalidState(format!("serialising safetensors: {e}")))
}

/// Writes tensors to a safetensors file atomically.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_atomic(path, &safetensors_bytes(tensors)?)
}

/// Reads every tensor of a safetensors file into memory, sorted by name. A truncated or
/// malformed file is a [`PeftError::BadCheckpoint`] naming it.
pub fn read_safetensors(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
    let bad = |reason: String| PeftError::BadCheckpoint {
        path: path.to_path_buf(),
        format: "safetensors".into(),
        reason,
    };
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)
            .map_err(|e| bad(format!("tensor `{name}`: {e}")))?;
        out.push((name, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Reads a pickled PyTorch tensor file (`adapter_model.bin`) without executing any code.
pub fn read_pickle(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let mut tensors =
        candle_core::pickle::read_all(path).map_err(|e| PeftError::BadCheckpoint {
            path: path.to_path_buf(),
            format: "PyTorch pickle".into(),
            reason: e.to_string(),
        })?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

/// Finds the adapter weights in `dir`: the safetensors file, else the pickled one.
pub fn adapter_weights_file(dir: &Path) -> Result<PathBuf> {
    let st = dir.join(WEIGHTS_NAME);
    if st.is_file() {
        return Ok(st);
    }
    let bin = dir.join(WEIGHTS_NAME_BIN);
    if bin.is_file() {
        return Ok(bin);
    }
    Err(PeftError::io(
        &st,
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("no {WEIGHTS_NAME} or {WEIGHTS_NAME_BIN} here"),
        ),
    ))
}

/// Reads adapter weights from a safetensors or pickle file.
pub fn read_adapter_weights(path: &Path, device: &Device) -> Result<Vec<(String, Tensor)>> {
    if path.extension().is_some_and(|e| e == "bin") {
        let tensors = read_pickle(path)?;
        tensors
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(device)?)))
            .collect()
    } else {
        read_safetensors(path, device)
    }
}

/// Writes a model as a Hugging Face folder: `config.json` and `model.safetensors`.
pub fn save_model_folder(model: &(impl AdaptableModel + ?Sized), dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| PeftError::io(dir, e))?;
    let tensors = model.named_tensors()?;
    write_safetensors(&dir.join("model.safetensors"), &tensors)?;
    let config = crate::json::to_python_json(&model.config_json());
    write_atomic(&dir.join("config.json"), config.as_bytes())
}
