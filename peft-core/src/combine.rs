//! Combining adapters into a new one: peft's `add_weighted_adapter`. Core checks the request,
//! asks the first adapter's method for the new config ([`LayerMethod::combined_config`]),
//! injects the new adapter as peft does (freshly initialised, frozen, not active: its
//! `modules_to_save` copies and DoRA magnitudes start as a fresh adapter's), then asks the method
//! for the values of each adapted module ([`LayerMethod::combine_module`]) from the adapters that
//! adapt it, and writes them in. If any module fails, the new adapter is removed again.
//!
//! The element-wise merges of peft's `merge_utils` live here for every method to use:
//! task arithmetic, TIES (magnitude pruning, sign election, disjoint mean), DARE (random
//! pruning with rescaling, linear or TIES) and magnitude pruning. DARE's masks come from a
//! seeded generator ([`Combination::rng`]), so a combination is reproducible (torch's
//! generator is not reproduced: DARE results match peft in distribution, not bit for bit).

use std::collections::BTreeMap;
use std::fmt;

use candle_core::Tensor;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::config::MethodConfig;
use crate::error::{PeftError, Result};
use crate::inject::Source;
use crate::peft_model::PeftModel;

/// peft's `combination_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CombinationType {
    /// `svd`: the weighted sum of the deltas `B A · scaling`, truncated by SVD.
    Svd,
    /// `linear`: the weighted sum of the factors (weights split as square roots on A and B).
    Linear,
    /// `cat`: the factors side by side (ranks add up); exact.
    Cat,
    /// `ties` on the factors.
    Ties,
    /// `ties` on the deltas, then SVD.
    TiesSvd,
    /// `dare_ties` on the factors.
    DareTies,
    /// `dare_linear` on the factors.
    DareLinear,
    /// `dare_ties` on the deltas, then SVD.
    DareTiesSvd,
    /// `dare_linear` on the deltas, then SVD.
    DareLinearSvd,
    /// `magnitude_prune` on the factors.
    MagnitudePrune,
    /// `magnitude_prune` on the deltas, then SVD.
    MagnitudePruneSvd,
}

/// The element-wise merges of peft's `merge_utils`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merge {
    /// `task_arithmetic`: `Σ w_i x_i`.
    TaskArithmetic,
    /// `ties`: keep each tensor's largest `density` share by magnitude, elect a sign per
    /// element, average the weighted values that agree with it.
    Ties,
    /// `dare_linear`: keep each element with probability `density` (rescaled by
    /// `1 / density`), then `Σ w_i x_i`.
    DareLinear,
    /// `dare_ties`: DARE's pruning, then TIES's election and disjoint mean.
    DareTies,
    /// `magnitude_prune`: TIES's pruning, then `Σ w_i x_i`.
    MagnitudePrune,
}

impl CombinationType {
    /// Every type, in peft's documentation order.
    pub const ALL: [CombinationType; 11] = [
        CombinationType::Svd,
        CombinationType::Linear,
        CombinationType::Cat,
        CombinationType::Ties,
        CombinationType::TiesSvd,
        CombinationType::DareTies,
        CombinationType::DareLinear,
        CombinationType::DareTiesSvd,
        CombinationType::DareLinearSvd,
        CombinationType::MagnitudePrune,
        CombinationType::MagnitudePruneSvd,
    ];

    /// peft's name (`dare_ties_svd`).
    pub fn as_str(self) -> &'static str {
        match self {
            CombinationType::Svd => "svd",
            CombinationType::Linear => "linear",
            CombinationType::Cat => "cat",
            CombinationType::Ties => "ties",
            CombinationType::TiesSvd => "ties_svd",
            CombinationType::DareTies => "dare_ties",
            CombinationType::DareLinear => "dare_linear",
            CombinationType::DareTiesSvd => "dare_ties_svd",
            CombinationType::DareLinearSvd => "dare_linear_svd",
            CombinationType::MagnitudePrune => "magnitude_prune",
            CombinationType::MagnitudePruneSvd => "magnitude_prune_svd",
        }
    }

    /// Parses peft's name.
    pub fn parse(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|t| t.as_str() == name)
            .ok_or_else(|| {
                PeftError::bad_input(
                    "combination_type",
                    Self::ALL.map(Self::as_str).join(", "),
                    format!("`{name}`"),
                )
            })
    }

    /// Whether the result is truncated by SVD (the `*_svd` types and `svd`).
    pub fn uses_svd(self) -> bool {
        self.as_str().ends_with("svd")
    }

    /// The element-wise merge it applies (to the factors, or to the deltas before the SVD);
    /// `None` for `cat`.
    pub fn merge(self) -> Option<Merge> {
        Some(match self {
            CombinationType::Cat => return None,
            CombinationType::Svd | CombinationType::Linear => Merge::TaskArithmetic,
            CombinationType::Ties | CombinationType::TiesSvd => Merge::Ties,
            CombinationType::DareTies | CombinationType::DareTiesSvd => Merge::DareTies,
            CombinationType::DareLinear | CombinationType::DareLinearSvd => Merge::DareLinear,
            CombinationType::MagnitudePrune | CombinationType::MagnitudePruneSvd => {
                Merge::MagnitudePrune
            }
        })
    }
}

impl fmt::Display for CombinationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// peft's `majority_sign_method` for TIES.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MajoritySign {
    /// `total`: the sign of the sum of the values.
    #[default]
    Total,
    /// `frequency`: the sign held by more of the tensors.
    Frequency,
}

impl MajoritySign {
    /// Parses `total` or `frequency`.
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "total" => Ok(MajoritySign::Total),
            "frequency" => Ok(MajoritySign::Frequency),
            other => Err(PeftError::bad_input(
                "majority_sign_method",
                "total or frequency",
                format!("`{other}`"),
            )),
        }
    }
}

/// How to combine: peft's `add_weighted_adapter` keyword arguments, plus the seed of DARE's
/// random masks.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Combination {
    /// `combination_type`; `None` for the method's default (LoRA: `svd`, as in peft). The
    /// method resolves it in [`LayerMethod::combined_config`] (LoRA uses `linear` for a single
    /// adapter, as peft does).
    pub kind: Option<CombinationType>,
    /// `svd_rank`: the rank of an SVD result (default: the largest input rank).
    pub svd_rank: Option<usize>,
    /// `svd_clamp`: a quantile in `[0, 1]` of the SVD factors' values to clamp them to.
    pub svd_clamp: Option<f64>,
    /// `density`: the share of values pruning keeps (needed by TIES, DARE and magnitude
    /// pruning).
    pub density: Option<f64>,
    /// `majority_sign_method`.
    pub majority_sign_method: MajoritySign,
    /// Seed of DARE's random masks.
    pub seed: u64,
}

impl Combination {
    /// A combination of the given type with peft's defaults for the rest.
    pub fn of(kind: CombinationType) -> Self {
        Combination {
            kind: Some(kind),
            ..Default::default()
        }
    }

    /// The resolved type (after [`LayerMethod::combined_config`]).
    pub fn kind(&self) -> Result<CombinationType> {
        self.kind.ok_or_else(|| {
            PeftError::InvalidState("the combination type was not resolved by the method".into())
        })
    }

    /// Checks the options that apply to `kind`: `density` where pruning needs it (in
    /// `[0, 1]`; above 1 prunes nothing, as in peft; DARE needs it above 0, where peft
    /// divides by zero), `svd_clamp` in `[0, 1]`, `svd_rank` positive.
    pub fn check(&self, kind: CombinationType) -> Result<()> {
        if let Some(merge) = kind.merge().filter(|m| *m != Merge::TaskArithmetic) {
            let dare = matches!(merge, Merge::DareLinear | Merge::DareTies);
            match self.density {
                None => {
                    return Err(PeftError::bad_input(
                        format!("combination_type {kind}"),
                        "a density (the share of values to keep, in [0, 1])",
                        "none",
                    ))
                }
                Some(d) if !d.is_finite() || d < 0.0 || (dare && d == 0.0) => {
                    return Err(PeftError::bad_input(
                        format!("combination_type {kind}: density"),
                        if dare {
                            "a value in (0, 1] (DARE rescales by 1 / density)"
                        } else {
                            "a value in [0, 1]"
                        },
                        d.to_string(),
                    ))
                }
                Some(_) => {}
            }
        }
        if let Some(q) = self.svd_clamp {
            if !(0.0..=1.0).contains(&q) {
                return Err(PeftError::bad_input(
                    "svd_clamp",
                    "a quantile in [0, 1]",
                    q.to_string(),
                ));
            }
        }
        if self.svd_rank == Some(0) {
            return Err(PeftError::bad_input("svd_rank", "a positive rank", "0"));
        }
        Ok(())
    }

    /// A generator for the random masks of the module at `path`; `salt` tells apart the
    /// tensors of one module (which input, which factor).
    pub fn rng(&self, path: &str, salt: u64) -> StdRng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.seed;
        for b in path.bytes().chain(salt.to_le_bytes()) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        StdRng::seed_from_u64(h)
    }
}

/// One input adapter's part at one module.
#[derive(Debug)]
pub struct CombinePart<'a> {
    /// The adapter's name.
    pub adapter: &'a str,
    /// Its config (downcast it with `config.as_any()`).
    pub config: &'a dyn MethodConfig,
    /// Its weight in the combination (may be negative).
    pub weight: f64,
    /// Its parameters at this module, by name relative to it (`lora_A.weight`).
    pub params: BTreeMap<String, Tensor>,
}

/// peft's `prune(..., method="magnitude")`: keeps the `int(density · n)` largest values by
/// magnitude (ties to the earlier element), zeroes the rest; `density >= 1` keeps all.
pub fn magnitude_prune_values(x: &[f32], density: f64) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let k = (density * x.len() as f64) as usize;
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&a, &b| x[b].abs().total_cmp(&x[a].abs()).then(a.cmp(&b)));
    let mut out = vec![0.0; x.len()];
    for &i in &order[..k] {
        out[i] = x[i];
    }
    out
}

/// peft's `prune(..., method="random", rescale=True)`: keeps each value with probability
/// `density` and divides the kept ones by it; `density >= 1` keeps all unchanged.
pub fn random_prune_values(x: &[f32], density: f64, rng: &mut StdRng) -> Vec<f32> {
    if density >= 1.0 {
        return x.to_vec();
    }
    let d = density as f32;
    x.iter()
        .map(|v| {
            if rng.random::<f64>() < density {
                v / d
            } else {
                0.0
            }
        })
        .collect()
}

fn sign(x: f32) -> f32 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// Merges same-shaped tensors (flattened) as peft's `merge_utils` does: `tasks[i]` weighted
/// by `weights[i]`. `rng(i)` gives the generator for input `i`'s DARE mask.
pub fn merge_values(
    merge: Merge,
    tasks: &[Vec<f32>],
    weights: &[f32],
    density: Option<f64>,
    sign_method: MajoritySign,
    rng: &mut dyn FnMut(usize) -> StdRng,
) -> Result<Vec<f32>> {
    let n = tasks.first().map_or(0, Vec::len);
    if tasks.iter().any(|t| t.len() != n) || tasks.len() != weights.len() {
        return Err(PeftError::InvalidState(
            "merge: the tensors to merge differ in size".into(),
        ));
    }
    let density = || density.ok_or_else(|| PeftError::bad_input("merge", "a density", "none"));
    let pruned: Vec<Vec<f32>> = match merge {
        Merge::TaskArithmetic => tasks.to_vec(),
        Merge::Ties | Merge::MagnitudePrune => {
            let d = density()?;
            tasks.iter().map(|t| magnitude_prune_values(t, d)).collect()
        }
        Merge::DareLinear | Merge::DareTies => {
            let d = density()?;
            tasks
                .iter()
                .enumerate()
                .map(|(i, t)| random_prune_values(t, d, &mut rng(i)))
                .collect()
        }
    };
    let mut out = vec![0.0f32; n];
    match merge {
        Merge::TaskArithmetic | Merge::DareLinear | Merge::MagnitudePrune => {
            for (t, w) in pruned.iter().zip(weights) {
                for (o, v) in out.iter_mut().zip(t) {
                    *o += v * w;
                }
            }
        }
        Merge::Ties | Merge::DareTies => {
            for (j, o) in out.iter_mut().enumerate() {
                // The sign is elected on the pruned, unweighted values.
                let magnitude: f32 = match sign_method {
                    MajoritySign::Total => pruned.iter().map(|t| t[j]).sum(),
                    MajoritySign::Frequency => pruned.iter().map(|t| sign(t[j])).sum(),
                };
                let majority = if magnitude >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut kept) = (0.0f32, 0.0f32);
                for (t, w) in pruned.iter().zip(weights) {
                    if sign(t[j]) == majority {
                        sum += t[j] * w;
                        kept += 1.0;
                    }
                }
                *o = sum / kept.max(1.0);
            }
        }
    }
    Ok(out)
}

/// The union of the inputs' `target_modules` as peft forms it for a combined adapter: lists
/// are united (first-seen order), regexes joined as `(a)|(b)`; a mix is refused. `inputs` are
/// in the order of the adapters combined; `key` names the field in errors.
pub fn union_target_modules(
    inputs: &[Option<&crate::targets::TargetModules>],
    key: &str,
) -> Result<crate::targets::TargetModules> {
    use crate::targets::TargetModules;
    let mut list: Option<Vec<String>> = None;
    let mut regexes: Vec<String> = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        match t {
            Some(TargetModules::List(names)) if regexes.is_empty() => {
                let all = list.get_or_insert_with(Vec::new);
                for n in names {
                    if !all.contains(n) {
                        all.push(n.clone());
                    }
                }
            }
            Some(TargetModules::Regex(r)) if list.is_none() => regexes.push(format!("({r})")),
            other => {
                return Err(PeftError::InvalidState(format!(
                    "all adapters must give `{key}` the same way (a list or a regex string) to be combined; adapter #{i} of the combination has {}",
                    match other {
                        Some(TargetModules::List(_)) => "a list where others have a regex".to_string(),
                        Some(TargetModules::Regex(_)) => "a regex where others have a list".to_string(),
                        Some(TargetModules::AllLinear) => "\"all-linear\" unresolved".to_string(),
                        None => "none".to_string(),
                    }
                )))
            }
        }
    }
    Ok(match list {
        Some(names) => TargetModules::List(names),
        None => TargetModules::Regex(regexes.join("|")),
    })
}

/// The values of a tensor, flattened, in f32 on the host.
pub fn host_values(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?)
}

impl PeftModel {
    /// Adds adapter `name`, the combination of `adapters` with `weights` (peft's
    /// `add_weighted_adapter`). The new adapter is frozen and not active (call
    /// [`PeftModel::set_adapter`]); save it with [`PeftModel::save_adapter`].
    ///
    /// Every input must be a layer adapter of the same method, which must know how to combine
    /// (LoRA with every peft combination type, IA3 linearly). As in peft, the new adapter
    /// targets the union of the inputs' modules; a module takes the inputs that adapt it; two
    /// inputs may not keep a full copy (`modules_to_save`) of the same module. Unlike peft, an
    /// existing `name` is an error rather than a silent no-op.
    pub fn add_weighted_adapter(
        &mut self,
        adapters: &[&str],
        weights: &[f64],
        name: &str,
        how: &Combination,
    ) -> Result<()> {
        let context = "add_weighted_adapter";
        if adapters.is_empty() {
            return Err(PeftError::bad_input(
                context,
                "at least one adapter",
                "none",
            ));
        }
        if adapters.len() != weights.len() {
            return Err(PeftError::bad_input(
                context,
                format!("one weight per adapter ({})", adapters.len()),
                format!("{} weights", weights.len()),
            ));
        }
        if let Some(w) = weights.iter().find(|w| !w.is_finite()) {
            return Err(PeftError::bad_input(
                context,
                "finite weights",
                w.to_string(),
            ));
        }
        if self.adapters.contains_key(name) {
            return Err(PeftError::AdapterExists(name.to_string()));
        }
        let inputs = adapters
            .iter()
            .map(|a| self.adapter(a))
            .collect::<Result<Vec<_>>>()?;
        let first = inputs[0];
        for (a, input) in adapters.iter().zip(&inputs) {
            if input.is_prompt_learning() {
                return Err(PeftError::InvalidState(format!(
                    "adapter `{a}` is prompt-learning ({}); only layer adapters can be combined",
                    input.config.peft_type()
                )));
            }
            if input.params.has_aliases() {
                return Err(PeftError::InvalidState(format!(
                    "adapter `{a}` has adapters tied across layers (ensure_weight_tying), which a \
                     weighted combination would untie; combine adapters without them"
                )));
            }
            if input.config.method.trainable_token_indices().is_some() {
                return Err(PeftError::InvalidState(format!(
                    "adapter `{a}` trains token rows (trainable_token_indices), which a weighted \
                     combination has no rule for; combine adapters without them"
                )));
            }
            if input.config.peft_type() != first.config.peft_type() {
                return Err(PeftError::InvalidState(format!(
                    "cannot combine adapters of different methods: `{}` is {} but `{a}` is {}",
                    adapters[0],
                    first.config.peft_type(),
                    input.config.peft_type()
                )));
            }
        }
        let mut saved: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (a, input) in adapters.iter().zip(&inputs) {
            for m in &input.saved_modules {
                saved.entry(m.as_str()).or_default().push(a);
            }
        }
        if let Some((module, owners)) = saved.iter().find(|(_, o)| o.len() > 1) {
            return Err(PeftError::InvalidState(format!(
                "cannot add weighted adapters that keep full copies of the same module (modules_to_save): `{module}` is saved by {}",
                owners.join(", ")
            )));
        }
        let method = first.config.method.as_layer_method().ok_or_else(|| {
            PeftError::InvalidState(format!(
                "{} is not a layer method",
                first.config.peft_type()
            ))
        })?;
        let configs: Vec<&dyn MethodConfig> = inputs.iter().map(|a| &*a.config.method).collect();
        let mut how = how.clone();
        let combined = method.combined_config(&configs, &mut how)?;
        let kind = how.kind()?;
        how.check(kind)?;
        let mut config = first.config.clone();
        config.method = combined;

        self.inject_as(name, config, Source::Fresh(how.seed), false, false)?;
        match self.fill_combination(name, adapters, weights, &how) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.delete_adapter(name)?;
                Err(e)
            }
        }
    }

    /// Computes every module of the combined adapter `name`, then writes them all in.
    fn fill_combination(
        &self,
        name: &str,
        adapters: &[&str],
        weights: &[f64],
        how: &Combination,
    ) -> Result<()> {
        let new = self.adapter(name)?;
        let method = new.config.method.as_layer_method().ok_or_else(|| {
            PeftError::InvalidState("combined adapter is not a layer method".into())
        })?;
        let inputs = adapters
            .iter()
            .map(|a| {
                let input = self.adapter(a)?;
                Ok((input, input.params_by_module()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut targets = new.params_by_module();
        let mut updates = Vec::new();
        for path in &new.targets {
            let mut parts = Vec::new();
            for ((a, w), (input, params)) in adapters.iter().zip(weights).zip(&inputs) {
                if input.targets.iter().any(|t| t == path) {
                    parts.push(CombinePart {
                        adapter: a,
                        config: &*input.config.method,
                        weight: *w,
                        params: params.get(path).cloned().unwrap_or_default(),
                    });
                }
            }
            if parts.is_empty() {
                return Err(PeftError::InvalidState(format!(
                    "{path}: the combined adapter targets it but none of {} adapts it",
                    adapters.join(", ")
                )));
            }
            let target = targets.remove(path).unwrap_or_default();
            let values = method
                .combine_module(path, &parts, &target, how)
                .map_err(|e| PeftError::InvalidState(format!("{path}: {e}")))?;
            for (param, value) in values {
                let Some(current) = target.get(&param) else {
                    return Err(PeftError::InvalidState(format!(
                        "{path}: the method combined `{param}`, which the new adapter lacks"
                    )));
                };
                if current.dims() != value.dims() {
                    return Err(PeftError::InvalidState(format!(
                        "{path}.{param}: combined to shape {:?}, the new adapter's is {:?}",
                        value.dims(),
                        current.dims()
                    )));
                }
                updates.push((format!("{path}.{param}"), value));
            }
        }
        let vars: BTreeMap<String, candle_core::Var> = new.params.vars().into_iter().collect();
        for (key, value) in updates {
            let var = vars
                .get(&key)
                .ok_or_else(|| PeftError::InvalidState(format!("{key}: no such parameter")))?;
            var.set(&value.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_classify() {
        for t in CombinationType::ALL {
            assert_eq!(CombinationType::parse(t.as_str()).unwrap(), t);
        }
        assert!(CombinationType::parse("average").is_err());
        assert!(CombinationType::DareLinearSvd.uses_svd());
        assert!(!CombinationType::DareLinear.uses_svd());
        assert_eq!(CombinationType::Cat.merge(), None);
        assert_eq!(CombinationType::Svd.merge(), Some(Merge::TaskArithmetic));
    }

    #[test]
    fn options_are_checked_for_the_type_that_uses_them() {
        let mut how = Combination::of(CombinationType::Ties);
        assert!(how.check(CombinationType::Ties).is_err(), "density needed");
        how.density = Some(0.0);
        assert!(how.check(CombinationType::Ties).is_ok());
        assert!(
            how.check(CombinationType::DareTies).is_err(),
            "DARE divides by density"
        );
        how.density = Some(-0.1);
        assert!(how.check(CombinationType::MagnitudePrune).is_err());
        assert!(
            how.check(CombinationType::Linear).is_ok(),
            "linear ignores density"
        );
        how.svd_clamp = Some(1.5);
        assert!(how.check(CombinationType::Svd).is_err());
    }

    #[test]
    fn magnitude_pruning_keeps_the_largest_share() {
        let x = [0.5, -3.0, 1.0, 0.0, 2.0];
        assert_eq!(
            magnitude_prune_values(&x, 0.4),
            vec![0.0, -3.0, 0.0, 0.0, 2.0]
        );
        assert_eq!(magnitude_prune_values(&x, 1.0), x.to_vec());
        assert_eq!(magnitude_prune_values(&x, 0.0), vec![0.0; 5]);
    }

    #[test]
    fn ties_elects_a_sign_and_averages_the_agreeing_values() {
        let tasks = vec![
            vec![1.0, -2.0, 0.0],
            vec![3.0, 1.0, 0.0],
            vec![-1.0, -1.0, 0.0],
        ];
        let w = [1.0, 0.5, 2.0];
        let mut rng = |_| StdRng::seed_from_u64(0);
        let total = merge_values(
            Merge::Ties,
            &tasks,
            &w,
            Some(1.0),
            MajoritySign::Total,
            &mut rng,
        )
        .unwrap();
        // column 0: sum 3 > 0, agreeing 1*1 and 3*0.5 -> 2.5 / 2; column 1: sum -2, agreeing
        // -2*1 and -1*2 -> -4 / 2; column 2: nothing agrees -> 0.
        assert_eq!(total, vec![1.25, -2.0, 0.0]);
        let freq = merge_values(
            Merge::Ties,
            &tasks,
            &w,
            Some(1.0),
            MajoritySign::Frequency,
            &mut rng,
        )
        .unwrap();
        assert_eq!(freq, vec![1.25, -2.0, 0.0]);
        let linear = merge_values(
            Merge::TaskArithmetic,
            &tasks,
            &w,
            None,
            MajoritySign::Total,
            &mut rng,
        )
        .unwrap();
        assert_eq!(linear, vec![0.5, -3.5, 0.0]);
    }

    #[test]
    fn dare_keeps_about_density_rescaled_and_is_seeded() {
        let x: Vec<f32> = (0..20_000).map(|i| 1.0 + (i % 7) as f32).collect();
        let how = Combination {
            seed: 3,
            ..Default::default()
        };
        let a = random_prune_values(&x, 0.3, &mut how.rng("m", 0));
        let b = random_prune_values(&x, 0.3, &mut how.rng("m", 0));
        assert_eq!(a, b, "same seed, same mask");
        assert_ne!(a, random_prune_values(&x, 0.3, &mut how.rng("m", 1)));
        let kept = a.iter().filter(|v| **v != 0.0).count() as f64 / x.len() as f64;
        assert!((kept - 0.3).abs() < 0.02, "kept {kept}");
        for (v, o) in a.iter().zip(&x) {
            assert!(*v == 0.0 || (v - o / 0.3).abs() < 1e-5);
        }
        // The expectation is preserved.
        let mean = |v: &[f32]| v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64;
        assert!((mean(&a) / mean(&x) - 1.0).abs() < 0.03);
    }
}
