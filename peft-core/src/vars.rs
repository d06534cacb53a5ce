//! Adapter parameters. Each named adapter owns a [`ParamStore`] of trainable `Var`s under
//! peft's parameter paths minus the adapter name (`model.layers.0.self_attn.q_proj.lora_A.weight`).
//! Layers get their parameters through a [`ParamBuilder`], in the candle `VarBuilder` style:
//! the same constructor serves a fresh, seeded initialisation and loading from a checkpoint,
//! so module paths and checkpoint keys cannot drift apart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::{PeftError, Result};

/// How a fresh parameter is initialised. Every random init draws from a generator seeded by
/// the adapter's seed and the parameter's path, so results do not depend on visiting order.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// All zeros.
    Zeros,
    /// All ones.
    Ones,
    /// Uniform on `[low, high)`.
    Uniform {
        /// Lower bound.
        low: f64,
        /// Upper bound.
        high: f64,
    },
    /// Normal with the given mean and standard deviation.
    Normal {
        /// Mean.
        mean: f64,
        /// Standard deviation.
        std: f64,
    },
}

impl Init {
    /// torch's `kaiming_uniform_(w, a=sqrt(5))`, the default init of `nn.Linear`:
    /// uniform on `±1/sqrt(fan_in)`.
    pub fn kaiming_uniform_linear(fan_in: usize) -> Self {
        let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
        Init::Uniform {
            low: -bound,
            high: bound,
        }
    }

    /// `n` values drawn from this initialisation.
    pub fn sample(&self, n: usize, rng: &mut StdRng) -> Vec<f32> {
        match *self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Uniform { low, high } => {
                (0..n).map(|_| rng.random_range(low..high) as f32).collect()
            }
            Init::Normal { mean, std } => (0..n)
                .map(|_| {
                    // Box-Muller; `1 - u` keeps the logarithm finite.
                    let u1: f64 = 1.0 - rng.random::<f64>();
                    let u2: f64 = rng.random::<f64>();
                    let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
                    (mean + std * z) as f32
                })
                .collect(),
        }
    }
}

/// 64-bit FNV-1a, used to derive per-parameter seeds (stable across runs and platforms).
fn fnv1a(text: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Tensors read from a checkpoint, waiting to become parameters.
#[derive(Debug)]
struct TensorSource {
    path: PathBuf,
    /// Keyed by the name without the `base_model.model.` prefix; value keeps the file's key.
    tensors: BTreeMap<String, (String, Tensor)>,
    used: BTreeSet<String>,
}

/// The trainable parameters of one adapter.
#[derive(Debug)]
pub struct ParamStore {
    vars: Mutex<BTreeMap<String, Var>>,
    /// Parameters saved and counted under a second name that read another one (tied
    /// adapters): alias path -> (source path, transposed).
    aliases: Mutex<BTreeMap<String, (String, bool)>>,
    /// Frozen tensors shared by the adapter's layers ([`ParamBuilder::shared_buffer`]): file
    /// key -> (tensor, saved with the adapter).
    buffers: Mutex<BTreeMap<String, (Tensor, bool)>>,
    source: Mutex<Option<TensorSource>>,
    key_prefix: String,
    seed: u64,
    device: Device,
}

/// peft's prefix for parameters of layer methods in checkpoint files.
pub const BASE_MODEL_PREFIX: &str = "base_model.model.";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means another thread panicked mid-update of plain data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ParamStore {
    /// A store whose parameters are freshly initialised from `seed`. `key_prefix` is what
    /// checkpoint keys carry before the parameter path (`base_model.model.` for layer methods).
    pub fn new(seed: u64, device: &Device, key_prefix: &str) -> Arc<Self> {
        Arc::new(ParamStore {
            vars: Mutex::new(BTreeMap::new()),
            aliases: Mutex::new(BTreeMap::new()),
            buffers: Mutex::new(BTreeMap::new()),
            source: Mutex::new(None),
            key_prefix: key_prefix.to_string(),
            seed,
            device: device.clone(),
        })
    }

    /// A store whose parameters are loaded from `tensors` (read from `path`); asking for a
    /// parameter the file lacks is an error. Keys may carry `key_prefix` or not.
    pub fn from_tensors(
        path: &Path,
        tensors: Vec<(String, Tensor)>,
        device: &Device,
        key_prefix: &str,
    ) -> Arc<Self> {
        let tensors = tensors
            .into_iter()
            .map(|(key, t)| {
                let bare = match key_prefix {
                    "" => key.clone(),
                    prefix => key.strip_prefix(prefix).unwrap_or(&key).to_string(),
                };
                (bare, (key, t))
            })
            .collect();
        Arc::new(ParamStore {
            vars: Mutex::new(BTreeMap::new()),
            aliases: Mutex::new(BTreeMap::new()),
            buffers: Mutex::new(BTreeMap::new()),
            source: Mutex::new(Some(TensorSource {
                path: path.to_path_buf(),
                tensors,
                used: BTreeSet::new(),
            })),
            key_prefix: key_prefix.to_string(),
            seed: 0,
            device: device.clone(),
        })
    }

    /// A builder rooted at the empty path.
    pub fn root(self: &Arc<Self>) -> ParamBuilder {
        ParamBuilder {
            store: Arc::clone(self),
            prefix: String::new(),
        }
    }

    fn get_or_create(&self, path: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.get_or_create_with(path, shape, &mut |rng: &mut StdRng| {
            let n: usize = shape.iter().product();
            Ok(Tensor::from_vec(init.sample(n, rng), shape, &self.device)?)
        })
    }

    fn get_or_create_with(
        &self,
        path: &str,
        shape: &[usize],
        init: &mut dyn FnMut(&mut StdRng) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut vars = lock(&self.vars);
        if let Some(var) = vars.get(path) {
            if var.dims() != shape {
                return Err(PeftError::InvalidState(format!(
                    "parameter `{path}` requested with shape {shape:?} but exists with {:?}",
                    var.dims()
                )));
            }
            return Ok(var.as_tensor().clone());
        }
        let var = match lock(&self.source).as_mut() {
            Some(source) => {
                let key = format!("{}{path}", self.key_prefix);
                let Some((_, tensor)) = source.tensors.get(path) else {
                    return Err(PeftError::MissingTensor {
                        path: source.path.clone(),
                        key,
                        expected: shape.to_vec(),
                        available: source.tensors.len(),
                    });
                };
                if tensor.dims() != shape {
                    return Err(PeftError::ShapeMismatch {
                        path: source.path.clone(),
                        key,
                        expected: shape.to_vec(),
                        found: tensor.dims().to_vec(),
                    });
                }
                source.used.insert(path.to_string());
                Var::from_tensor(&tensor.to_dtype(DType::F32)?.to_device(&self.device)?)?
            }
            None => {
                let mut rng = StdRng::seed_from_u64(self.seed ^ fnv1a(path));
                let value = init(&mut rng)?;
                if value.dims() != shape {
                    return Err(PeftError::InvalidState(format!(
                        "initial value of `{path}` has shape {:?}, expected {shape:?}",
                        value.dims()
                    )));
                }
                Var::from_tensor(&value.to_dtype(DType::F32)?.to_device(&self.device)?)?
            }
        };
        let tensor = var.as_tensor().clone();
        vars.insert(path.to_string(), var);
        Ok(tensor)
    }

    fn shared_buffer(
        &self,
        key: &str,
        shape: &[usize],
        persistent: bool,
        init: &mut dyn FnMut() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut buffers = lock(&self.buffers);
        if let Some((t, _)) = buffers.get(key) {
            if t.dims() != shape {
                return Err(PeftError::InvalidState(format!(
                    "shared tensor `{key}` requested with shape {shape:?} but exists with {:?}",
                    t.dims()
                )));
            }
            return Ok(t.clone());
        }
        let bare = match self.key_prefix.as_str() {
            "" => key,
            prefix => key.strip_prefix(prefix).unwrap_or(key),
        };
        let mut loaded = None;
        if persistent {
            if let Some(source) = lock(&self.source).as_mut() {
                if let Some((_, tensor)) = source.tensors.get(bare) {
                    if tensor.dims() != shape {
                        return Err(PeftError::ShapeMismatch {
                            path: source.path.clone(),
                            key: key.to_string(),
                            expected: shape.to_vec(),
                            found: tensor.dims().to_vec(),
                        });
                    }
                    loaded = Some(tensor.to_dtype(DType::F32)?.to_device(&self.device)?);
                    source.used.insert(bare.to_string());
                }
            }
        }
        let tensor = match loaded {
            Some(t) => t,
            None => {
                let t = init()?;
                if t.dims() != shape {
                    return Err(PeftError::InvalidState(format!(
                        "initial value of shared tensor `{key}` has shape {:?}, expected {shape:?}",
                        t.dims()
                    )));
                }
                t.to_dtype(DType::F32)?.to_device(&self.device)?
            }
        };
        buffers.insert(key.to_string(), (tensor.clone(), persistent));
        Ok(tensor)
    }

    /// Checkpoint keys present in the source file that no parameter used (peft warns on these).
    pub fn unused_source_keys(&self) -> Vec<String> {
        match lock(&self.source).as_ref() {
            Some(src) => src
                .tensors
                .iter()
                .filter(|(bare, _)| !src.used.contains(*bare))
                .map(|(_, (key, _))| key.clone())
                .collect(),
            None => Vec::new(),
        }
    }

    /// Takes (and marks as used) the source tensors whose path satisfies `pred`, returning
    /// `(path, file key, tensor)`.
    pub fn take_source_tensors(
        &self,
        pred: impl Fn(&str) -> bool,
    ) -> Vec<(String, String, Tensor)> {
        let mut guard = lock(&self.source);
        let Some(src) = guard.as_mut() else {
            return Vec::new();
        };
        let picked: Vec<(String, String, Tensor)> = src
            .tensors
            .iter()
            .filter(|(bare, _)| pred(bare))
            .map(|(bare, (key, t))| (bare.clone(), key.clone(), t.clone()))
            .collect();
        for (bare, _, _) in &picked {
            src.used.insert(bare.clone());
        }
        picked
    }

    /// The file the parameters are loaded from, if any.
    pub fn source_path(&self) -> Option<PathBuf> {
        lock(&self.source).as_ref().map(|s| s.path.clone())
    }

    /// Drops the source tensors once loading is complete (they are copied into `Var`s).
    pub fn finish_loading(&self) {
        lock(&self.source).take();
    }

    /// All parameters, sorted by path.
    pub fn vars(&self) -> Vec<(String, Var)> {
        lock(&self.vars)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Total number of parameter values, aliases included (peft counts a tied adapter's
    /// parameters on both layers).
    pub fn num_params(&self) -> usize {
        let own: usize = lock(&self.vars).values().map(|v| v.elem_count()).sum();
        own + self.alias_params()
    }

    /// Values counted under aliases ([`ParamBuilder::alias`]).
    pub fn alias_params(&self) -> usize {
        let vars = lock(&self.vars);
        lock(&self.aliases)
            .values()
            .filter_map(|(source, _)| vars.get(source))
            .map(|v| v.elem_count())
            .sum()
    }

    /// Whether the checkpoint being loaded holds a parameter under the module `prefix`.
    pub fn source_has_module(&self, prefix: &str) -> bool {
        let dotted = format!("{prefix}.");
        lock(&self.source)
            .as_ref()
            .is_some_and(|s| s.tensors.keys().any(|k| k.starts_with(&dotted)))
    }

    /// Whether some parameters are aliases of others (tied adapters).
    pub fn has_aliases(&self) -> bool {
        !lock(&self.aliases).is_empty()
    }

    /// The tensors as saved: checkpoint keys (prefix + path) and F32 values, aliases included.
    pub fn checkpoint_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let vars = lock(&self.vars);
        let mut out = vars
            .iter()
            .map(|(k, v)| {
                Ok((
                    format!("{}{k}", self.key_prefix),
                    v.as_tensor().to_dtype(DType::F32)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        for (key, (t, persistent)) in lock(&self.buffers).iter() {
            if *persistent {
                out.push((key.clone(), t.to_dtype(DType::F32)?));
            }
        }
        for (alias, (source, transposed)) in lock(&self.aliases).iter() {
            let Some(var) = vars.get(source) else {
                return Err(PeftError::InvalidState(format!(
                    "parameter `{alias}` aliases `{source}`, which does not exist"
                )));
            };
            let t = var.as_tensor().to_dtype(DType::F32)?;
            let t = if *transposed { t.t()?.contiguous()? } else { t };
            out.push((format!("{}{alias}", self.key_prefix), t));
        }
        Ok(out)
    }

    /// Adds `var` at `path` (a parameter made elsewhere, such as a base bias an adapter trains).
    pub(crate) fn insert_var(&self, path: &str, var: Var) {
        lock(&self.vars).insert(path.to_string(), var);
    }

    /// Removes every parameter under `prefix` (used to undo a half-built adapter).
    pub fn remove_under(&self, prefix: &str) {
        lock(&self.vars).retain(|k, _| !k.starts_with(prefix));
    }
}

/// A cursor into a [`ParamStore`] at a module path, like candle's `VarBuilder`.
#[derive(Debug, Clone)]
pub struct ParamBuilder {
    store: Arc<ParamStore>,
    prefix: String,
}

impl ParamBuilder {
    /// Descends into a sub-module.
    pub fn pp(&self, name: impl AsRef<str>) -> ParamBuilder {
        let name = name.as_ref();
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        };
        ParamBuilder {
            store: Arc::clone(&self.store),
            prefix,
        }
    }

    /// The full path of parameter `name` under this builder.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Gets (loads or initialises) the parameter `name` with `shape`.
    pub fn get(&self, shape: &[usize], name: &str, init: Init) -> Result<Tensor> {
        self.store.get_or_create(&self.path(name), shape, init)
    }

    /// Gets the parameter `name` with `shape`: loaded from the checkpoint, or (when
    /// initialising) the value `init` computes from a generator seeded for this parameter.
    pub fn get_with(
        &self,
        shape: &[usize],
        name: &str,
        mut init: impl FnMut(&mut StdRng) -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.store
            .get_or_create_with(&self.path(name), shape, &mut init)
    }

    /// A frozen tensor shared by all of the adapter's layers (VeRA's random projections),
    /// saved under the checkpoint key `key` itself (not under this builder's path) when
    /// `persistent`: read from the checkpoint being loaded when that holds `key` (a different
    /// shape is an error naming the file), computed by `init` otherwise (always, when not
    /// `persistent`). Never trained nor counted as a parameter; every layer asking for `key`
    /// gets the same tensor.
    pub fn shared_buffer(
        &self,
        key: &str,
        shape: &[usize],
        persistent: bool,
        init: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        let mut init = Some(init);
        self.store
            .shared_buffer(key, shape, persistent, &mut || match init.take() {
                Some(f) => f(),
                None => Err(PeftError::InvalidState(format!(
                    "shared tensor `{key}` initialised twice"
                ))),
            })
    }

    /// Saves and counts the existing parameter `source` (a full path) under `name` here as
    /// well, transposed if `transposed` (a tied adapter reading another layer's factors, as
    /// peft ties them). When loading, the checkpoint's tensor under `name` is taken as read
    /// (it holds the same values); a differing one is reported.
    pub fn alias(&self, name: &str, source: &str, transposed: bool) -> Result<()> {
        let path = self.path(name);
        if let Some(src) = lock(&self.store.source).as_mut() {
            if let Some((key, saved)) = src.tensors.get(&path).cloned() {
                src.used.insert(path.clone());
                let vars = lock(&self.store.vars);
                if let Some(var) = vars.get(source) {
                    let want = var.as_tensor().to_dtype(DType::F32)?;
                    let want = if transposed { want.t()? } else { want };
                    let same = saved.dims() == want.dims()
                        && (saved.to_dtype(DType::F32)?.to_device(want.device())? - &want)?
                            .abs()?
                            .max_all()?
                            .to_scalar::<f32>()?
                            <= 1e-6;
                    if !same {
                        tracing::warn!(
                            "{}: `{key}` is tied to `{source}` but holds other values; the tied values are used",
                            src.path.display()
                        );
                    }
                }
            }
        }
        lock(&self.store.aliases).insert(path, (source.to_string(), transposed));
        Ok(())
    }

    /// A seed for auxiliary randomness (such as dropout) of the module at this path, derived
    /// from the adapter's seed so runs with the same seed repeat exactly.
    pub fn seed(&self, name: &str) -> u64 {
        self.store.seed ^ fnv1a(&self.path(name)).rotate_left(17)
    }

    /// The device parameters live on.
    pub fn device(&self) -> &Device {
        &self.store.device
    }

    /// Whether the checkpoint being loaded holds parameter `name` under this builder.
    pub fn source_contains(&self, name: &str) -> bool {
        let path = self.path(name);
        lock(&self.store.source)
            .as_ref()
            .is_some_and(|s| s.tensors.contains_key(&path))
    }

    /// Whether parameters come from a checkpoint rather than a fresh init.
    pub fn is_loading(&self) -> bool {
        lock(&self.store.source).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_seeded_and_order_independent() {
        let dev = Device::Cpu;
        let a = ParamStore::new(7, &dev, "");
        let b = ParamStore::new(7, &dev, "");
        let init = Init::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let a1 = a.root().get(&[3, 4], "x.w", init).unwrap();
        let a2 = a.root().get(&[2], "y.w", init).unwrap();
        let b2 = b.root().get(&[2], "y.w", init).unwrap();
        let b1 = b.root().get(&[3, 4], "x.w", init).unwrap();
        assert_eq!(a1.to_vec2::<f32>().unwrap(), b1.to_vec2::<f32>().unwrap());
        assert_eq!(a2.to_vec1::<f32>().unwrap(), b2.to_vec1::<f32>().unwrap());
        assert_ne!(
            a1.to_vec2::<f32>().unwrap()[0],
            a1.to_vec2::<f32>().unwrap()[1]
        );
    }

    #[test]
    fn loading_checks_presence_and_shape() {
        let dev = Device::Cpu;
        let t = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let store = ParamStore::from_tensors(
            Path::new("f.safetensors"),
            vec![
                ("base_model.model.a.w".into(), t.clone()),
                ("extra".into(), t),
            ],
            &dev,
            BASE_MODEL_PREFIX,
        );
        assert!(store.root().get(&[2, 3], "a.w", Init::Zeros).is_ok());
        let err = store
            .root()
            .get(&[2, 3], "b.w", Init::Zeros)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("f.safetensors") && err.contains("base_model.model.b.w"),
            "{err}"
        );
        let store2 = ParamStore::from_tensors(
            Path::new("f.safetensors"),
            vec![(
                "a.w".into(),
                Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
            )],
            &dev,
            BASE_MODEL_PREFIX,
        );
        let err = store2
            .root()
            .get(&[3, 2], "a.w", Init::Zeros)
            .unwrap_err()
            .to_string();
        assert!(err.contains("[3, 2]") && err.contains("[2, 3]"), "{err}");
        assert_eq!(store.unused_source_keys(), vec!["extra".to_string()]);
    }
}
