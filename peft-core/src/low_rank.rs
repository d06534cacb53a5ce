//! What low-rank methods share (LoRA now; LoHa, LoKr, AdaLoRA and the other LyCORIS-style
//! methods next): a base rank and alpha, peft's per-module `rank_pattern` / `alpha_pattern`
//! overrides (a key applies to a module when `(.*\.)?(key)$` matches its path; the first
//! matching key wins, in file order), and the scaling `alpha / r` (or rsLoRA's
//! `alpha / sqrt(r)`). A method's config implements [`LowRank`] with its field values and gets
//! the per-module resolution; [`take_rank_pattern`] / [`take_alpha_pattern`] and
//! [`write_patterns`] read and write the patterns as peft does.

use serde_json::{Map, Number, Value};

use crate::delta::{require_linear_layout, DeltaLinear, DeltaWeight, Drops};
use crate::error::Result;
use crate::json::ConfigFields;
use crate::layers::LinearLike;
use crate::method::LinearAdapter;
use crate::targets::{pattern_value, TargetModules};
use crate::vars::ParamBuilder;

/// A low-rank method's rank and alpha settings.
pub trait LowRank {
    /// The rank for modules no `rank_pattern` key matches (`r`).
    fn base_rank(&self) -> usize;
    /// The alpha for modules no `alpha_pattern` key matches (`lora_alpha`, `alpha`).
    fn base_alpha(&self) -> f64;
    /// `rank_pattern`, in file order.
    fn rank_pattern(&self) -> &[(String, usize)];
    /// `alpha_pattern`, in file order.
    fn alpha_pattern(&self) -> &[(String, Number)];
    /// Whether the scaling is rsLoRA's `alpha / sqrt(r)` (`use_rslora`).
    fn rank_stabilized(&self) -> bool {
        false
    }

    /// `(r, alpha)` for the module at `path`, after the patterns.
    fn rank_and_alpha(&self, path: &str) -> (usize, f64) {
        let r = pattern_value(self.rank_pattern(), path)
            .copied()
            .unwrap_or(self.base_rank());
        let alpha = pattern_value(self.alpha_pattern(), path)
            .and_then(Number::as_f64)
            .unwrap_or_else(|| self.base_alpha());
        (r, alpha)
    }

    /// The scaling of the low-rank update: `alpha / r`, or `alpha / sqrt(r)` when
    /// [`LowRank::rank_stabilized`].
    fn scaling(&self, r: usize, alpha: f64) -> f64 {
        if self.rank_stabilized() {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }
}

/// Reads `rank_pattern` (module key to a positive integer rank), keeping file order.
pub fn take_rank_pattern(fields: &mut ConfigFields) -> Result<Vec<(String, usize)>> {
    fields.take_positive_usize_map("rank_pattern", "a positive integer rank")
}

/// Reads `alpha_pattern` (module key to a number, kept as written), keeping file order.
pub fn take_alpha_pattern(fields: &mut ConfigFields) -> Result<Vec<(String, Number)>> {
    fields.take_number_map("alpha_pattern")
}

/// Writes `rank_pattern` and `alpha_pattern` as peft does (objects, `{}` when empty).
pub fn write_patterns(
    out: &mut Map<String, Value>,
    rank_pattern: &[(String, usize)],
    alpha_pattern: &[(String, Number)],
) {
    out.insert(
        "rank_pattern".into(),
        Value::Object(
            rank_pattern
                .iter()
                .map(|(k, r)| (k.clone(), Value::from(*r)))
                .collect(),
        ),
    );
    out.insert(
        "alpha_pattern".into(),
        Value::Object(
            alpha_pattern
                .iter()
                .map(|(k, a)| (k.clone(), Value::Number(a.clone())))
                .collect(),
        ),
    );
}

/// The settings peft's LyCORIS-style configs share (`LoHaConfig`, `LoKrConfig`): `r`, `alpha`,
/// `rank_dropout`, `module_dropout`, `use_effective_conv2d`, `rank_pattern`, `alpha_pattern`.
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisSettings {
    /// `r`.
    pub r: usize,
    /// `alpha`, as written (peft writes an integer when it is one).
    pub alpha: Number,
    /// `rank_dropout`.
    pub rank_dropout: f64,
    /// `module_dropout`.
    pub module_dropout: f64,
    /// `use_effective_conv2d` (convolutions only; kept for the file).
    pub use_effective_conv2d: bool,
    /// `rank_pattern`.
    pub rank_pattern: Vec<(String, usize)>,
    /// `alpha_pattern`.
    pub alpha_pattern: Vec<(String, Number)>,
}

impl Default for LycorisSettings {
    /// peft's defaults: `r=8`, `alpha=8`, no dropout.
    fn default() -> Self {
        LycorisSettings {
            r: 8,
            alpha: Number::from(8),
            rank_dropout: 0.0,
            module_dropout: 0.0,
            use_effective_conv2d: false,
            rank_pattern: Vec::new(),
            alpha_pattern: Vec::new(),
        }
    }
}

impl LycorisSettings {
    /// Takes the shared fields, checking the rank and the probabilities.
    pub fn take(fields: &mut ConfigFields) -> Result<Self> {
        let d = LycorisSettings::default();
        let r = fields.take_positive_usize("r", d.r)?;
        let alpha = match fields.take_raw("alpha") {
            None | Some(Value::Null) => d.alpha,
            Some(Value::Number(n)) => n,
            Some(v) => return Err(fields.type_error("alpha", "a number", &v)),
        };
        let rank_dropout = fields.take_probability("rank_dropout", 0.0)?;
        let module_dropout = fields.take_probability("module_dropout", 0.0)?;
        Ok(LycorisSettings {
            r,
            alpha,
            rank_dropout,
            module_dropout,
            use_effective_conv2d: fields.take_bool("use_effective_conv2d", false)?,
            rank_pattern: take_rank_pattern(fields)?,
            alpha_pattern: take_alpha_pattern(fields)?,
        })
    }

    /// Writes the shared fields as peft does.
    pub fn write(&self, out: &mut Map<String, Value>) {
        out.insert("r".into(), Value::from(self.r));
        out.insert("alpha".into(), Value::Number(self.alpha.clone()));
        out.insert("rank_dropout".into(), Value::from(self.rank_dropout));
        out.insert("module_dropout".into(), Value::from(self.module_dropout));
        out.insert(
            "use_effective_conv2d".into(),
            Value::Bool(self.use_effective_conv2d),
        );
        write_patterns(out, &self.rank_pattern, &self.alpha_pattern);
    }

    /// Wraps the linear layer at `path` as a LyCORIS-style method does: refuses a Conv1D
    /// layer, resolves the module's `(r, alpha)` through the patterns, builds the factors with
    /// `factors(r, scaling)` and adds the drops (seeded from the parameter name `drop_seed`;
    /// `rescale_rank` as in [`Drops::new`]).
    pub fn wrap_delta<D: DeltaWeight + 'static>(
        &self,
        method: &str,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
        (drop_seed, rescale_rank): (&str, bool),
        factors: impl FnOnce(usize, f64) -> Result<D>,
    ) -> Result<Box<dyn LinearAdapter>> {
        require_linear_layout(path, base, method)?;
        let (r, alpha) = self.rank_and_alpha(path);
        let delta = factors(r, self.scaling(r, alpha))?;
        let drops = Drops::new(
            self.module_dropout,
            self.rank_dropout,
            rescale_rank,
            params.seed(drop_seed),
        );
        Ok(Box::new(DeltaLinear::new(delta, drops)))
    }
}

impl LowRank for LycorisSettings {
    fn base_rank(&self) -> usize {
        self.r
    }
    fn base_alpha(&self) -> f64 {
        self.alpha.as_f64().unwrap_or(8.0)
    }
    fn rank_pattern(&self) -> &[(String, usize)] {
        &self.rank_pattern
    }
    fn alpha_pattern(&self) -> &[(String, Number)] {
        &self.alpha_pattern
    }
}

/// peft's `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` (peft 0.21), keyed by the
/// config's `model_type`: LoRA's default targets, which peft copies for LoHa, LoKr, OFT, MiSS
/// and the other low-rank methods (`..._TARGET_MODULES_MAPPING = ...LORA....copy()`). Data
/// from peft, not model code: the models themselves live in `peft-models`.
pub fn default_targets(model_type: &str) -> Option<TargetModules> {
    let names: &[&str] = match model_type {
        "t5" | "mt5" => &["q", "v"],
        "bart" | "opt" | "gptj" | "gpt_neo" | "llama" | "llama4" | "mistral" | "mixtral"
        | "stablelm" | "gemma" | "gemma2" | "gemma3_text" | "qwen2" | "qwen3" => {
            &["q_proj", "v_proj"]
        }
        "gpt2" | "gpt_bigcode" => &["c_attn"],
        "bloom" | "gpt_neox" | "chatglm" | "RefinedWebModel" | "RefinedWeb" | "falcon" => {
            &["query_key_value"]
        }
        "blip-2" => &["q", "v", "q_proj", "v_proj"],
        "bert" | "roberta" | "xlm-roberta" | "electra" | "layoutlm" => &["query", "value"],
        "deberta-v2" => &["query_proj", "value_proj"],
        "deberta" => &["in_proj"],
        "mpt" => &["Wqkv"],
        "btlm" => &["c_proj", "c_attn"],
        "codegen" => &["qkv_proj"],
        "phi" => &["q_proj", "v_proj", "fc1", "fc2"],
        "nemotron_h" => &["q_proj", "k_proj", "v_proj", "o_proj"],
        "rwkv" => &["key", "value", "receptance", "output"],
        "rwkv7" => &["r_proj", "k_proj", "v_proj", "o_proj", "key", "value"],
        "gemma4" => {
            return Some(TargetModules::Regex(
                r".*language_model\..*\.(q_proj|v_proj)".into(),
            ))
        }
        _ => return None,
    };
    Some(TargetModules::List(
        names.iter().map(|s| s.to_string()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Cfg(Vec<(String, usize)>, Vec<(String, Number)>, bool);
    impl LowRank for Cfg {
        fn base_rank(&self) -> usize {
            8
        }
        fn base_alpha(&self) -> f64 {
            16.0
        }
        fn rank_pattern(&self) -> &[(String, usize)] {
            &self.0
        }
        fn alpha_pattern(&self) -> &[(String, Number)] {
            &self.1
        }
        fn rank_stabilized(&self) -> bool {
            self.2
        }
    }

    #[test]
    fn patterns_override_by_suffix_and_scaling_follows_rslora() {
        let c = Cfg(
            vec![("v_proj".into(), 4)],
            vec![("layers.1.self_attn.v_proj".into(), Number::from(2))],
            false,
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.q_proj"),
            (8, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.0.self_attn.v_proj"),
            (4, 16.0)
        );
        assert_eq!(
            c.rank_and_alpha("model.layers.1.self_attn.v_proj"),
            (4, 2.0)
        );
        assert_eq!(c.scaling(4, 16.0), 4.0);
        let rs = Cfg(vec![], vec![], true);
        assert_eq!(rs.scaling(4, 16.0), 8.0);
    }
}
