//! AdamW (torch's `torch.optim.AdamW` update, decoupled weight decay) with state that can be
//! saved and restored exactly, and the learning-rate schedules of transformers'
//! `get_{constant,linear,cosine}_schedule_with_warmup`.

use candle_core::{DType, Tensor, Var};
use peft_core::{PeftError, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// beta1
    pub beta1: f64,
    /// beta2
    pub beta2: f64,
    /// epsilon
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' `TrainingArguments` defaults (weight decay 0).
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    steps: u64,
    cfg: AdamWConfig,
}

impl AdamW {
    /// A fresh optimizer (zero moments) for `vars`.
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            vars,
            m,
            v,
            steps: 0,
            cfg,
        })
    }

    /// The variables, in order.
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// Updates taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr`; `grads[i]` belongs to `vars()[i]` (`None`: no
    /// gradient, the variable only decays).
    pub fn step(&mut self, grads: &[Option<Tensor>], lr: f64) -> Result<()> {
        if grads.len() != self.vars.len() {
            return Err(PeftError::bad_input(
                "AdamW step",
                format!("{} gradients", self.vars.len()),
                grads.len().to_string(),
            ));
        }
        self.steps += 1;
        let t = self.steps as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let bias1 = 1.0 - b1.powi(t);
        let bias2 = 1.0 - b2.powi(t);
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let mut p = var.as_tensor().to_dtype(DType::F32)?;
            if self.cfg.weight_decay != 0.0 {
                p = (&p * (1.0 - lr * self.cfg.weight_decay))?;
            }
            if let Some(g) = &grads[i] {
                let g = g.to_dtype(DType::F32)?;
                self.m[i] = ((&self.m[i] * b1)? + (&g * (1.0 - b1))?)?;
                self.v[i] = ((&self.v[i] * b2)? + (g.sqr()? * (1.0 - b2))?)?;
                let denom = ((self.v[i].sqrt()? / bias2.sqrt())? + self.cfg.eps)?;
                p = (p - ((&self.m[i] / denom)? * (lr / bias1))?)?;
            }
            var.set(&p.to_dtype(var.dtype())?)?;
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("exp_avg.{name}"), self.m[i].clone()));
            out.push((format!("exp_avg_sq.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores moments saved by [`AdamW::state_tensors`] and the step count. Every variable
    /// must have both moments with its shape; `source` names the file in errors.
    pub fn load_state(
        &mut self,
        tensors: &[(String, Tensor)],
        steps: u64,
        source: &std::path::Path,
    ) -> Result<()> {
        let find = |key: &str| {
            tensors
                .iter()
                .find(|(n, _)| n == key)
                .map(|(_, t)| t.clone())
        };
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (slot, prefix) in [(0, "exp_avg"), (1, "exp_avg_sq")] {
                let key = format!("{prefix}.{name}");
                let t = find(&key).ok_or_else(|| PeftError::MissingTensor {
                    path: source.to_path_buf(),
                    key: key.clone(),
                    expected: var.dims().to_vec(),
                    available: tensors.len(),
                })?;
                if t.dims() != var.dims() {
                    return Err(PeftError::ShapeMismatch {
                        path: source.to_path_buf(),
                        key,
                        expected: var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                let t = t.to_dtype(DType::F32)?.to_device(var.device())?;
                if slot == 0 {
                    self.m[i] = t;
                } else {
                    self.v[i] = t;
                }
            }
        }
        self.steps = steps;
        Ok(())
    }
}

/// How the learning rate changes after warm-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// Constant.
    Constant,
    /// Linear decay to zero at the last step.
    Linear,
    /// Half-cosine decay to zero at the last step.
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Schedule::Constant),
            "linear" => Ok(Schedule::Linear),
            "cosine" => Ok(Schedule::Cosine),
            other => Err(format!(
                "expected constant, linear or cosine, found `{other}`"
            )),
        }
    }
}

/// The learning rate of optimizer step `step` (0-based) as transformers computes it: linear
/// warm-up from 0 over `warmup` steps, then the schedule over the remaining steps to `total`.
pub fn lr_at(schedule: Schedule, base: f64, step: usize, warmup: usize, total: usize) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = (step - warmup) as f64 / span;
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * ((total.saturating_sub(step)) as f64 / span).max(0.0),
        Schedule::Cosine => base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_follow_transformers() {
        assert_eq!(lr_at(Schedule::Linear, 1.0, 0, 10, 110), 0.0);
        assert!((lr_at(Schedule::Linear, 1.0, 5, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 10, 10, 110) - 1.0).abs() < 1e-12);
        assert!((lr_at(Schedule::Linear, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!((lr_at(Schedule::Cosine, 1.0, 60, 10, 110) - 0.5).abs() < 1e-12);
        assert!(lr_at(Schedule::Cosine, 1.0, 110, 10, 110).abs() < 1e-12);
        assert_eq!(lr_at(Schedule::Constant, 2.0, 50, 10, 110), 2.0);
    }

    #[test]
    fn adamw_matches_hand_computed_first_step() -> Result<()> {
        // After one step Adam moves each parameter by lr * sign(g) (up to eps), plus decay.
        let var = Var::from_vec(vec![1.0f32, -2.0], 2, &candle_core::Device::Cpu)?;
        let mut opt = AdamW::new(
            vec![("w".into(), var.clone())],
            AdamWConfig {
                weight_decay: 0.1,
                ..Default::default()
            },
        )?;
        let g = Tensor::new(&[0.5f32, -3.0], &candle_core::Device::Cpu)?;
        opt.step(&[Some(g)], 0.01)?;
        let p = var.as_tensor().to_vec1::<f32>()?;
        assert!((p[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6, "{p:?}");
        assert!((p[1] - (-2.0 * (1.0 - 0.001) + 0.01)).abs() < 1e-6, "{p:?}");
        Ok(())
    }
}
