//! Frozen model weights from a Hugging Face folder: `model.safetensors` or a sharded
//! `model.safetensors.index.json`, memory-mapped and read once into tensors of the chosen dtype.
//! Missing tensors and wrong shapes are errors that name the file, the key and the shapes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use peft_core::{PeftError, Result, StoredTensor, WeightSource};
use serde_json::Value;

/// The tensors of a model folder.
pub struct ModelWeights {
    st: MmapedSafetensors,
    /// Which file holds each tensor.
    routing: BTreeMap<String, PathBuf>,
    /// Dtypes tensors are converted to on load (float ones only).
    precision: crate::Precision,
    device: Device,
    /// A prefix some checkpoints of the architecture omit (`transformer.` for GPT-2, `bert.`
    /// for BERT's heads): a name carrying it that the files lack is looked up without it.
    optional_prefix: Option<String>,
}

impl std::fmt::Debug for ModelWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelWeights")
            .field("tensors", &self.routing.len())
            .field("precision", &self.precision)
            .finish()
    }
}

impl ModelWeights {
    /// Opens the safetensors files of `dir`; tensors are converted to `dtype` on load (2-D
    /// ones to `matrices` where a [`crate::Precision`] sets them apart).
    pub fn open(dir: &Path, dtype: impl Into<crate::Precision>, device: &Device) -> Result<Self> {
        let precision = dtype.into();
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files: Vec<PathBuf> = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| PeftError::io(&index, e))?;
            let value: Value = serde_json::from_str(&text).map_err(|e| PeftError::Json {
                source_name: index.display().to_string(),
                message: e.to_string(),
            })?;
            let map = value
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| PeftError::MissingKey {
                    source_name: index.display().to_string(),
                    key: "weight_map".into(),
                    expected: "an object mapping tensor names to shard files".into(),
                })?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(Value::as_str)
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            files
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(PeftError::io(
                &single,
                std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model folder",
                ),
            ));
        };
        let mut routing = BTreeMap::new();
        for file in &files {
            if !file.is_file() {
                return Err(PeftError::io(
                    file,
                    std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed in the index is missing",
                    ),
                ));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on them
        // not being modified while the model is being loaded.
        let st =
            unsafe { MmapedSafetensors::multi(&files) }.map_err(|e| PeftError::BadCheckpoint {
                path: dir.to_path_buf(),
                format: "safetensors".into(),
                reason: e.to_string(),
            })?;
        // Later files win, as in `MmapedSafetensors::multi`.
        for file in &files {
            for name in header_names(file)? {
                routing.insert(name, file.clone());
            }
        }
        Ok(ModelWeights {
            st,
            routing,
            precision: float_precision(precision),
            device: device.clone(),
            optional_prefix: None,
        })
    }

    /// Names carrying `prefix` are also found without it (checkpoints saved from the bare
    /// base model, such as GPT-2's without `transformer.`).
    pub fn with_optional_prefix(mut self, prefix: &str) -> Self {
        self.optional_prefix = Some(prefix.to_string());
        self
    }

    /// The name under which the files hold `name` (see [`ModelWeights::with_optional_prefix`]).
    fn resolve<'n>(&self, name: &'n str) -> &'n str {
        match &self.optional_prefix {
            Some(p) if !self.routing.contains_key(name) => match name.strip_prefix(p.as_str()) {
                Some(bare) if self.routing.contains_key(bare) => bare,
                _ => name,
            },
            _ => name,
        }
    }

    /// Whether the folder holds tensor `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(self.resolve(name))
    }

    /// Loads tensor `name`, checking its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let name = self.resolve(name);
        let Some(file) = self.routing.get(name) else {
            return Err(PeftError::MissingTensor {
                path: self.routing.values().next().cloned().unwrap_or_default(),
                key: name.to_string(),
                expected: shape.to_vec(),
                available: self.routing.len(),
            });
        };
        let view = self.st.get(name)?;
        if view.shape() != shape {
            return Err(PeftError::ShapeMismatch {
                path: file.clone(),
                key: name.to_string(),
                expected: shape.to_vec(),
                found: view.shape().to_vec(),
            });
        }
        let t = self.st.load(name, &self.device)?;
        let dtype = self.precision.dtype_for(shape.len());
        Ok(if t.dtype() == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        })
    }

    /// The stored bytes of tensor `name` with its dtype and shape, unconverted (for
    /// quantized checkpoints, whose uint8/int8 tensors are not weights in themselves).
    pub fn raw(&self, name: &str) -> Result<(safetensors::Dtype, Vec<usize>, &[u8])> {
        let name = self.resolve(name);
        if !self.routing.contains_key(name) {
            return Err(PeftError::MissingTensor {
                path: self.routing.values().next().cloned().unwrap_or_default(),
                key: name.to_string(),
                expected: vec![],
                available: self.routing.len(),
            });
        }
        let view = self.st.get(name)?;
        Ok((view.dtype(), view.shape().to_vec(), view.data()))
    }

    /// The file holding tensor `name`, if any.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        self.routing.get(name).map(PathBuf::as_path)
    }

    /// The dtype tensors are converted to (the compute dtype; see `open`).
    pub fn dtype(&self) -> DType {
        self.precision.compute
    }
}

impl WeightSource for ModelWeights {
    fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.get(name, shape)
    }

    fn stored(&self, name: &str) -> Result<Option<StoredTensor<'_>>> {
        if !self.contains(name) {
            return Ok(None);
        }
        let (dtype, shape, data) = self.raw(name)?;
        Ok(Some(StoredTensor::Safetensors { dtype, shape, data }))
    }

    fn contains(&self, name: &str) -> bool {
        ModelWeights::contains(self, name)
    }

    fn origin(&self) -> String {
        match self.routing.values().next().and_then(|f| f.parent()) {
            Some(dir) => dir.display().to_string(),
            None => "an empty model folder".into(),
        }
    }
}

/// `dtype` if it is a float type, else f32 (frozen weights are always floats).
fn dtype_or_float(dtype: DType) -> DType {
    match dtype {
        DType::F32 | DType::BF16 | DType::F16 | DType::F64 => dtype,
        _ => DType::F32,
    }
}

/// `precision` with each dtype passed through [`dtype_or_float`].
pub(crate) fn float_precision(precision: crate::Precision) -> crate::Precision {
    crate::Precision {
        compute: dtype_or_float(precision.compute),
        matrices: dtype_or_float(precision.matrices),
    }
}

/// The tensor names in a safetensors file's header (the `__metadata__` entry excluded).
fn header_names(file: &Path) -> Result<Vec<String>> {
    use std::io::Read;
    let bad = |reason: &str| PeftError::BadCheckpoint {
        path: file.to_path_buf(),
        format: "safetensors".into(),
        reason: reason.to_string(),
    };
    let mut f = std::fs::File::open(file).map_err(|e| PeftError::io(file, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| bad("file shorter than its 8-byte header length"))?;
    let n = usize::try_from(u64::from_le_bytes(len)).map_err(|_| bad("header length overflows"))?;
    if n > 100_000_000 {
        return Err(bad("header larger than 100 MB"));
    }
    let mut header = vec![0u8; n];
    f.read_exact(&mut header)
        .map_err(|_| bad("truncated header"))?;
    let map: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).map_err(|e| bad(&format!("header is not JSON: {e}")))?;
    Ok(map
        .into_iter()
        .map(|(k, _)| k)
        .filter(|k| k != "__metadata__")
        .collect())
}
