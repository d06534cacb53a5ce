//! `peft combine`: combine adapters into a new one (peft's `add_weighted_adapter`) and write it
//! in peft's format.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use peft::{Combination, CombinationType, MajoritySign};

/// Arguments of `peft combine`.
#[derive(Debug, Args)]
pub struct CombineArgs {
    /// The base model folder (or .gguf file) the adapters were trained on.
    #[arg(long)]
    pub model: PathBuf,
    /// The adapters to combine, `DIR` or `NAME=DIR`, in order (two at least, or one to rescale).
    #[arg(long, required = true)]
    pub adapter: Vec<super::AdapterArg>,
    /// One weight per adapter, comma-separated (negative subtracts: `--weights 1,-0.5`).
    #[arg(
        long,
        value_delimiter = ',',
        allow_hyphen_values = true,
        required = true
    )]
    pub weights: Vec<f64>,
    /// The combination: svd (LoRA's default), linear, cat, ties, ties_svd, dare_linear,
    /// dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd. IA3
    /// combines linearly only.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Share of values kept by ties, dare_* and magnitude_prune* (in [0, 1]).
    #[arg(long)]
    pub density: Option<f64>,
    /// Rank of an svd result (default: the largest input rank).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Clamp the svd factors to this quantile of their values (in [0, 1]).
    #[arg(long)]
    pub svd_clamp: Option<f64>,
    /// TIES's sign election: total (the sign of the sum) or frequency (the commoner sign).
    #[arg(long, default_value = "total")]
    pub majority_sign: String,
    /// Seed of DARE's random masks.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// The output adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub out: PathBuf,
}

/// Combines and writes the adapter.
pub fn run(args: CombineArgs) -> Result<()> {
    if args.weights.len() != args.adapter.len() {
        bail!(
            "--weights: {} weights for {} adapters; give one per --adapter",
            args.weights.len(),
            args.adapter.len()
        );
    }
    let how = Combination {
        kind: args
            .kind
            .as_deref()
            .map(CombinationType::parse)
            .transpose()?,
        svd_rank: args.svd_rank,
        svd_clamp: args.svd_clamp,
        density: args.density,
        majority_sign_method: MajoritySign::parse(&args.majority_sign)?,
        seed: args.seed,
    };
    let model_path = super::resolve_model(&args.model.to_string_lossy())?;
    let base = super::load_base(&model_path, candle_core::DType::F32)?;
    let mut model = super::with_adapters(base, &args.adapter, false)?;
    let names = model.active_adapters();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    const NAME: &str = "combined";
    let name = if names.iter().any(|n| n == NAME) {
        "combined_adapter"
    } else {
        NAME
    };
    model
        .add_weighted_adapter(&refs, &args.weights, name, &how)
        .context("combining the adapters")?;
    model.save_adapter(name, &args.out)?;
    let adapter = model.adapter(name)?;
    let fields = adapter.config().method.to_json_fields();
    let rank = fields
        .get("r")
        .map(|r| format!(", r = {r}"))
        .unwrap_or_default();
    println!(
        "wrote the combination of {} ({}{rank}, {} modules, {} parameters) to {}",
        refs.join(", "),
        adapter.config().peft_type(),
        adapter.targets().len(),
        peft::peft_model::group_thousands(adapter.num_params()),
        args.out.display()
    );
    Ok(())
}
