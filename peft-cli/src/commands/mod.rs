//! One module per subcommand, plus the helpers they share.

pub mod combine;
pub mod count;
pub mod demo;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod logits;
pub mod merge;
pub mod methods;
pub mod quantize;
pub mod train;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::Device;
use peft::models::Precision;
use peft::{AdaptableModel, PeftModel};

static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// Opens `--device` (`cpu`, `cuda[:N]`, `metal[:N]`; `PEFT_DEVICE` when the flag is absent)
/// for this run: models load straight onto it and their inputs are made there. A device this
/// build lacks, or the machine has not, fails here with what to do.
pub fn set_device(name: &str) -> Result<()> {
    let device = peft::device::open_device(name)?;
    DEVICE
        .set(device)
        .map_err(|_| anyhow::anyhow!("the device is chosen once per run"))
}

/// The device chosen by [`set_device`] (the CPU when none was).
pub fn device() -> &'static Device {
    DEVICE.get_or_init(|| Device::Cpu)
}

/// Parses `--dtype`: f32, bf16, f16 (the whole model in that dtype) or bf16-weights (frozen
/// matrices kept in bf16, half their memory, with f32 compute).
pub fn parse_dtype(s: &str) -> Result<Precision> {
    Ok(Precision::parse(s)?)
}

/// Resolves `--model`: a local folder or GGUF file as is; otherwise a Hugging Face Hub id
/// (`org/name`), downloaded (config, tokenizer files, safetensors) into the hub cache. Offline,
/// the download fails at once with a message that suggests a local path.
pub fn resolve_model(spec: &str) -> Result<PathBuf> {
    let path = PathBuf::from(spec);
    if path.exists() {
        return Ok(path);
    }
    let looks_like_id =
        spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.ends_with(".gguf");
    if !looks_like_id {
        bail!("{spec}: no such model folder or GGUF file");
    }
    download_from_hub(spec).with_context(|| {
        format!(
            "{spec} is not a local path, and downloading it from the Hugging Face Hub failed; \
             offline, pass a local model folder (config.json + safetensors + tokenizer.json) or a .gguf file"
        )
    })
}

fn download_from_hub(id: &str) -> Result<PathBuf> {
    if std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1") {
        bail!("HF_HUB_OFFLINE=1");
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json")?;
    for optional in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        let _ = repo.get(optional);
    }
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let text = std::fs::read_to_string(&index)?;
            let value: serde_json::Value = serde_json::from_str(&text)?;
            let mut shards: Vec<String> = value
                .get("weight_map")
                .and_then(|m| m.as_object())
                .map(|m| {
                    m.values()
                        .filter_map(|v| v.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            shards.sort();
            shards.dedup();
            for shard in shards {
                repo.get(&shard)?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")?;
        }
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

/// The tokenizer for a model: `--tokenizer` (a tokenizer.json file or a folder) if given,
/// else the GGUF file's own or the model folder's `tokenizer.json`.
pub fn load_tokenizer(
    model: &Path,
    tokenizer: Option<&Path>,
) -> Result<peft::models::TextTokenizer> {
    use peft::models::TextTokenizer;
    match tokenizer {
        Some(p) if p.is_file() && p.file_name().is_some_and(|n| n == "tokenizer.json") => Ok(
            TextTokenizer::from_folder(p.parent().unwrap_or(Path::new(".")))?,
        ),
        Some(p) if p.is_file() && p.extension().is_some_and(|e| e == "json") => bail!(
            "--tokenizer {}: expected a tokenizer.json file, a folder holding one, or a .gguf file",
            p.display()
        ),
        Some(p) => Ok(TextTokenizer::for_model(p)?),
        None => Ok(TextTokenizer::for_model(model)?),
    }
}

/// Loads a model folder or a GGUF file onto the run's device ([`device`]). A bitsandbytes-quantized folder (its
/// `config.json` has a `quantization_config`) loads with its layers kept quantized.
pub fn load_base(dir: &Path, dtype: impl Into<Precision>) -> Result<Box<dyn AdaptableModel>> {
    load_base_quant(dir, dtype.into(), None)
}

/// [`load_base`] with its linear layers kept as `quant` says (int8, nf4, nf4-nodq, fp4,
/// fp4-nodq: quantized as they are read; gguf: a GGUF file's blocks kept), for every
/// architecture; prints what is quantized and the resident size to stderr.
pub fn load_base_quant(
    dir: &Path,
    dtype: Precision,
    quant: Option<&str>,
) -> Result<Box<dyn AdaptableModel>> {
    load_base_head(dir, dtype, quant, None)
}

/// [`load_base_quant`] with a sequence-classification head of `head.0` classes built over the
/// checkpoint's encoder (`--num-labels`), initialised from seed `head.1` where the checkpoint
/// has no head.
pub fn load_base_head(
    dir: &Path,
    dtype: Precision,
    quant: Option<&str>,
    head: Option<(usize, u64)>,
) -> Result<Box<dyn AdaptableModel>> {
    let head = head.map(|(num_labels, seed)| peft::models::HeadSpec {
        task: peft::TaskType::SeqCls,
        num_labels,
        seed,
    });
    let mut model = peft::bases::load_base_with_head(dir, dtype, device(), quant, head)?;
    let what = match quant {
        None => "loaded quantized",
        Some("gguf") => "kept GGUF blocks for",
        Some(_) => "quantized",
    };
    if !peft::quant::quantized_layers(model.as_mut())?.is_empty() {
        report_quantized(model.as_mut(), what)?;
    }
    Ok(model)
}

fn report_quantized(model: &mut dyn AdaptableModel, what: &str) -> Result<()> {
    let layers = peft::quant::quantized_layers(model)?;
    let params: usize = layers
        .iter()
        .map(|(_, l)| peft::LinearLike::in_features(l) * peft::LinearLike::out_features(l))
        .sum();
    let bytes: usize = layers.iter().map(|(_, l)| l.resident_bytes()).sum();
    let format = layers
        .first()
        .map(|(_, l)| l.quant_weight().format_name())
        .unwrap_or_default();
    eprintln!(
        "{what} {} linear layers ({format}): {params} parameters in {:.1} MB ({:.4} bytes/parameter)",
        layers.len(),
        bytes as f64 / 1e6,
        bytes as f64 / params.max(1) as f64
    );
    Ok(())
}

/// An `--adapter` value: `DIR`, or `NAME=DIR` to choose the adapter's name (an existing path
/// is always a folder, whatever it contains).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterArg {
    /// The name given with `NAME=`, if any.
    pub name: Option<String>,
    /// The adapter folder.
    pub dir: PathBuf,
}

impl AdapterArg {
    /// A folder loaded under the default naming.
    pub fn unnamed(dir: PathBuf) -> Self {
        AdapterArg { name: None, dir }
    }
}

impl std::str::FromStr for AdapterArg {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        if Path::new(s).exists() {
            return Ok(AdapterArg::unnamed(s.into()));
        }
        match s.split_once('=') {
            Some((name, dir))
                if !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')) =>
            {
                if dir.is_empty() {
                    return Err(format!("`{s}`: no folder after `{name}=`"));
                }
                Ok(AdapterArg {
                    name: Some(name.to_string()),
                    dir: dir.into(),
                })
            }
            _ => Ok(AdapterArg::unnamed(s.into())),
        }
    }
}

/// The folders of `adapters`, in order.
pub fn adapter_dirs(adapters: &[AdapterArg]) -> Vec<PathBuf> {
    adapters.iter().map(|a| a.dir.clone()).collect()
}

/// Loads `adapters` onto `base` and makes them all active. Unnamed ones are `default` (the
/// first), then `adapter_1`, `adapter_2`, ... by position; `NAME=DIR` names one.
pub fn with_adapters(
    base: Box<dyn AdaptableModel>,
    adapters: &[AdapterArg],
    trainable: bool,
) -> Result<PeftModel> {
    let mut model = PeftModel::new(base);
    let mut names: Vec<String> = Vec::new();
    for (i, arg) in adapters.iter().enumerate() {
        let name = match &arg.name {
            Some(n) => n.clone(),
            None if i == 0 => peft::DEFAULT_ADAPTER.to_string(),
            None => format!("adapter_{i}"),
        };
        if names.contains(&name) {
            bail!("--adapter: two adapters are named `{name}`; name them with NAME=DIR");
        }
        model
            .load_adapter(&arg.dir, &name, trainable)
            .with_context(|| format!("loading adapter {}", arg.dir.display()))?;
        names.push(name);
    }
    if !names.is_empty() {
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        model.set_adapters(&refs)?;
    }
    Ok(model)
}

/// `--row-adapters`: one adapter name per batch row (`__base__` for none), checked against
/// the batch size.
pub fn row_adapters(names: &[String], rows: usize) -> Result<()> {
    if names.len() != rows {
        bail!(
            "--row-adapters: {} names for {rows} batch rows; give one per row (`__base__` for the base model)",
            names.len()
        );
    }
    Ok(())
}
