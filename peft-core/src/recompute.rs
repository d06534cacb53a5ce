//! Gradient checkpointing (torch's `torch.utils.checkpoint`, transformers'
//! `gradient_checkpointing_enable()`): a checkpointed block keeps none of its activations for
//! the backward pass, only its input; the backward pass runs the block again, with the graph
//! recorded, and backpropagates through that. Activation memory drops from every op of every
//! layer to one hidden state per layer plus one layer's activations, for about one more forward
//! pass of compute.
//!
//! How it fits candle's autograd: [`checkpoint`] runs the block without a graph and returns its
//! output as the result of a custom op on the block input. That op's backward recomputes the
//! block on a copy of the input made a variable, backpropagates the incoming gradient through
//! the recomputed graph, returns the input's gradient to the outer backward pass and sets the
//! block parameters' gradients aside; [`backward`] (which trainers call instead of
//! `Tensor::backward`) adds them to the outer gradients. Dropout draws the same masks in the
//! recomputation as in the forward pass ([`crate::nn::Dropout`] generator states are recorded
//! and replayed), so checkpointed and plain training compute the same gradients.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Shape, Storage, Tensor, Var};

use crate::error::Result;
use crate::grad::{enable_grad, no_grad};
use crate::model::{KvCache, ModelCore};
use crate::nn::{record_dropout, replay_dropout, DropoutStates};

thread_local! {
    /// Gradients of block parameters computed by recomputations during the running backward
    /// pass, waiting for [`backward`] to merge them.
    static STASH: RefCell<Option<GradStore>> = const { RefCell::new(None) };
    /// Blocks recomputed on this thread so far.
    static RECOMPUTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// How many checkpointed blocks this thread has recomputed in backward passes so far (tests and
/// benchmarks check that checkpointing is in effect).
pub fn recomputed_blocks() -> u64 {
    RECOMPUTED.with(std::cell::Cell::get)
}

/// Whether `core`'s blocks are checkpointed now: enabled on the model and the graph recorded
/// (evaluation and generation run under [`crate::no_grad`] and never recompute).
pub fn active(core: &ModelCore) -> bool {
    core.gradient_checkpointing && crate::is_grad_enabled()
}

/// `loss.backward()` with the gradients of checkpointed blocks' parameters included, every
/// gradient detached from the graph (so none keeps the step's activations alive). Call it in
/// place of `Tensor::backward` whenever a model may have gradient checkpointing on; without
/// checkpointed blocks it gives `Tensor::backward`'s values.
pub fn backward(loss: &Tensor) -> Result<GradStore> {
    STASH.with(|s| s.borrow_mut().take());
    let mut grads = loss.backward()?;
    if let Some(inner) = STASH.with(|s| s.borrow_mut().take()) {
        grads.extend(inner)?;
    }
    detach_all(&mut grads);
    Ok(grads)
}

/// Gradients computed from activations carry a graph through them (candle detaches the
/// incoming gradients, not the results), which keeps the forward pass's activations alive as
/// long as the gradients are: through an optimizer step, across gradient accumulation.
/// Detached (a shallow copy each), they hold their values only.
fn detach_all(grads: &mut GradStore) {
    let ids: Vec<_> = grads.get_ids().copied().collect();
    for id in ids {
        if let Some(g) = grads.get_id(id).map(Tensor::detach) {
            grads.insert_id(id, g);
        }
    }
}

/// One block's forward pass over its inputs, owned so the backward pass can run it again.
pub type BlockFn = dyn Fn(&[Tensor]) -> Result<Tensor> + Send + Sync;

/// `f(x)` with `f`'s activations freed at once and recomputed in the backward pass. `f` must be
/// a pure function of `x` and of tensors it owns (layers are read through an
/// `Arc<ModuleTree>` clone, say): it runs once now without a graph and once more in the backward
/// pass. Gradients reach `x` and every variable `f` reads, through [`backward`]. A tensor `f`
/// captures that carries a graph of its own (a prefix computed by a prompt encoder) gets its
/// gradient through that graph, backpropagated once per recomputation; a second input with an
/// expensive graph (an encoder's output) belongs in [`checkpoint2`].
pub fn checkpoint(
    x: &Tensor,
    f: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    run(vec![x.clone()], Box::new(move |xs: &[Tensor]| f(&xs[0])))
}

/// [`checkpoint`] of a block with two inputs (a decoder layer's hidden state and the encoder
/// output it attends to): both get their gradients through the outer backward pass.
pub fn checkpoint2(
    x: &Tensor,
    y: &Tensor,
    f: impl Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    run(
        vec![x.clone(), y.clone()],
        Box::new(move |xs: &[Tensor]| f(&xs[0], &xs[1])),
    )
}

fn run(inputs: Vec<Tensor>, f: Box<BlockFn>) -> Result<Tensor> {
    let detached: Vec<Tensor> = inputs.iter().map(Tensor::detach).collect();
    let (out, dropout) = record_dropout(|| {
        let _g = no_grad();
        f(&detached)
    });
    let out = out?.detach();
    let contiguous_from_zero = out.layout().is_contiguous() && out.layout().start_offset() == 0;
    let out = if contiguous_from_zero {
        out
    } else {
        out.force_contiguous()?
    };
    // The op's arguments carry the graph: an input itself when gradients flow back through it,
    // otherwise a one-element variable (so the op is still recorded and the block's own
    // parameters still get their gradients).
    let wants: Vec<bool> = inputs.iter().map(Tensor::track_op).collect();
    let args = inputs
        .iter()
        .zip(&wants)
        .map(|(x, &w)| {
            Ok(if w {
                x.clone()
            } else {
                Var::zeros(1, DType::F32, x.device())?.as_tensor().clone()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let op = Checkpoint {
        f,
        inputs: detached,
        wants,
        out: Mutex::new(Some(out)),
        dropout,
    };
    Ok(match args.as_slice() {
        [x] => x.apply_op1(op)?,
        [x, y] => x.apply_op2(y, op)?,
        _ => {
            return Err(crate::PeftError::InvalidState(
                "checkpointed blocks take one or two inputs".into(),
            ))
        }
    })
}

/// [`checkpoint`] for a decoder layer that reads and extends layer `layer` of a key/value
/// `cache` (prefix tuning's learned prefix): `f` gets a cache holding only that layer's entry,
/// and the outer cache receives the layer's keys and values as the forward pass left them.
pub fn checkpoint_layer(
    x: &Tensor,
    layer: usize,
    cache: Option<&mut KvCache>,
    f: impl Fn(&Tensor, Option<&mut KvCache>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    with_layer_cache(vec![x.clone()], layer, cache, move |xs, c| f(&xs[0], c))
}

/// [`checkpoint_layer`] with a second input ([`checkpoint2`]): a decoder layer's hidden state
/// `x` and the encoder output `y` its cross-attention reads.
pub fn checkpoint_layer2(
    x: &Tensor,
    y: &Tensor,
    layer: usize,
    cache: Option<&mut KvCache>,
    f: impl Fn(&Tensor, &Tensor, Option<&mut KvCache>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    with_layer_cache(vec![x.clone(), y.clone()], layer, cache, move |xs, c| {
        f(&xs[0], &xs[1], c)
    })
}

fn with_layer_cache(
    inputs: Vec<Tensor>,
    layer: usize,
    cache: Option<&mut KvCache>,
    f: impl Fn(&[Tensor], Option<&mut KvCache>) -> Result<Tensor> + Send + Sync + 'static,
) -> Result<Tensor> {
    let Some(cache) = cache else {
        return run(inputs, Box::new(move |xs: &[Tensor]| f(xs, None)));
    };
    let prefix = cache.get(layer).cloned();
    let written: Arc<Mutex<Option<(Tensor, Tensor)>>> = Arc::default();
    let slot = Arc::clone(&written);
    let out = run(
        inputs,
        Box::new(move |xs: &[Tensor]| {
            let mut local = KvCache::new(layer + 1);
            if let Some(kv) = &prefix {
                local.set(layer, kv.clone());
            }
            let y = f(xs, Some(&mut local))?;
            *slot.lock().unwrap_or_else(|p| p.into_inner()) = local.get(layer).cloned();
            Ok(y)
        }),
    )?;
    let kv = written.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some((k, v)) = kv {
        cache.set(layer, (k.detach(), v.detach()));
    }
    Ok(out)
}

struct Checkpoint {
    f: Box<BlockFn>,
    /// The block inputs, detached.
    inputs: Vec<Tensor>,
    /// Which op arguments are the inputs themselves (the backward pass returns their
    /// gradients); the others are placeholders.
    wants: Vec<bool>,
    /// The output computed by [`checkpoint`], handed over by the forward op (once).
    out: Mutex<Option<Tensor>>,
    dropout: DropoutStates,
}

impl Checkpoint {
    fn take_output(&self) -> candle_core::Result<Tensor> {
        self.out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("checkpointed block applied twice".into()))
    }

    /// The precomputed output as the forward op's result, on the backend `pick` selects.
    fn output<S: candle_core::backend::BackendStorage>(
        &self,
        device: &str,
        pick: impl Fn(&Storage) -> Option<&S>,
    ) -> candle_core::Result<(S, Shape)> {
        let out = self.take_output()?;
        let (storage, layout) = out.storage_and_layout();
        let s = pick(&storage).ok_or_else(|| wrong_storage(device))?;
        Ok((s.try_clone(layout)?, layout.shape().clone()))
    }

    fn cpu_output(&self) -> candle_core::Result<(CpuStorage, Shape)> {
        self.output("CPU", |s| match s {
            Storage::Cpu(s) => Some(s),
            _ => None,
        })
    }

    #[cfg(feature = "cuda")]
    fn cuda_output(&self) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.output("CUDA device", |s| match s {
            Storage::Cuda(s) => Some(s),
            _ => None,
        })
    }

    #[cfg(feature = "metal")]
    fn metal_output(&self) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.output("Metal device", |s| match s {
            Storage::Metal(s) => Some(s),
            _ => None,
        })
    }

    /// The recomputation: the block run again with the graph recorded, the incoming gradient
    /// backpropagated through it; the inputs' gradients are returned, the parameters' set aside
    /// for [`backward`].
    fn input_grads(&self, grad_res: &Tensor) -> candle_core::Result<Vec<Option<Tensor>>> {
        let wrap = |e: crate::PeftError| candle_core::Error::Msg(e.to_string());
        let _g = enable_grad();
        RECOMPUTED.with(|c| c.set(c.get() + 1));
        let inputs = self
            .inputs
            .iter()
            .zip(&self.wants)
            .map(|(x, &w)| {
                Ok(if w {
                    Var::from_tensor(x)?.as_tensor().clone()
                } else {
                    x.clone()
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let out = replay_dropout(&self.dropout, || (self.f)(&inputs)).map_err(wrap)?;
        if !out.track_op() {
            return Ok(vec![None; inputs.len()]);
        }
        let grad_res = grad_res.to_dtype(out.dtype())?;
        let mut grads = (out * grad_res)?.sum_all()?.backward()?;
        let input_grads = inputs
            .iter()
            .zip(&self.wants)
            .map(|(x, &w)| if w { grads.remove(x) } else { None }.map(|g| g.detach()))
            .collect();
        // Detached, the recomputed block is freed now rather than at the end of the backward
        // pass.
        detach_all(&mut grads);
        STASH.with(|s| -> candle_core::Result<()> {
            let mut s = s.borrow_mut();
            match &mut *s {
                Some(stash) => stash.extend(grads),
                None => {
                    *s = Some(grads);
                    Ok(())
                }
            }
        })?;
        Ok(input_grads)
    }
}

fn wrong_storage(device: &str) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "checkpointed block: the output is not on the {device} like its input"
    ))
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "gradient-checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output()
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.metal_output()
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(self.input_grads(grad_res)?.into_iter().next().flatten())
    }
}

impl CustomOp2 for Checkpoint {
    fn name(&self) -> &'static str {
        "gradient-checkpoint"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        self.cpu_output()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        self.cuda_output()
    }

    #[cfg(feature = "metal")]
    fn metal_fwd(
        &self,
        _: &candle_core::MetalStorage,
        _: &Layout,
        _: &candle_core::MetalStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::MetalStorage, Shape)> {
        self.metal_output()
    }

    fn bwd(
        &self,
        _: &Tensor,
        _: &Tensor,
        _: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let mut g = self.input_grads(grad_res)?.into_iter();
        Ok((g.next().flatten(), g.next().flatten()))
    }
}
