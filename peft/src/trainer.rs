//! The training loop behind `peft train`: seeded data order, gradient accumulation with a
//! token-weighted loss (as transformers' `Trainer` with `num_items_in_batch`), clipping, AdamW
//! with warm-up and decay, evaluation and checkpoints every N steps (written atomically), exact
//! `--resume`, metrics appended to `metrics.jsonl` and a loss-curve PNG.
//!
//! The data position of optimizer step `s` depends only on `s`, the seed and the data, and
//! dropout masks are tied to the step ([`peft_core::nn::set_dropout_step`]), so training N steps
//! and training k steps, stopping, resuming and training N-k more give the same weights.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use peft_core::checkpoint;
use peft_core::training::Batch;
use peft_core::{PeftError, PeftModel, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::{json, Value};

use crate::data::{collate, Example};
use crate::optim::{lr_at, AdamW, AdamWConfig, Schedule};

/// Training hyper-parameters.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// AdamW settings.
    pub adamw: AdamWConfig,
    /// Warm-up steps.
    pub warmup_steps: usize,
    /// Decay after warm-up.
    pub schedule: Schedule,
    /// Optimizer steps to take (`None`: `epochs` passes over the data).
    pub max_steps: Option<usize>,
    /// Passes over the data when `max_steps` is not set.
    pub epochs: usize,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Clip the global gradient norm to this (`None`: no clipping).
    pub max_grad_norm: Option<f32>,
    /// Seed of the data order (and of the adapter initialisation, by the caller).
    pub seed: u64,
    /// Evaluate every N steps (and at the end) when there is eval data.
    pub eval_every: Option<usize>,
    /// Write a checkpoint every N steps (the final adapter is always written).
    pub save_every: Option<usize>,
    /// Write a metrics line every N steps.
    pub log_every: usize,
    /// Padding token for batches.
    pub pad_id: u32,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

impl TrainConfig {
    /// Optimizer steps in one pass over `sequences` training sequences.
    pub fn steps_per_epoch(&self, sequences: usize) -> usize {
        sequences
            .div_ceil(self.batch_size.max(1))
            .div_ceil(self.grad_accum.max(1))
    }

    /// Total optimizer steps of a run over `sequences` training sequences: `max_steps`, or
    /// `epochs` passes.
    pub fn total_steps(&self, sequences: usize) -> usize {
        self.max_steps
            .unwrap_or(self.epochs.max(1) * self.steps_per_epoch(sequences))
    }
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            lr: 2e-4,
            adamw: AdamWConfig::default(),
            warmup_steps: 0,
            schedule: Schedule::Linear,
            max_steps: None,
            epochs: 1,
            batch_size: 4,
            grad_accum: 1,
            max_grad_norm: Some(1.0),
            seed: 42,
            eval_every: None,
            save_every: None,
            log_every: 1,
            pad_id: 0,
            progress: false,
        }
    }
}

/// What a training run did.
#[derive(Debug, Clone, Default)]
pub struct TrainReport {
    /// Optimizer steps taken in this run (after any resumed ones).
    pub steps_run: usize,
    /// The last step reached.
    pub final_step: usize,
    /// Loss of the last step.
    pub last_loss: f32,
    /// Last evaluation loss, if evaluated.
    pub eval_loss: Option<f64>,
    /// Tokens processed (inputs, padding excluded) in this run.
    pub tokens: u64,
    /// Wall time of this run in seconds.
    pub seconds: f64,
    /// The step training resumed from (0 for a fresh start).
    pub resumed_from: usize,
}

/// What [`evaluate`] measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// Mean loss over every target (token, or labelled sequence).
    pub loss: f64,
    /// Targets counted.
    pub targets: usize,
    /// For classifiers: the fraction of examples whose arg-max class is the label.
    pub accuracy: Option<f64>,
}

/// Mean loss over every target of `data` (no dropout), the target count, and for classifiers
/// the accuracy.
pub fn evaluate_data(
    model: &PeftModel,
    data: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<Evaluation> {
    let was_training = model.is_training();
    model.set_training(false);
    let _no_grad = peft_core::no_grad();
    let device = model.base_model().device().clone();
    let mut total = 0.0f64;
    let mut count = 0usize;
    let (mut correct, mut classified) = (0usize, 0usize);
    for chunk in data.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad_id, &device)?;
        let n = batch.targets()?;
        let mean = match &batch {
            Batch::Classification(b) => {
                let (loss, logits) = peft_core::training::classification_loss(model, b)?;
                let (c, k) = peft_core::training::correct_predictions(&logits, &b.labels)?;
                correct += c;
                classified += k;
                loss
            }
            _ => batch.loss(model)?,
        };
        total += f64::from(mean.to_scalar::<f32>()?) * n as f64;
        count += n;
    }
    model.set_training(was_training);
    if count == 0 {
        return Err(PeftError::bad_input(
            "evaluate",
            "data with tokens to predict",
            "none",
        ));
    }
    Ok(Evaluation {
        loss: total / count as f64,
        targets: count,
        accuracy: (classified > 0).then(|| correct as f64 / classified as f64),
    })
}

/// Mean loss over every target of `data` (no dropout), and the target count.
pub fn evaluate(
    model: &PeftModel,
    data: &[Example],
    batch_size: usize,
    pad_id: u32,
) -> Result<(f64, usize)> {
    let e = evaluate_data(model, data, batch_size, pad_id)?;
    Ok((e.loss, e.targets))
}

/// Runs training of `model`'s trainable adapter on `train`, writing into `out`.
pub struct Trainer<'a> {
    model: &'a PeftModel,
    cfg: TrainConfig,
    train: Vec<Example>,
    eval: Option<Vec<Example>>,
    out: PathBuf,
    opt: AdamW,
    history: Vec<(usize, f64)>,
    eval_history: Vec<(usize, f64)>,
    /// Dynamic loss scaling, on when the model computes in f16.
    scaler: Option<peft_core::training::LossScaler>,
}

const STATE_NAME: &str = "trainer_state.json";
const OPTIMIZER_NAME: &str = "optimizer.safetensors";
const TRAINABLE_NAME: &str = "trainable.safetensors";
/// The metrics file in the output folder.
pub const METRICS_NAME: &str = "metrics.jsonl";
/// The loss-curve image in the output folder.
pub const PLOT_NAME: &str = "loss.png";

impl<'a> Trainer<'a> {
    /// A trainer for `model` (with a trainable adapter) on `train` sequences, optionally
    /// evaluating on `eval`, writing into `out`.
    pub fn new(
        model: &'a PeftModel,
        cfg: TrainConfig,
        train: Vec<Example>,
        eval: Option<Vec<Example>>,
        out: &Path,
    ) -> Result<Self> {
        if train.is_empty() {
            return Err(PeftError::bad_input(
                "training data",
                "at least one sequence",
                "none",
            ));
        }
        if cfg.batch_size == 0 || cfg.grad_accum == 0 {
            return Err(PeftError::bad_input(
                "batch size / gradient accumulation",
                "at least 1",
                "0",
            ));
        }
        let vars = model.trainable_named_vars();
        if vars.is_empty() {
            return Err(PeftError::InvalidState(
                "the model has no trainable parameters (load the adapter as trainable)".into(),
            ));
        }
        let opt = AdamW::new(vars, cfg.adamw)?;
        let scaler = peft_core::training::LossScaler::for_dtype(model.base_model().dtype());
        Ok(Trainer {
            scaler,
            model,
            cfg,
            train,
            eval,
            out: out.to_path_buf(),
            opt,
            history: Vec::new(),
            eval_history: Vec::new(),
        })
    }

    fn micro_batches_per_epoch(&self) -> usize {
        self.train.len().div_ceil(self.cfg.batch_size)
    }

    /// Optimizer steps in one pass over the data.
    pub fn steps_per_epoch(&self) -> usize {
        self.cfg.steps_per_epoch(self.train.len())
    }

    /// Total optimizer steps of the run.
    pub fn total_steps(&self) -> usize {
        self.cfg.total_steps(self.train.len())
    }

    /// The micro-batches (as example indices) of optimizer step `step` (0-based).
    fn step_batches(&self, step: usize) -> Vec<Vec<usize>> {
        let spe = self.steps_per_epoch();
        let (epoch, k) = (step / spe, step % spe);
        let mut order: Vec<usize> = (0..self.train.len()).collect();
        order.shuffle(&mut StdRng::seed_from_u64(
            self.cfg.seed.wrapping_add(epoch as u64),
        ));
        let nb = self.micro_batches_per_epoch();
        (k * self.cfg.grad_accum..((k + 1) * self.cfg.grad_accum).min(nb))
            .map(|b| {
                order[b * self.cfg.batch_size..((b + 1) * self.cfg.batch_size).min(order.len())]
                    .to_vec()
            })
            .collect()
    }

    /// A fingerprint of what decides the data order; resuming with a different one would not
    /// continue the same run.
    fn fingerprint(&self) -> Value {
        let lens: u64 = self.train.iter().map(|e| e.ids.len() as u64).sum();
        json!({
            "train_sequences": self.train.len(),
            "train_tokens": lens,
            "batch_size": self.cfg.batch_size,
            "grad_accum": self.cfg.grad_accum,
            "seed": self.cfg.seed,
            "total_steps": self.total_steps(),
        })
    }

    /// One optimizer step; returns (loss, grad norm, input tokens).
    fn train_step(&mut self, step: usize) -> Result<(f32, f32, u64)> {
        let device = self.model.base_model().device().clone();
        let batches: Vec<Batch> = self
            .step_batches(step)
            .iter()
            .map(|idx| {
                let refs: Vec<&Example> = idx.iter().map(|&i| &self.train[i]).collect();
                collate(&refs, self.cfg.pad_id, &device)
            })
            .collect::<Result<_>>()?;
        let counts: Vec<usize> = batches.iter().map(Batch::targets).collect::<Result<_>>()?;
        let total: usize = counts.iter().sum::<usize>().max(1);
        let mut tokens = 0u64;
        let mut loss_sum = 0.0f32;
        let n_vars = self.opt.vars().len();
        let mut grads: Vec<Option<Tensor>> = vec![None; n_vars];
        self.model.set_training(true);
        for (j, (batch, &n)) in batches.iter().zip(&counts).enumerate() {
            tokens += batch.input_tokens()?;
            if n == 0 {
                continue;
            }
            peft_core::nn::set_dropout_step(((step * self.cfg.grad_accum + j) as u64) + 1);
            let loss = batch.loss(self.model)?;
            let weighted = (loss * (n as f64 / total as f64))?;
            loss_sum += weighted.to_scalar::<f32>()?;
            let g = match &self.scaler {
                Some(s) => peft_core::recompute::backward(&(weighted * s.scale)?)?,
                None => peft_core::recompute::backward(&weighted)?,
            };
            for (i, (_, var)) in self.opt.vars().iter().enumerate() {
                if let Some(gi) = g.get(var.as_tensor()) {
                    grads[i] = Some(match grads[i].take() {
                        Some(acc) => (acc + gi)?,
                        None => gi.clone(),
                    });
                }
            }
        }
        if let Some(s) = &self.scaler {
            let inv = 1.0 / s.scale;
            for g in grads.iter_mut().flatten() {
                *g = (&*g * inv)?;
            }
        }
        let norm = peft_core::training::global_norm(grads.iter().flatten())?;
        if let Some(s) = self.scaler.as_mut() {
            let scale = s.scale;
            if !s.update(norm.is_finite()) {
                tracing::warn!(
                    "step {}: f16 gradients overflowed at loss scale {scale}; step skipped, scale now {}",
                    step + 1,
                    s.scale
                );
                return Ok((loss_sum, norm, tokens));
            }
        }
        if !norm.is_finite() {
            return Err(PeftError::InvalidState(format!(
                "step {}: gradient norm is not finite (loss {loss_sum})",
                step + 1
            )));
        }
        if let Some(scale) = self
            .cfg
            .max_grad_norm
            .and_then(|max| peft_core::training::clip_scale(norm, max))
        {
            for g in grads.iter_mut().flatten() {
                *g = (&*g * scale)?;
            }
        }
        let lr = lr_at(
            self.cfg.schedule,
            self.cfg.lr,
            step,
            self.cfg.warmup_steps,
            self.total_steps(),
        );
        self.opt.step(&grads, lr)?;
        Ok((loss_sum, norm, tokens))
    }

    /// The latest `checkpoint-N` folder in `out` with a complete trainer state.
    pub fn latest_checkpoint(out: &Path) -> Option<(usize, PathBuf)> {
        let entries = std::fs::read_dir(out).ok()?;
        entries
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let n: usize = name.strip_prefix("checkpoint-")?.parse().ok()?;
                e.path().join(STATE_NAME).is_file().then(|| (n, e.path()))
            })
            .max_by_key(|(n, _)| *n)
    }

    /// Restores the trainable weights, optimizer state and history from a checkpoint folder;
    /// returns its step.
    pub fn restore(&mut self, dir: &Path) -> Result<usize> {
        let state_path = dir.join(STATE_NAME);
        let text =
            std::fs::read_to_string(&state_path).map_err(|e| PeftError::io(&state_path, e))?;
        let state: Value = serde_json::from_str(&text).map_err(|e| PeftError::Json {
            source_name: state_path.display().to_string(),
            message: e.to_string(),
        })?;
        let step =
            state
                .get("step")
                .and_then(Value::as_u64)
                .ok_or_else(|| PeftError::MissingKey {
                    source_name: state_path.display().to_string(),
                    key: "step".into(),
                    expected: "the optimizer step of the checkpoint".into(),
                })? as usize;
        let want = self.fingerprint();
        if state.get("run") != Some(&want) {
            return Err(PeftError::config_value(
                &state_path.display().to_string(),
                "run",
                format!("the same data, batch size, accumulation, seed and steps as now: {want}"),
                state.get("run").map(Value::to_string).unwrap_or_default(),
            ));
        }
        let device = self.model.base_model().device().clone();
        let trainable_path = dir.join(TRAINABLE_NAME);
        let saved = checkpoint::read_safetensors(&trainable_path, &device)?;
        for (name, var) in self.opt.vars() {
            let t = saved
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, t)| t)
                .ok_or_else(|| PeftError::MissingTensor {
                    path: trainable_path.clone(),
                    key: name.clone(),
                    expected: var.dims().to_vec(),
                    available: saved.len(),
                })?;
            if t.dims() != var.dims() {
                return Err(PeftError::ShapeMismatch {
                    path: trainable_path.clone(),
                    key: name.clone(),
                    expected: var.dims().to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            var.set(&t.to_dtype(var.dtype())?)?;
        }
        let opt_path = dir.join(OPTIMIZER_NAME);
        let opt_state = checkpoint::read_safetensors(&opt_path, &device)?;
        let opt_steps = state
            .get("optimizer_steps")
            .and_then(Value::as_u64)
            .unwrap_or(step as u64);
        self.opt.load_state(&opt_state, opt_steps, &opt_path)?;
        let pairs = |key: &str| -> Vec<(usize, f64)> {
            state
                .get(key)
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(|p| Some((p.get(0)?.as_u64()? as usize, p.get(1)?.as_f64()?)))
                        .collect()
                })
                .unwrap_or_default()
        };
        self.history = pairs("loss_history");
        self.eval_history = pairs("eval_history");
        if let (Some(s), Some(saved)) = (self.scaler.as_mut(), state.get("loss_scale")) {
            if let Some(scale) = saved.get("scale").and_then(Value::as_f64) {
                s.scale = scale;
            }
            if let Some(good) = saved.get("good_steps").and_then(Value::as_u64) {
                s.good_steps = good as u32;
            }
        }
        Ok(step)
    }

    /// Writes `checkpoint-<step>` atomically (built in a temporary folder, then renamed).
    fn save_checkpoint(&self, step: usize) -> Result<PathBuf> {
        let final_dir = self.out.join(format!("checkpoint-{step}"));
        let tmp = self.out.join(format!(".checkpoint-{step}.partial"));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| PeftError::io(&tmp, e))?;
        self.model.save_pretrained(&tmp)?;
        let trainable: Vec<(String, Tensor)> = self
            .opt
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::write_safetensors(&tmp.join(TRAINABLE_NAME), &trainable)?;
        checkpoint::write_safetensors(&tmp.join(OPTIMIZER_NAME), &self.opt.state_tensors())?;
        let state = json!({
            "step": step,
            "optimizer_steps": self.opt.steps(),
            "loss_scale": self.scaler.map(|s| json!({"scale": s.scale, "good_steps": s.good_steps})),
            "run": self.fingerprint(),
            "loss_history": self.history.iter().map(|(s, l)| json!([s, l])).collect::<Vec<_>>(),
            "eval_history": self.eval_history.iter().map(|(s, l)| json!([s, l])).collect::<Vec<_>>(),
        });
        checkpoint::write_atomic(
            &tmp.join(STATE_NAME),
            serde_json::to_string_pretty(&state)
                .unwrap_or_default()
                .as_bytes(),
        )?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| PeftError::io(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| PeftError::io(&final_dir, e))?;
        Ok(final_dir)
    }

    fn append_metrics(&self, line: &Value) -> Result<()> {
        let path = self.out.join(METRICS_NAME);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| PeftError::io(&path, e))?;
        writeln!(f, "{line}").map_err(|e| PeftError::io(&path, e))
    }

    /// Keeps only metrics lines up to `step` (after resuming from it).
    fn truncate_metrics(&self, step: usize) -> Result<()> {
        let path = self.out.join(METRICS_NAME);
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let kept: Vec<&str> = text
            .lines()
            .filter(|l| {
                serde_json::from_str::<Value>(l)
                    .ok()
                    .and_then(|v| v.get("step").and_then(Value::as_u64))
                    .is_some_and(|s| s as usize <= step)
            })
            .collect();
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        checkpoint::write_atomic(&path, body.as_bytes())
    }

    fn run_eval(&mut self, step: usize) -> Result<Option<f64>> {
        let Some(eval) = &self.eval else {
            return Ok(None);
        };
        let (loss, n) = evaluate(self.model, eval, self.cfg.batch_size, self.cfg.pad_id)?;
        self.eval_history.push((step, loss));
        self.append_metrics(
            &json!({"step": step, "eval_loss": loss, "eval_ppl": loss.exp(), "eval_tokens": n}),
        )?;
        Ok(Some(loss))
    }

    fn plot(&self) -> Result<()> {
        crate::plot::loss_curve(&self.out.join(PLOT_NAME), &self.history, &self.eval_history)
    }

    /// Trains to the configured number of steps; with `resume`, continues from the latest
    /// checkpoint in the output folder. Writes the final adapter into the output folder.
    pub fn run(&mut self, resume: bool) -> Result<TrainReport> {
        std::fs::create_dir_all(&self.out).map_err(|e| PeftError::io(&self.out, e))?;
        let mut start = 0;
        if resume {
            match Self::latest_checkpoint(&self.out) {
                Some((_, dir)) => {
                    start = self.restore(&dir)?;
                    self.truncate_metrics(start)?;
                    tracing::info!("resumed from {} (step {start})", dir.display());
                }
                None => {
                    return Err(PeftError::io(
                        &self.out,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            "--resume: no checkpoint-N folder with trainer_state.json here",
                        ),
                    ))
                }
            }
        } else {
            let metrics = self.out.join(METRICS_NAME);
            if metrics.exists() {
                std::fs::remove_file(&metrics).map_err(|e| PeftError::io(&metrics, e))?;
            }
        }
        let total = self.total_steps();
        let bar = if self.cfg.progress {
            let bar = indicatif::ProgressBar::new(total as u64);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps  {msg}  [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar.set_position(start as u64);
            bar.reset_eta();
            Some(bar)
        } else {
            None
        };
        let began = Instant::now();
        let mut report = TrainReport {
            resumed_from: start,
            final_step: start,
            ..Default::default()
        };
        let spe = self.steps_per_epoch();
        for step in start..total {
            let (loss, norm, tokens) = self.train_step(step)?;
            report.tokens += tokens;
            report.steps_run += 1;
            report.final_step = step + 1;
            report.last_loss = loss;
            let done = step + 1;
            self.history.push((done, f64::from(loss)));
            let elapsed = began.elapsed().as_secs_f64();
            let tps = report.tokens as f64 / elapsed.max(1e-9);
            if done % self.cfg.log_every.max(1) == 0 || done == total {
                let lr = lr_at(
                    self.cfg.schedule,
                    self.cfg.lr,
                    step,
                    self.cfg.warmup_steps,
                    total,
                );
                self.append_metrics(&json!({
                    "step": done,
                    "epoch": done as f64 / spe as f64,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": norm,
                    "tokens": report.tokens,
                    "tokens_per_s": tps,
                    "elapsed_s": elapsed,
                }))?;
            }
            if let Some(bar) = &bar {
                bar.set_message(format!("loss {loss:.4}  {tps:.0} tok/s"));
                bar.inc(1);
            }
            if self.cfg.eval_every.is_some_and(|n| n > 0 && done % n == 0) && done != total {
                if let Some(l) = self.run_eval(done)? {
                    report.eval_loss = Some(l);
                    if let Some(bar) = &bar {
                        bar.println(format!(
                            "step {done}: eval loss {l:.4}, perplexity {:.2}",
                            l.exp()
                        ));
                    }
                }
            }
            if self.cfg.save_every.is_some_and(|n| n > 0 && done % n == 0) {
                self.save_checkpoint(done)?;
                self.plot()?;
            }
        }
        if report.steps_run > 0 || self.eval_history.last().map(|e| e.0) != Some(total) {
            if let Some(l) = self.run_eval(total)? {
                report.eval_loss = Some(l);
            }
        }
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        // A checkpoint at the end too, so a later run with more steps can resume from it.
        if report.steps_run > 0
            && !self
                .cfg
                .save_every
                .is_some_and(|n| n > 0 && total.is_multiple_of(n))
        {
            self.save_checkpoint(total)?;
        }
        self.model.save_pretrained(&self.out)?;
        self.plot()?;
        report.seconds = began.elapsed().as_secs_f64();
        Ok(report)
    }
}
