//! Small trainable building blocks shared by method crates (prompt encoders, adapters):
//! a linear layer with torch's default initialisation and seeded inverted dropout. Their
//! parameters live in an adapter's [`ParamStore`](crate::ParamStore) under torch's names.

use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use candle_core::Tensor;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::error::Result;
use crate::layers::linear_forward;
use crate::vars::{Init, ParamBuilder};

/// A trainable `nn.Linear`: `weight` `[out, in]` and an optional `bias` `[out]`, both
/// initialised as torch does (uniform on `±1/sqrt(in)`).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Builds (or loads) `weight` and `bias` under `params`.
    pub fn new(
        params: &ParamBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
    ) -> Result<Self> {
        Self::with_init(
            params,
            in_features,
            out_features,
            bias,
            Init::kaiming_uniform_linear(in_features),
        )
    }

    /// Like [`Linear::new`] with an explicit initialisation for both tensors (e.g. zeros).
    pub fn with_init(
        params: &ParamBuilder,
        in_features: usize,
        out_features: usize,
        bias: bool,
        init: Init,
    ) -> Result<Self> {
        let weight = params.get(&[out_features, in_features], "weight", init)?;
        let bias = if bias {
            Some(params.get(&[out_features], "bias", init)?)
        } else {
            None
        };
        Ok(Linear { weight, bias })
    }

    /// `x W^T + b` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = linear_forward(x, &self.weight, false)?;
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

thread_local! {
    /// The training step dropout masks are drawn for on this thread (see [`set_dropout_step`]).
    static DROPOUT_STEP: Cell<u64> = const { Cell::new(0) };
}

/// Ties dropout masks to a training step: every [`Dropout`] reseeds its generator from its own
/// seed and `step` when the step changes, so the masks of step N are the same whether training
/// ran straight through or resumed from a checkpoint. Trainers call it before each micro-batch.
/// The step is per thread, so models trained on different threads do not disturb each other.
pub fn set_dropout_step(step: u64) {
    DROPOUT_STEP.with(|s| s.set(step));
}

/// The generator states dropout layers had when a recorded region first used them, so that a
/// recomputation of the region (gradient checkpointing, [`crate::recompute`]) draws the same
/// masks as the forward pass did.
#[derive(Debug, Clone, Default)]
pub(crate) struct DropoutStates(Vec<(u64, (u64, StdRng))>);

enum DropoutTape {
    Record(Vec<(u64, (u64, StdRng))>),
    Replay(Vec<(u64, (u64, StdRng))>),
}

thread_local! {
    static TAPE: RefCell<Option<DropoutTape>> = const { RefCell::new(None) };
}

/// Runs `f` recording each dropout layer's generator state at its first use in `f`.
pub(crate) fn record_dropout<T>(f: impl FnOnce() -> T) -> (T, DropoutStates) {
    let outer = TAPE.with(|t| t.replace(Some(DropoutTape::Record(Vec::new()))));
    let out = f();
    let tape = TAPE.with(|t| t.replace(outer));
    let states = match tape {
        Some(DropoutTape::Record(v)) => v,
        _ => Vec::new(),
    };
    (out, DropoutStates(states))
}

/// Runs `f` with each dropout layer in `states` restored to its recorded state at its first
/// use, so `f` draws the masks the recorded run drew (and leaves the generators where that run
/// left them).
pub(crate) fn replay_dropout<T>(states: &DropoutStates, f: impl FnOnce() -> T) -> T {
    let outer = TAPE.with(|t| t.replace(Some(DropoutTape::Replay(states.0.clone()))));
    let out = f();
    TAPE.with(|t| t.replace(outer));
    out
}

/// Inverted dropout with its own seeded generator (candle's CPU generator cannot be seeded).
#[derive(Debug)]
pub struct Dropout {
    p: f64,
    seed: u64,
    /// This layer's identity on a [`DropoutTape`].
    id: u64,
    /// The step the generator was last seeded for, and the generator.
    rng: Mutex<(u64, StdRng)>,
}

impl Dropout {
    /// Dropout with probability `p`, seeded.
    pub fn new(p: f64, seed: u64) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        Dropout {
            p,
            seed,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            rng: Mutex::new((0, StdRng::seed_from_u64(seed))),
        }
    }

    /// Whether [`Dropout::forward`] returns its input unchanged (not training, or `p` is 0).
    pub fn is_identity(&self, training: bool) -> bool {
        !training || self.p <= 0.0
    }

    /// `n` uniform draws on `[0, 1)` from this layer's generator: the stream [`Dropout::forward`]
    /// draws its masks from, tied to the training step ([`set_dropout_step`]) and replayed
    /// under gradient checkpointing. Methods with other random choices made in training
    /// (LoHa's and LoKr's `module_dropout` and `rank_dropout`) draw them here so that they
    /// too repeat when a checkpointed block is recomputed.
    pub fn uniforms(&self, n: usize) -> Vec<f64> {
        let mut state = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        let step = DROPOUT_STEP.with(Cell::get);
        if state.0 != step {
            let mixed = self.seed ^ step.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17);
            *state = (step, StdRng::seed_from_u64(mixed));
        }
        TAPE.with(|t| match &mut *t.borrow_mut() {
            Some(DropoutTape::Record(seen)) if !seen.iter().any(|(id, _)| *id == self.id) => {
                seen.push((self.id, state.clone()));
            }
            Some(DropoutTape::Replay(seen)) => {
                if let Some(i) = seen.iter().position(|(id, _)| *id == self.id) {
                    *state = seen.swap_remove(i).1;
                }
            }
            _ => {}
        });
        let rng = &mut state.1;
        (0..n).map(|_| rng.random::<f64>()).collect()
    }

    /// The probability `p`.
    pub fn p(&self) -> f64 {
        self.p
    }

    /// In training, zeroes each element with probability `p` and scales the rest by
    /// `1/(1-p)`; otherwise returns `x`.
    pub fn forward(&self, x: &Tensor, training: bool) -> Result<Tensor> {
        if !training || self.p <= 0.0 {
            return Ok(x.clone());
        }
        let keep = 1.0 - self.p;
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = self
            .uniforms(x.elem_count())
            .into_iter()
            .map(|u| if u < keep { scale } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        Ok((x * mask)?)
    }
}
