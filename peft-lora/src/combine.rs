//! LoRA's weighted combination, as peft's `LoraModel.add_weighted_adapter`:
//!
//! - the new config is the first input's with `r = lora_alpha = new rank`, no rank or alpha
//!   patterns, and the union of the inputs' `target_modules`; the new rank is the common rank
//!   (`linear`, `ties`, `dare_*`, `magnitude_prune`: all inputs must share it), their sum
//!   (`cat`), or `svd_rank` (default: the largest) for the SVD types;
//! - `cat` stacks `A_i · w_i · scaling_i` and the `B_i` (exact);
//! - the factor merges (`linear`, `ties`, ...) merge the `A_i` with weights
//!   `sign · sqrt(|w_i scaling_i|)` and the `B_i` with `sqrt(|w_i scaling_i|)`;
//! - the SVD types merge the deltas `B_i A_i scaling_i`, then keep the top singular triplets:
//!   `B = U_r diag(S_r)`, `A = Vh_r`, clamped to the `svd_clamp` quantile of their values when
//!   given. Plain `svd` decomposes the stacked factors without forming the product.
//!
//! The same formulas serve embeddings (`lora_embedding_A` `[r, vocab]`, `lora_embedding_B`
//! `[dim, r]`) and Conv1D layers (the factors are stored as for any linear layer).

use std::collections::BTreeMap;

use candle_core::Tensor;
use peft_core::combine::{host_values, merge_values, union_target_modules, Merge};
use peft_core::linalg::{quantile, svd_of_product, svd_top, Matrix};
use peft_core::low_rank::LowRank;
use peft_core::{Combination, CombinationType, CombinePart, MethodConfig, PeftError, Result};

use crate::config::LoraConfig;

fn lora<'a>(config: &'a dyn MethodConfig, adapter: &str) -> Result<&'a LoraConfig> {
    config.as_any().downcast_ref::<LoraConfig>().ok_or_else(|| {
        PeftError::InvalidState(format!(
            "adapter `{adapter}` is {}, not LoRA",
            config.peft_type()
        ))
    })
}

/// The largest rank an adapter can have at any module: `r`, or a `rank_pattern` value.
fn max_rank(c: &LoraConfig) -> usize {
    c.rank_pattern.iter().map(|(_, r)| *r).fold(c.r, usize::max)
}

/// peft's `_check_add_weighted_adapter` and the config `replace(...)` that follows it.
pub(crate) fn combined_config(
    inputs: &[&dyn MethodConfig],
    how: &mut Combination,
) -> Result<Box<dyn MethodConfig>> {
    let configs = inputs
        .iter()
        .enumerate()
        .map(|(i, c)| lora(*c, &format!("#{i}")))
        .collect::<Result<Vec<_>>>()?;
    let kind = if configs.len() == 1 {
        // peft: a single adapter can only be merged linearly.
        CombinationType::Linear
    } else {
        how.kind.unwrap_or(CombinationType::Svd)
    };
    how.kind = Some(kind);
    let ranks: Vec<usize> = configs.iter().map(|c| max_rank(c)).collect();
    let new_rank = if kind == CombinationType::Cat {
        ranks.iter().sum()
    } else if kind.uses_svd() {
        how.svd_rank
            .unwrap_or_else(|| ranks.iter().copied().max().unwrap_or(1))
    } else {
        if ranks.iter().any(|r| *r != ranks[0]) {
            return Err(PeftError::InvalidState(format!(
                "combination_type {kind} needs adapters of one rank, found ranks {ranks:?}; use cat or an svd type"
            )));
        }
        ranks[0]
    };
    let targets: Vec<Option<&peft_core::TargetModules>> = configs
        .iter()
        .map(|c| c.targets.target_modules.as_ref())
        .collect();
    let target_modules = union_target_modules(&targets, "target_modules")?;
    let mut new = configs[0].clone();
    new.r = new_rank;
    new.lora_alpha = serde_json::Number::from(new_rank);
    new.rank_pattern.clear();
    new.alpha_pattern.clear();
    new.targets.target_modules = Some(target_modules);
    use crate::config::InitLoraWeights;
    match &new.init_lora_weights {
        InitLoraWeights::Random if new.use_dora => {
            // peft computes the combined DoRA magnitude at injection, from the first adapter's
            // initialisation: with random B it is a random draw. Start it as the default
            // initialisation does (B = 0: the magnitude is the weight norm ||W||).
            tracing::warn!(
                "the combined DoRA adapter's magnitude starts at the weight norm (init_lora_weights=true), not from a random initialisation"
            );
            new.init_lora_weights = InitLoraWeights::Default;
        }
        init @ (InitLoraWeights::Other(_)
        | InitLoraWeights::Pissa { .. }
        | InitLoraWeights::Olora) => {
            // peft would run that initialisation again (PiSSA, OLoRA, ... rewrite the base
            // weights); the combination is a plain LoRA on the base as it is.
            tracing::warn!(
                "the first adapter's init_lora_weights {} is not repeated for the combined adapter (init_lora_weights=true)",
                init.to_json()
            );
            new.init_lora_weights = InitLoraWeights::Default;
        }
        _ => {}
    }
    Ok(Box::new(new))
}

/// The parameter names of the module's factors in `target`.
fn factor_names(target: &BTreeMap<String, Tensor>) -> Result<(&'static str, &'static str)> {
    if target.contains_key("lora_A.weight") {
        Ok(("lora_A.weight", "lora_B.weight"))
    } else if target.contains_key("lora_embedding_A") {
        Ok(("lora_embedding_A", "lora_embedding_B"))
    } else {
        Err(PeftError::InvalidState(format!(
            "the combined adapter has no LoRA factors here (it has {:?})",
            target.keys().collect::<Vec<_>>()
        )))
    }
}

/// One input's factors at the module, with its weight and scaling.
struct Factors {
    a: Vec<f32>,
    b: Vec<f32>,
    r: usize,
    weight: f64,
    scaling: f64,
}

fn matrix(values: &[f32], rows: usize, cols: usize) -> Matrix {
    Matrix::from_vec(rows, cols, values.iter().map(|v| *v as f64).collect())
}

/// `[rows, cols]` f32 values padded (or cut) to `[rows, cols_to]`.
fn pad_cols(m: &Matrix, cols_to: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; m.rows * cols_to];
    for i in 0..m.rows {
        for j in 0..m.cols.min(cols_to) {
            out[i * cols_to + j] = m.at(i, j) as f32;
        }
    }
    out
}

fn pad_rows(m: &Matrix, rows_to: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; rows_to * m.cols];
    for i in 0..m.rows.min(rows_to) {
        for j in 0..m.cols {
            out[i * m.cols + j] = m.at(i, j) as f32;
        }
    }
    out
}

/// The combined module: new values of the two factors.
pub(crate) fn combine_module(
    path: &str,
    parts: &[CombinePart<'_>],
    target: &BTreeMap<String, Tensor>,
    how: &Combination,
) -> Result<BTreeMap<String, Tensor>> {
    let kind = how.kind()?;
    let (a_name, b_name) = factor_names(target)?;
    let (new_rank, cols) = target[a_name].dims2()?;
    let (rows, _) = target[b_name].dims2()?;
    let device = target[a_name].device().clone();
    let mut inputs = Vec::new();
    for part in parts {
        let config = lora(part.config, part.adapter)?;
        let get = |name: &str| {
            part.params.get(name).ok_or_else(|| {
                PeftError::InvalidState(format!(
                    "adapter `{}` has no `{name}` here (a LoRA of another layer kind?)",
                    part.adapter
                ))
            })
        };
        let (a, b) = (get(a_name)?, get(b_name)?);
        let (r, a_cols) = a.dims2()?;
        if a_cols != cols || b.dims2()? != (rows, r) {
            return Err(PeftError::InvalidState(format!(
                "adapter `{}`: factors {:?} and {:?} do not fit a [{rows}, {cols}] layer",
                part.adapter,
                a.dims(),
                b.dims()
            )));
        }
        let (pr, alpha) = config.rank_and_alpha(path);
        inputs.push(Factors {
            a: host_values(a)?,
            b: host_values(b)?,
            r,
            weight: part.weight,
            scaling: config.scaling(pr, alpha),
        });
    }
    let (a, b) = match kind {
        CombinationType::Cat => cat(&inputs, new_rank, rows, cols)?,
        _ if kind.uses_svd() => svd_combination(path, &inputs, new_rank, rows, cols, how)?,
        _ => factor_merge(path, &inputs, new_rank, how)?,
    };
    let mut out = BTreeMap::new();
    out.insert(
        a_name.to_string(),
        Tensor::from_vec(a, (new_rank, cols), &device)?,
    );
    out.insert(
        b_name.to_string(),
        Tensor::from_vec(b, (rows, new_rank), &device)?,
    );
    Ok(out)
}

/// `cat`: `A = [A_i · w_i · s_i]` stacked by rows, `B = [B_i]` side by side, zero-padded to the
/// new rank.
fn cat(
    inputs: &[Factors],
    new_rank: usize,
    rows: usize,
    cols: usize,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let total: usize = inputs.iter().map(|f| f.r).sum();
    if total > new_rank {
        return Err(PeftError::InvalidState(format!(
            "cat: the ranks here add up to {total}, more than the combined rank {new_rank}"
        )));
    }
    let mut a = vec![0.0f32; new_rank * cols];
    let mut b = vec![0.0f32; rows * new_rank];
    let mut at = 0;
    for f in inputs {
        let (w, s) = (f.weight as f32, f.scaling as f32);
        for (dst, src) in a[at * cols..(at + f.r) * cols].iter_mut().zip(&f.a) {
            *dst = src * w * s;
        }
        for i in 0..rows {
            for k in 0..f.r {
                b[i * new_rank + at + k] = f.b[i * f.r + k];
            }
        }
        at += f.r;
    }
    Ok((a, b))
}

/// The factor merges: `A` from the `A_i` weighted `sign · sqrt(|w s|)`, `B` from the `B_i`
/// weighted `sqrt(|w s|)`.
fn factor_merge(
    path: &str,
    inputs: &[Factors],
    new_rank: usize,
    how: &Combination,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let kind = how.kind()?;
    let merge = kind
        .merge()
        .ok_or_else(|| PeftError::InvalidState(format!("{kind} is not a factor merge")))?;
    if let Some(f) = inputs.iter().find(|f| f.r != new_rank) {
        return Err(PeftError::InvalidState(format!(
            "combination_type {kind} needs every adapter at rank {new_rank} here, found rank {}",
            f.r
        )));
    }
    let (mut wa, mut wb) = (Vec::new(), Vec::new());
    for f in inputs {
        let ws = f.weight * f.scaling;
        let root = ws.abs().sqrt();
        wa.push((if ws >= 0.0 { root } else { -root }) as f32);
        wb.push(root as f32);
    }
    let a_tasks: Vec<Vec<f32>> = inputs.iter().map(|f| f.a.clone()).collect();
    let b_tasks: Vec<Vec<f32>> = inputs.iter().map(|f| f.b.clone()).collect();
    let a = merge_values(
        merge,
        &a_tasks,
        &wa,
        how.density,
        how.majority_sign_method,
        &mut |i| how.rng(path, 2 * i as u64),
    )?;
    let b = merge_values(
        merge,
        &b_tasks,
        &wb,
        how.density,
        how.majority_sign_method,
        &mut |i| how.rng(path, 2 * i as u64 + 1),
    )?;
    Ok((a, b))
}

/// The SVD types: merge the deltas, keep the top `new_rank` triplets, clamp.
fn svd_combination(
    path: &str,
    inputs: &[Factors],
    new_rank: usize,
    rows: usize,
    cols: usize,
    how: &Combination,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let kind = how.kind()?;
    let merge = kind
        .merge()
        .ok_or_else(|| PeftError::InvalidState(format!("{kind} is not an svd type")))?;
    let decomposition = if merge == Merge::TaskArithmetic {
        // Σ w_i B_i A_i s_i = [B_1 .. B_k] @ [A_1 w_1 s_1; ..; A_k w_k s_k].
        let total: usize = inputs.iter().map(|f| f.r).sum();
        let mut b = Matrix::zeros(rows, total);
        let mut a = Matrix::zeros(total, cols);
        let mut at = 0;
        for f in inputs {
            let ws = f.weight * f.scaling;
            for i in 0..rows {
                for k in 0..f.r {
                    b.data[i * total + at + k] = f.b[i * f.r + k] as f64;
                }
            }
            for (dst, src) in a.data[at * cols..(at + f.r) * cols].iter_mut().zip(&f.a) {
                *dst = *src as f64 * ws;
            }
            at += f.r;
        }
        svd_of_product(&b, &a)
    } else {
        let deltas: Vec<Vec<f32>> = inputs
            .iter()
            .map(|f| {
                let d = matrix(&f.b, rows, f.r).matmul(&matrix(&f.a, f.r, cols));
                d.data.iter().map(|v| (v * f.scaling) as f32).collect()
            })
            .collect();
        let weights: Vec<f32> = inputs.iter().map(|f| f.weight as f32).collect();
        let merged = merge_values(
            merge,
            &deltas,
            &weights,
            how.density,
            how.majority_sign_method,
            &mut |i| how.rng(path, i as u64),
        )?;
        svd_top(&matrix(&merged, rows, cols), new_rank)
    };
    let (mut us, mut vt) = decomposition.truncated_factors(new_rank);
    if let Some(q) = how.svd_clamp {
        clamp_factors(&mut us.data, &mut vt.data, q);
    }
    Ok((pad_rows(&vt, new_rank), pad_cols(&us, new_rank)))
}

/// peft's `svd_clamp`: clamps both factors (`U diag(S)` and `Vh`, any layout) to
/// `[-hi, hi]`, `hi` the `q` quantile of all their values (in f32, as torch computes it).
pub fn clamp_factors(us: &mut [f64], vt: &mut [f64], q: f64) {
    let dist: Vec<f64> = us
        .iter()
        .chain(vt.iter())
        .map(|v| *v as f32 as f64)
        .collect();
    let hi = quantile(&dist, q) as f32 as f64;
    for v in us.iter_mut().chain(vt.iter_mut()) {
        // torch.clamp(min=-hi, max=hi); with hi < 0 (min > max) every value becomes `hi`.
        *v = if hi < 0.0 { hi } else { v.clamp(-hi, hi) };
    }
}
