//! `LoraConfig`: peft 0.21's LoRA fields, parsed from and written to `adapter_config.json`.
//!
//! Fields this crate implements are typed. Fields peft knows but this crate does not
//! implement are accepted only at their inert (default) values and written back as read;
//! a value that would change behaviour (LoftQ, PiSSA, layer replication, ...) is a clear
//! [`PeftError::Unsupported`] error, never silently ignored.

use peft_core::json::{describe, write_derived, ConfigFields};
pub use peft_core::low_rank::LowRank;
use peft_core::low_rank::{take_alpha_pattern, take_rank_pattern, write_patterns};
use peft_core::{CommonConfig, MethodConfig, PeftError, Result, TargetModules, TargetSpec};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};

/// How LoRA weights are initialised (`init_lora_weights`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InitLoraWeights {
    /// `true`: A as `nn.Linear`'s default (kaiming uniform), B zero: the adapter starts as a no-op.
    Default,
    /// `false`: A and B both random (for tests; the adapter starts as a change).
    Random,
    /// `"gaussian"`: A normal with std `1/r`, B zero.
    Gaussian,
    /// `"orthogonal"`: A and B random with `B A = 0` (the rows of an orthogonal `r x r` matrix
    /// split between them), so the adapter starts as a no-op with neither factor zero; the
    /// rank must be even.
    Orthogonal,
    /// `"pissa"` / `"pissa_niter_N"`: A and B from the leading singular triplets of the base
    /// weight (exact, or a randomized SVD with `N` power iterations), the base keeping the
    /// residual (PiSSA).
    Pissa {
        /// `N` of `pissa_niter_N`; `None` for the exact SVD.
        niter: Option<usize>,
    },
    /// `"olora"`: A and B from the QR decomposition of the base weight, the base keeping the
    /// residual (OLoRA).
    Olora,
    /// `"loftq"` with `loftq_config` `{loftq_bits, loftq_iter}`: the base weight becomes its
    /// quantized-dequantized form `Q` and `B A` the rank-`r` SVD of `W - Q`, alternated
    /// `loftq_iter` times (LoftQ); NF4 (4 bits) or int8 (8 bits).
    Loftq {
        /// `loftq_bits`: 4 (NF4) or 8 (int8).
        bits: u8,
        /// `loftq_iter`: alternations (at least 1).
        iters: usize,
    },
    /// Another peft initialisation (`"eva"`, `"corda"`, ...), kept as written. Only
    /// those that leave the base weights alone can be loaded from a checkpoint; none can
    /// initialise a fresh adapter here.
    Other(String),
}

impl InitLoraWeights {
    /// The JSON form.
    pub fn to_json(&self) -> Value {
        match self {
            InitLoraWeights::Default => Value::Bool(true),
            InitLoraWeights::Random => Value::Bool(false),
            InitLoraWeights::Gaussian => Value::from("gaussian"),
            InitLoraWeights::Orthogonal => Value::from("orthogonal"),
            InitLoraWeights::Pissa { niter: None } => Value::from("pissa"),
            InitLoraWeights::Pissa { niter: Some(n) } => Value::from(format!("pissa_niter_{n}")),
            InitLoraWeights::Olora => Value::from("olora"),
            InitLoraWeights::Loftq { .. } => Value::from("loftq"),
            InitLoraWeights::Other(s) => Value::from(s.as_str()),
        }
    }

    /// Whether the initialisation rewrites the base weight (PiSSA, OLoRA, LoftQ).
    pub fn rewrites_base(&self) -> bool {
        matches!(
            self,
            InitLoraWeights::Pissa { .. } | InitLoraWeights::Olora | InitLoraWeights::Loftq { .. }
        )
    }

    /// Whether an adapter saved with this init can be loaded: the init only chose starting
    /// values and did not rewrite the base weights.
    pub fn loadable(&self) -> bool {
        match self {
            InitLoraWeights::Other(s) => matches!(s.as_str(), "eva" | "orthogonal" | "mica"),
            _ => true,
        }
    }
}

/// Which base biases a LoRA adapter trains and saves (`bias`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum LoraBias {
    /// `"none"`.
    #[default]
    #[serde(rename = "none")]
    None,
    /// `"all"`: every bias of the model.
    #[serde(rename = "all")]
    All,
    /// `"lora_only"`: the biases of the layers LoRA adapts.
    #[serde(rename = "lora_only")]
    LoraOnly,
}

/// Inits peft 0.21 knows besides `true`, `false` and `"gaussian"`.
const OTHER_INITS: &[&str] = &[
    "eva",
    "olora",
    "pissa",
    "corda",
    "loftq",
    "orthogonal",
    "lora_ga",
    "mica",
];

/// The LoRA configuration (peft's `LoraConfig`). The plain fields are read and written by
/// serde; the skipped ones have their own readers (peft's JSON allows several shapes there).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    /// LoRA rank `r` (default 8).
    pub r: usize,
    /// `lora_alpha` (default 8), kept as written (int or float).
    pub lora_alpha: Number,
    /// `lora_dropout` probability, applied to the layer input in training only.
    pub lora_dropout: f64,
    /// Module selection: `target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `modules_to_save`.
    #[serde(skip)]
    pub targets: TargetSpec,
    /// `fan_in_fan_out`: the base stores its weight `[in, out]` (GPT-2's Conv1D). Core reads the
    /// layout from the layer itself, as peft corrects a wrong flag with a warning.
    pub fan_in_fan_out: bool,
    /// `use_rslora`: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
    /// `use_dora`: weight-decomposed LoRA (a trained magnitude per output feature).
    pub use_dora: bool,
    /// `bias`: which base biases are trained and saved with the adapter.
    pub bias: LoraBias,
    /// `lora_bias`: `lora_B` has a trained bias (added to `B A x` before the scaling).
    pub lora_bias: bool,
    /// `ensure_weight_tying`: LoRA on an output head tied to the input embedding is tied to
    /// the embedding's LoRA (`lora_A = lora_embedding_Bᵀ`, `lora_B = lora_embedding_Aᵀ`).
    pub ensure_weight_tying: bool,
    /// `init_lora_weights`.
    #[serde(skip)]
    pub init_lora_weights: InitLoraWeights,
    /// `rank_pattern`: per-module ranks, first matching key wins (file order).
    #[serde(skip)]
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`: per-module alphas, first matching key wins (file order).
    #[serde(skip)]
    pub alpha_pattern: Vec<(String, Number)>,
    /// `layer_replication`: `[start, end)` ranges the base's layer stack is rebuilt from.
    #[serde(skip)]
    pub layer_replication: Option<Vec<(usize, usize)>>,
    /// `trainable_token_indices`: embedding rows trained beside the adapter.
    #[serde(skip)]
    pub trainable_token_indices: Option<peft_core::tokens::TokenIndices>,
    /// peft fields this crate does not implement, at their inert values (written back); every
    /// such field is present, at its default when the file lacked it.
    #[serde(skip)]
    pub inert: Map<String, Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 8,
            lora_alpha: Number::from(8),
            lora_dropout: 0.0,
            targets: TargetSpec::default(),
            fan_in_fan_out: false,
            use_rslora: false,
            use_dora: false,
            bias: LoraBias::None,
            lora_bias: false,
            ensure_weight_tying: false,
            init_lora_weights: InitLoraWeights::Default,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
            trainable_token_indices: None,
            layer_replication: None,
            inert: inert_defaults()
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        }
    }
}

/// peft 0.21 LoRA fields not implemented here, with their defaults (written when absent).
fn inert_defaults() -> Vec<(&'static str, Value)> {
    vec![
        ("alora_invocation_tokens", Value::Null),
        ("arrow_config", Value::Null),
        ("corda_config", Value::Null),
        ("eva_config", Value::Null),
        ("kasa_config", Value::Null),
        ("loftq_config", Value::Object(Map::new())),
        ("lora_ga_config", Value::Null),
        ("megatron_config", Value::Null),
        ("megatron_core", Value::from("megatron.core")),
        ("monteclora_config", Value::Null),
        ("qalora_group_size", Value::from(16)),
        ("target_parameters", Value::Null),
        ("use_bdlora", Value::Null),
        ("use_qalora", Value::Bool(false)),
        ("velora_config", Value::Null),
    ]
}

/// Whether a value is "off": null, false, or an empty list/object.
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn unsupported(fields: &ConfigFields, key: &str, value: &Value, reason: &str) -> PeftError {
    PeftError::Unsupported {
        source_name: fields.source_name().to_string(),
        key: key.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

/// Takes the inert fields, refusing values that would change behaviour.
fn take_inert(fields: &mut ConfigFields, init: &InitLoraWeights) -> Result<Map<String, Value>> {
    let mut inert = Map::new();
    for (key, default) in inert_defaults() {
        let Some(value) = fields.take_raw(key) else {
            inert.insert(key.to_string(), default);
            continue;
        };
        let init_str = match init {
            InitLoraWeights::Other(s) => s.as_str(),
            _ => "",
        };
        let ok = match key {
            "megatron_core" | "qalora_group_size" => true,
            // peft ignores (with a warning) these sub-configs unless the matching init is chosen.
            "eva_config" | "corda_config" | "loftq_config" | "lora_ga_config" => {
                let owner = key.trim_end_matches("_config");
                if !is_off(&value) && init_str != owner {
                    tracing::warn!(
                        "{}: `{key}` is ignored because init_lora_weights is not '{owner}'",
                        fields.source_name()
                    );
                }
                true
            }
            _ => is_off(&value),
        };
        if !ok {
            let reason = match key {
                "target_parameters" => "targeting nn.Parameters directly is not implemented",
                "alora_invocation_tokens" => "activated LoRA (aLoRA) is not implemented",
                "use_qalora" => "QALoRA needs a GPTQ base, which is not implemented",
                "megatron_config" => "Megatron parallel layers are not supported",
                _ => "this LoRA variant is not implemented",
            };
            return Err(unsupported(fields, key, &value, reason));
        }
        inert.insert(key.to_string(), value);
    }
    Ok(inert)
}

/// `layer_replication`: a list of `[start, end]` pairs.
fn parse_layer_replication(source: &str, v: &Value) -> Result<Vec<(usize, usize)>> {
    let bad = || {
        PeftError::config_value(
            source,
            "layer_replication",
            "a list of [start, end] layer ranges, e.g. [[0, 4], [2, 5]]",
            describe(v),
        )
    };
    v.as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|pair| match pair.as_array().map(Vec::as_slice) {
            Some([a, b]) => match (a.as_u64(), b.as_u64()) {
                (Some(a), Some(b)) => Ok((a as usize, b as usize)),
                _ => Err(bad()),
            },
            _ => Err(bad()),
        })
        .collect()
}

/// LoftQ's bits and iterations from `loftq_config`, checked as peft checks them.
fn loftq_settings(source: &str, inert: &Map<String, Value>) -> Result<InitLoraWeights> {
    let config = inert
        .get("loftq_config")
        .and_then(Value::as_object)
        .filter(|o| !o.is_empty())
        .ok_or_else(|| PeftError::MissingKey {
            source_name: source.to_string(),
            key: "loftq_config".into(),
            expected: "`loftq_config` must be specified when `init_lora_weights` is 'loftq' \
                       ({\"loftq_bits\": 4, \"loftq_iter\": 1})"
                .into(),
        })?;
    let int = |key: &str, default: u64| -> Result<u64> {
        match config.get(key) {
            None => Ok(default),
            Some(v) => v.as_u64().ok_or_else(|| {
                PeftError::config_value(
                    source,
                    &format!("loftq_config.{key}"),
                    "a positive integer",
                    describe(v),
                )
            }),
        }
    };
    let bits = int("loftq_bits", 4)?;
    if bits != 4 && bits != 8 {
        return Err(PeftError::config_value(
            source,
            "loftq_config.loftq_bits",
            "4 (NF4) or 8 (int8): only nf4 and int8 quantization is supported",
            bits,
        ));
    }
    let iters = int("loftq_iter", 1)?;
    if iters == 0 {
        return Err(PeftError::config_value(
            source,
            "loftq_config.loftq_iter",
            "at least 1 (number of iterations must be greater than 0)",
            iters,
        ));
    }
    Ok(InitLoraWeights::Loftq {
        bits: bits as u8,
        iters: iters as usize,
    })
}

fn parse_init(fields: &mut ConfigFields) -> Result<InitLoraWeights> {
    match fields.take_raw("init_lora_weights") {
        None | Some(Value::Bool(true)) => Ok(InitLoraWeights::Default),
        Some(Value::Bool(false)) => Ok(InitLoraWeights::Random),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("gaussian") => {
            Ok(InitLoraWeights::Gaussian)
        }
        Some(Value::String(s)) if s == "orthogonal" => Ok(InitLoraWeights::Orthogonal),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("olora") => Ok(InitLoraWeights::Olora),
        Some(Value::String(s)) if s == "pissa" => Ok(InitLoraWeights::Pissa { niter: None }),
        // The bits and iterations come from `loftq_config` (read with the other sub-configs).
        Some(Value::String(s)) if s == "loftq" => Ok(InitLoraWeights::Loftq { bits: 4, iters: 1 }),
        Some(Value::String(s)) if s.starts_with("pissa") => {
            // peft: "pissa_niter_[number of iters]", else a ValueError.
            match s.split("_niter_").collect::<Vec<_>>()[..] {
                ["pissa", n] if n.parse::<usize>().is_ok() => Ok(InitLoraWeights::Pissa {
                    niter: n.parse().ok(),
                }),
                _ => Err(PeftError::config_value(
                    fields.source_name(),
                    "init_lora_weights",
                    "\"pissa\" or \"pissa_niter_[number of iters]\"",
                    format!("\"{s}\""),
                )),
            }
        }
        Some(Value::String(s))
            if OTHER_INITS.contains(&s.as_str())
                || s.starts_with("pissa")
                || s.starts_with("corda") =>
        {
            Ok(InitLoraWeights::Other(s))
        }
        Some(v) => Err(PeftError::config_value(
            fields.source_name(),
            "init_lora_weights",
            "true, false, \"gaussian\" or a peft initialisation name",
            describe(&v),
        )),
    }
}

/// Parses a LoRA config's own fields (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    Ok(Box::new(LoraConfig::from_fields(fields)?))
}

impl LoraConfig {
    /// A config with rank `r` and `lora_alpha`, other fields at peft's defaults.
    pub fn new(r: usize, lora_alpha: f64) -> Self {
        LoraConfig {
            r,
            lora_alpha: number(lora_alpha),
            ..Default::default()
        }
    }

    /// Targets these module names (exact names or dotted suffixes).
    pub fn with_target_modules<S: Into<String>>(
        mut self,
        names: impl IntoIterator<Item = S>,
    ) -> Self {
        self.targets.target_modules = Some(TargetModules::List(
            names.into_iter().map(Into::into).collect(),
        ));
        self
    }

    /// Targets modules whose full name matches `regex`.
    pub fn with_target_regex(mut self, regex: impl Into<String>) -> Self {
        self.targets.target_modules = Some(TargetModules::Regex(regex.into()));
        self
    }

    /// Targets every linear layer except the output head.
    pub fn with_all_linear(mut self) -> Self {
        self.targets.target_modules = Some(TargetModules::AllLinear);
        self
    }

    /// Sets `lora_dropout`.
    pub fn with_dropout(mut self, p: f64) -> Self {
        self.lora_dropout = p;
        self
    }

    /// Sets `use_rslora`.
    pub fn with_rslora(mut self, on: bool) -> Self {
        self.use_rslora = on;
        self
    }

    /// Sets `use_dora`.
    pub fn with_dora(mut self, on: bool) -> Self {
        self.use_dora = on;
        self
    }

    /// Sets `bias` (which base biases are trained).
    pub fn with_bias(mut self, bias: LoraBias) -> Self {
        self.bias = bias;
        self
    }

    /// Sets `lora_bias` (a trained bias on `lora_B`).
    pub fn with_lora_bias(mut self, on: bool) -> Self {
        self.lora_bias = on;
        self
    }

    /// Sets `init_lora_weights`.
    pub fn with_init(mut self, init: InitLoraWeights) -> Self {
        self.init_lora_weights = init;
        self
    }

    /// `lora_alpha` as a float.
    pub fn alpha(&self) -> f64 {
        self.lora_alpha.as_f64().unwrap_or(8.0)
    }

    fn from_fields(fields: &mut ConfigFields) -> Result<Self> {
        let plain: LoraConfig = fields.take_derived()?;
        if plain.r == 0 {
            return Err(PeftError::config_value(
                fields.source_name(),
                "r",
                "a positive integer",
                "0",
            ));
        }
        if !(0.0..1.0).contains(&plain.lora_dropout) {
            return Err(PeftError::config_value(
                fields.source_name(),
                "lora_dropout",
                "a probability in [0, 1)",
                plain.lora_dropout,
            ));
        }
        let targets = TargetSpec::take_fields(fields, true)?;
        let rank_pattern = take_rank_pattern(fields)?;
        let alpha_pattern = take_alpha_pattern(fields)?;
        let init_lora_weights = parse_init(fields)?;
        let trainable_token_indices = match fields.take_raw("trainable_token_indices") {
            Some(v) => peft_core::tokens::TokenIndices::from_json(fields.source_name(), &v)?,
            None => None,
        };
        let layer_replication = match fields.take_raw("layer_replication") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_layer_replication(fields.source_name(), &v)?),
        };
        let mut inert = take_inert(fields, &init_lora_weights)?;
        let init_lora_weights = match init_lora_weights {
            InitLoraWeights::Loftq { .. } => loftq_settings(fields.source_name(), &inert)?,
            other => {
                // peft empties a loftq_config that its init does not use.
                if inert.get("loftq_config").is_some_and(|v| !is_off(v)) {
                    inert.insert("loftq_config".into(), Value::Object(Map::new()));
                }
                other
            }
        };
        // peft's LoraConfig.__post_init__ checks.
        if plain.lora_bias && plain.use_dora {
            return Err(PeftError::config_value(
                fields.source_name(),
                "lora_bias",
                "false with use_dora=true (peft does not support lora_bias for DoRA)",
                "true",
            ));
        }
        if plain.lora_bias
            && !matches!(
                init_lora_weights,
                InitLoraWeights::Default | InitLoraWeights::Random
            )
        {
            return Err(PeftError::config_value(
                fields.source_name(),
                "lora_bias",
                "false unless init_lora_weights is true or false (as peft requires)",
                "true",
            ));
        }
        if plain.use_rslora
            && (!rank_pattern.is_empty() || !alpha_pattern.is_empty())
            && init_lora_weights.rewrites_base()
        {
            tracing::warn!(
                "{}: rsLoRA with rank_pattern/alpha_pattern and {}: the adapter cannot be \
                 converted to a plain LoRA after training (as in peft)",
                fields.source_name(),
                init_lora_weights.to_json()
            );
        }
        Ok(LoraConfig {
            targets,
            trainable_token_indices,
            layer_replication,
            init_lora_weights,
            rank_pattern,
            alpha_pattern,
            inert,
            ..plain
        })
    }
}

/// A JSON number for `x`, an integer when `x` is whole (as peft writes `lora_alpha: 16`).
fn number(x: f64) -> Number {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        Number::from(x as i64)
    } else {
        Number::from_f64(x).unwrap_or_else(|| Number::from(0))
    }
}

/// LoRA's rank and alpha settings, resolved per module by core (`rank_and_alpha`, `scaling`).
impl LowRank for LoraConfig {
    fn base_rank(&self) -> usize {
        self.r
    }
    fn base_alpha(&self) -> f64 {
        self.alpha()
    }
    fn rank_pattern(&self) -> &[(String, usize)] {
        &self.rank_pattern
    }
    fn alpha_pattern(&self) -> &[(String, Number)] {
        &self.alpha_pattern
    }
    fn rank_stabilized(&self) -> bool {
        self.use_rslora
    }
}

impl MethodConfig for LoraConfig {
    fn peft_type(&self) -> &'static str {
        crate::PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for (key, default) in inert_defaults() {
            out.insert(
                key.to_string(),
                self.inert.get(key).cloned().unwrap_or(default),
            );
        }
        write_derived(self, &mut out);
        self.targets.write_fields(&mut out, true);
        out.insert("init_lora_weights".into(), self.init_lora_weights.to_json());
        out.insert(
            "layer_replication".into(),
            self.layer_replication.as_ref().map_or(Value::Null, |m| {
                Value::from(m.iter().map(|&(a, b)| vec![a, b]).collect::<Vec<_>>())
            }),
        );
        out.insert(
            "trainable_token_indices".into(),
            self.trainable_token_indices
                .as_ref()
                .map_or(Value::Null, |t| t.to_json()),
        );
        write_patterns(&mut out, &self.rank_pattern, &self.alpha_pattern);
        out
    }

    fn ensure_weight_tying(&self) -> bool {
        self.ensure_weight_tying
    }

    fn layer_replication(&self) -> Option<&[(usize, usize)]> {
        self.layer_replication.as_deref()
    }

    fn trainable_token_indices(&self) -> Option<&peft_core::tokens::TokenIndices> {
        self.trainable_token_indices.as_ref()
    }

    peft_core::layer_method_casts!();
}
