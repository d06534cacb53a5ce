//! `torch.no_grad()` for peft-rs: while a [`NoGrad`] guard lives on a thread, adapter outputs
//! (adapted layers, prompt encoders) are detached from the autograd graph, so a forward pass
//! keeps no activations alive for a backward pass that will not come. Evaluation and generation
//! use it; it changes no value, only memory and speed.

use std::cell::Cell;

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// Whether forward passes on this thread record the graph for a backward pass.
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(Cell::get)
}

/// Disables graph recording on this thread until the guard is dropped (guards nest).
#[must_use = "gradients are disabled only while the guard lives"]
#[derive(Debug)]
pub struct NoGrad {
    previous: bool,
}

/// Starts a no-grad region (`let _g = no_grad();`).
pub fn no_grad() -> NoGrad {
    let previous = GRAD_ENABLED.with(|g| g.replace(false));
    NoGrad { previous }
}

/// Re-enables graph recording on this thread until the guard is dropped (the recomputation of
/// a checkpointed block in the backward pass records its graph whatever the caller set).
pub(crate) fn enable_grad() -> NoGrad {
    let previous = GRAD_ENABLED.with(|g| g.replace(true));
    NoGrad { previous }
}

impl Drop for NoGrad {
    fn drop(&mut self) {
        GRAD_ENABLED.with(|g| g.set(self.previous));
    }
}

/// `t` detached from the graph when gradients are disabled, else `t` itself.
pub fn maybe_detach(t: candle_core::Tensor) -> candle_core::Tensor {
    if is_grad_enabled() {
        t
    } else {
        t.detach()
    }
}
