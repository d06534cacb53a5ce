//! What low-rank methods share (LoRA now; LoHa, LoKr, AdaLoRA and the other LyCORIS-style
//! methods next): a base rank and alpha, peft's per-module `rank_pattern` / `alpha_pattern`
//! overrides (a key applies to a module when `(.*\.)?(key)$` matches its path; the first
//! matching key wins, in file order), and the scaling `alpha / r` (or rsLoRA's
//! `alpha / sqrt(r)`). A method's config implements [`LowRank`] with its field values and gets
//! the per-module resolution; [`take_rank_pattern`] / [`take_alpha_pattern`] and
//! [`write_patterns`] read and write the patterns as peft does.

use serde_json::{Map, Number, Value};

use crate::error::{PeftError, Result};
use crate::json::ConfigFields;
use crate::targets::pattern_value;

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
    fields
        .take_number_map("rank_pattern")?
        .into_iter()
        .map(|(k, n)| match n.as_u64().filter(|r| *r > 0) {
            Some(r) => Ok((k, r as usize)),
            None => Err(PeftError::config_value(
                fields.source_name(),
                &format!("rank_pattern.{k}"),
                "a positive integer rank",
                n,
            )),
        })
        .collect()
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
