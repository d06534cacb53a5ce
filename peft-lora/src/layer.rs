//! The LoRA layers: `y = base(x) + B(A(dropout(x))) * scaling` on linear layers and
//! `y = base(ids) + (A^T[ids] B^T) * scaling` on embeddings, with peft's parameter names
//! (`lora_A.weight`, `lora_B.weight`, `lora_embedding_A`, `lora_embedding_B`) and
//! initialisations. Plain LoRA materialises `B @ A` only when merging.
//!
//! DoRA (`use_dora`) adds a trained magnitude `m` (`lora_magnitude_vector`, one value per output
//! feature) and rescales the adapted layer by `m / ||W + scaling B A||`, the norm taken per
//! output feature over the input features and treated as a constant (detached), as peft does:
//! `y = base(x) + (m/n - 1) (base(x) - bias) + (m/n) B(A(x)) scaling`; with dropout active in
//! training, `base(x) - bias` is recomputed on the dropped input. The magnitude starts at the
//! norm, so a fresh DoRA adapter starts as its LoRA does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};
use peft_core::layers::{embedding_lookup, linear_forward, DenseLinear, EmbeddingLike, LinearLike};
use peft_kernels::linear::scale_features;

use crate::fused::lowrank_linear_forward;
use peft_core::nn::Dropout;
use peft_core::{EmbeddingAdapter, Init, LinearAdapter, ParamBuilder, Result};

use crate::config::InitLoraWeights;

/// LoRA on a linear layer.
#[derive(Debug)]
pub struct LoraLinear {
    a: Tensor,
    b: Tensor,
    scaling: Scaling,
    dropout: Dropout,
    /// DoRA's magnitude `[out]`.
    magnitude: Option<Tensor>,
    /// `lora_B.bias` `[out]` (`lora_bias`), added to `B A x` before the scaling.
    b_bias: Option<Tensor>,
    /// The base weight PiSSA/OLoRA left (stored layout), until core writes it into the base.
    rewritten: Mutex<Option<Tensor>>,
}

/// The scaling of `B A x`: fixed by the config, but replaceable in place by a hot-swap
/// ([`LinearAdapter::hotswap_settings`]) while the layer is shared with the model.
#[derive(Debug)]
struct Scaling(AtomicU64);

impl Scaling {
    fn new(s: f64) -> Self {
        Scaling(AtomicU64::new(s.to_bits()))
    }
    fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
    fn set(&self, s: f64) {
        self.0.store(s.to_bits(), Ordering::Relaxed)
    }
}

/// The scaling the LoRA config gives the module at `path`.
fn scaling_for(path: &str, config: &dyn peft_core::MethodConfig) -> Result<f64> {
    use peft_core::low_rank::LowRank;
    let lora = config
        .as_any()
        .downcast_ref::<crate::config::LoraConfig>()
        .ok_or_else(|| {
            peft_core::PeftError::InvalidState(format!(
                "{path}: cannot take the settings of a {} config",
                config.peft_type()
            ))
        })?;
    let (r, alpha) = lora.rank_and_alpha(path);
    Ok(lora.scaling(r, alpha))
}

/// peft's `orthogonal_init`: `Q` from the QR of an `r x r` normal matrix, `A = (N_a Q_odd)ᵀ`
/// (`N_a`: `[in, r/2]` normal, `Q_odd`: rows 0, 2, ...) and `B = N_bᵀ Q_even` (`N_b`:
/// `[r/2, out]`, `Q_even`: rows 1, 3, ...): the rows of `Q` are orthonormal, so `B A = 0`.
/// Loaded from a checkpoint, the saved factors are used as they are.
fn orthogonal_factors(
    params: &ParamBuilder,
    in_features: usize,
    out_features: usize,
    r: usize,
) -> Result<(Tensor, Tensor)> {
    use peft_core::linalg::{thin_qr, Matrix};
    use peft_core::rand::SeedableRng;
    if !r.is_multiple_of(2) && !params.is_loading() {
        return Err(peft_core::PeftError::InvalidState(format!(
            "{}: orthogonal initialization requires the LoRA rank to be even, got {r} instead",
            params.path("")
        )));
    }
    let normal = Init::Normal {
        mean: 0.0,
        std: 1.0,
    };
    let q = {
        let mut rng = peft_core::rand::rngs::StdRng::seed_from_u64(params.seed("orthogonal"));
        let x = normal.sample(r * r, &mut rng);
        thin_qr(&Matrix::from_vec(
            r,
            r,
            x.iter().map(|v| *v as f64).collect(),
        ))
        .0
    };
    let half = r / 2;
    let rows = |parity: usize| -> Matrix {
        let picked: Vec<f64> = (0..half)
            .flat_map(|i| (0..r).map(move |j| (2 * i + parity, j)))
            .map(|(i, j)| q.at(i, j))
            .collect();
        Matrix::from_vec(half, r, picked)
    };
    let to_tensor = |m: &Matrix, device: &candle_core::Device| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            m.data.iter().map(|v| *v as f32).collect::<Vec<f32>>(),
            (m.rows, m.cols),
            device,
        )?)
    };
    let device = params.device().clone();
    let a = params
        .pp("lora_A")
        .get_with(&[r, in_features], "weight", |rng| {
            let n = normal.sample(in_features * half, rng);
            let n = Matrix::from_vec(in_features, half, n.iter().map(|v| *v as f64).collect());
            to_tensor(&n.matmul(&rows(0)).t(), &device)
        })?;
    let b = params
        .pp("lora_B")
        .get_with(&[out_features, r], "weight", |rng| {
            let n = normal.sample(half * out_features, rng);
            let n = Matrix::from_vec(half, out_features, n.iter().map(|v| *v as f64).collect());
            to_tensor(&n.t().matmul(&rows(1)), &device)
        })?;
    Ok((a, b))
}

fn poisoned() -> peft_core::PeftError {
    peft_core::PeftError::InvalidState("a LoRA layer's lock was poisoned".into())
}

/// The starting factors of an initialisation that decomposes the base weight `W` (`[out, in]`,
/// f32), and the residual left in the base, in the layer's stored layout:
///
/// - PiSSA (`"pissa"`, peft's `pissa_init`): the `r` leading singular triplets of `W`,
///   `A = sqrt(S/scaling) Vᵀ`, `B = U sqrt(S/scaling)`, so `scaling B A` is the best rank-`r`
///   approximation of `W`; `"pissa_niter_N"` takes the triplets from a randomized SVD with `N`
///   power iterations (`torch.svd_lowrank`).
/// - OLoRA (`"olora"`, `olora_init`): `W = Q R`, `B = Q[:, :r]`, `A = R[:r]` (LAPACK's signs,
///   as torch's QR gives them).
///
/// Both leave `W - scaling B A`, computed in f32 as peft does.
fn decompose(
    path: &str,
    init: &InitLoraWeights,
    base: &dyn LinearLike,
    r: usize,
    scaling: f64,
    seed: u64,
) -> Result<(Tensor, Tensor, Tensor)> {
    use peft_core::linalg::{householder_qr_leading, svd_lowrank, svd_top, Matrix};
    use peft_core::rand::SeedableRng;
    let refuse = |reason: String| peft_core::PeftError::Unsupported {
        source_name: path.to_string(),
        key: "init_lora_weights".into(),
        value: init.to_json().to_string(),
        reason,
    };
    let (out, inp) = (base.out_features(), base.in_features());
    if r > out.min(inp) {
        return Err(refuse(format!(
            "the rank {r} is above min(out, in) = {} of the [{out}, {inp}] weight it decomposes",
            out.min(inp)
        )));
    }
    let weight = weight_out_in(base)?;
    let w = Matrix::from_vec(
        out,
        inp,
        weight
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect(),
    );
    let device = weight.device().clone();
    let tensor = |m: &Matrix| -> Result<Tensor> {
        Ok(Tensor::from_vec(
            m.data.iter().map(|v| *v as f32).collect::<Vec<f32>>(),
            (m.rows, m.cols),
            &device,
        )?)
    };
    let (a, b) = match init {
        InitLoraWeights::Pissa { niter } => {
            if let Some(backend) = base.quantization_backend() {
                return Err(refuse(format!(
                    "PiSSA needs a float32/16 base weight, not a {backend} one (peft: \"initialize \
                     PiSSA under float32, float16, or bfloat16\", then quantize the residual)"
                )));
            }
            let svd = match niter {
                None => svd_top(&w, r),
                Some(n) => {
                    let mut rng = peft_core::rand::rngs::StdRng::seed_from_u64(seed);
                    let normal = Init::Normal {
                        mean: 0.0,
                        std: 1.0,
                    };
                    svd_lowrank(&w, r, *n, || f64::from(normal.sample(1, &mut rng)[0]))
                }
            };
            let root: Vec<f64> = svd.s[..r].iter().map(|s| (s / scaling).sqrt()).collect();
            let a = Matrix::from_vec(
                r,
                inp,
                (0..r * inp)
                    .map(|k| root[k / inp] * svd.vt.at(k / inp, k % inp))
                    .collect(),
            );
            let b = Matrix::from_vec(
                out,
                r,
                (0..out * r)
                    .map(|k| svd.u.at(k / r, k % r) * root[k % r])
                    .collect(),
            );
            (tensor(&a)?, tensor(&b)?)
        }
        InitLoraWeights::Olora => {
            if base.stores_transposed() {
                return Err(refuse(
                    "OLoRA decomposes the weight as stored, which for a Conv1D ([in, out]) layer \
                     gives factors of the wrong shapes (peft fails there too)"
                        .into(),
                ));
            }
            let (q, rr) = householder_qr_leading(&w, r);
            (tensor(&rr)?, tensor(&q)?)
        }
        InitLoraWeights::Loftq { bits, iters } => {
            if let Some(backend) = base.quantization_backend() {
                return Err(refuse(format!(
                    "LoftQ quantizes the base itself: pass the full-precision model, not a {backend} \
                     one (as peft requires)"
                )));
            }
            if base.stores_transposed() {
                return Err(refuse(
                    "LoftQ decomposes the weight as stored, which for a Conv1D ([in, out]) layer \
                     gives factors of the wrong shapes (peft fails there too)"
                        .into(),
                ));
            }
            let (a, b, q) = loftq(&w, r, *bits, *iters)?;
            // The base becomes the dequantized weight, not W - scaling B A.
            return Ok((tensor(&a)?, tensor(&b)?, tensor(&q)?));
        }
        _ => {
            return Err(peft_core::PeftError::InvalidState(format!(
                "{path}: {} does not decompose the base weight",
                init.to_json()
            )))
        }
    };
    let residual = (&weight - (b.matmul(&a)? * scaling)?)?;
    let residual = if base.stores_transposed() {
        residual.t()?.contiguous()?
    } else {
        residual
    };
    Ok((a, b, residual))
}

/// peft's `loftq_init` on `w` (`[out, in]`): `iters` alternations of `Q = dequant(quant(W -
/// L R))` and `L R = ` the rank-`r` SVD of `W - Q` (`L = U sqrt(S)`, `R = sqrt(S) Vᵀ`, no
/// division by the scaling), starting from `L R = 0`. Returns `(A = R, B = L, Q)`.
fn loftq(
    w: &peft_core::linalg::Matrix,
    r: usize,
    bits: u8,
    iters: usize,
) -> Result<(
    peft_core::linalg::Matrix,
    peft_core::linalg::Matrix,
    peft_core::linalg::Matrix,
)> {
    use peft_core::linalg::{svd_top, Matrix};
    let quantizer = if bits == 4 { "nf4-nodq" } else { "int8" };
    let (rows, cols) = (w.rows, w.cols);
    let mut target: Vec<f32> = w.data.iter().map(|v| *v as f32).collect();
    let mut result = None;
    for i in 0..iters {
        let q = peft_core::quantizers::round_trip(quantizer, &target, rows, cols)?;
        let residual = Matrix::from_vec(
            rows,
            cols,
            w.data
                .iter()
                .zip(&q)
                .map(|(w, q)| w - f64::from(*q))
                .collect(),
        );
        let svd = svd_top(&residual, r);
        let root: Vec<f64> = svd.s[..r].iter().map(|s| s.sqrt()).collect();
        let l = Matrix::from_vec(
            rows,
            r,
            (0..rows * r)
                .map(|k| svd.u.at(k / r, k % r) * root[k % r])
                .collect(),
        );
        let rt = Matrix::from_vec(
            r,
            cols,
            (0..r * cols)
                .map(|k| root[k / cols] * svd.vt.at(k / cols, k % cols))
                .collect(),
        );
        if i + 1 < iters {
            let lr = l.matmul(&rt);
            target = w
                .data
                .iter()
                .zip(&lr.data)
                .map(|(w, p)| (w - p) as f32)
                .collect();
        }
        result = Some((
            rt,
            l,
            Matrix::from_vec(rows, cols, q.iter().map(|v| f64::from(*v)).collect()),
        ));
    }
    result.ok_or_else(|| {
        peft_core::PeftError::InvalidState("LoftQ needs at least one iteration".into())
    })
}

/// `t` in f32.
fn f32(t: &Tensor) -> Result<Tensor> {
    Ok(if t.dtype() == DType::F32 {
        t.clone()
    } else {
        t.to_dtype(DType::F32)?
    })
}

/// The norm of each row of a 2-D `w`, detached: DoRA's weight norm (peft's `get_weight_norm`,
/// `torch.linalg.norm(w, dim=1)`), a constant for the gradient.
fn row_norm(w: &Tensor) -> Result<Tensor> {
    Ok(w.detach().sqr()?.sum(1)?.sqrt()?)
}

/// A linear layer's weight in f32, laid out `[out, in]`.
fn weight_out_in(base: &dyn LinearLike) -> Result<Tensor> {
    let w = f32(&base.weight()?)?;
    Ok(if base.stores_transposed() {
        w.t()?.contiguous()?
    } else {
        w
    })
}

impl LoraLinear {
    /// Builds (or loads) `lora_A.weight` `[r, in]` and `lora_B.weight` `[out, r]` under `params`.
    #[allow(clippy::too_many_arguments)] // mirrors peft's `update_layer` arguments
    pub fn new(
        params: &ParamBuilder,
        in_features: usize,
        out_features: usize,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
        seed: u64,
    ) -> Result<Self> {
        if *init == InitLoraWeights::Orthogonal {
            let (a, b) = orthogonal_factors(params, in_features, out_features, r)?;
            return Ok(LoraLinear {
                a,
                b,
                scaling: Scaling::new(scaling),
                dropout: Dropout::new(dropout, seed),
                magnitude: None,
                b_bias: None,
                rewritten: Mutex::new(None),
            });
        }
        let (init_a, init_b) = match init {
            InitLoraWeights::Default
            | InitLoraWeights::Other(_)
            | InitLoraWeights::Orthogonal
            | InitLoraWeights::Pissa { .. }
            | InitLoraWeights::Olora
            | InitLoraWeights::Loftq { .. } => {
                (Init::kaiming_uniform_linear(in_features), Init::Zeros)
            }
            InitLoraWeights::Gaussian => (
                Init::Normal {
                    mean: 0.0,
                    std: 1.0 / r as f64,
                },
                Init::Zeros,
            ),
            InitLoraWeights::Random => (
                Init::kaiming_uniform_linear(in_features),
                Init::kaiming_uniform_linear(r),
            ),
        };
        let a = params
            .pp("lora_A")
            .get(&[r, in_features], "weight", init_a)?;
        let b = params
            .pp("lora_B")
            .get(&[out_features, r], "weight", init_b)?;
        Ok(LoraLinear {
            a,
            b,
            scaling: Scaling::new(scaling),
            dropout: Dropout::new(dropout, seed),
            magnitude: None,
            b_bias: None,
            rewritten: Mutex::new(None),
        })
    }

    /// A layer whose initialisation decomposes `base`'s weight `W` (PiSSA, OLoRA: see
    /// [`decompose`]): `lora_A`/`lora_B` start as the leading factors and the base keeps the
    /// residual `W - scaling B A`, so the adapted layer starts out computing `W x`. Loading a
    /// checkpoint, the saved factors replace the starting ones but the base is rewritten with
    /// the residual of the starting ones, as peft does (it reruns the initialisation).
    #[allow(clippy::too_many_arguments)] // mirrors `new`
    pub fn decomposed(
        params: &ParamBuilder,
        path: &str,
        base: &dyn LinearLike,
        r: usize,
        scaling: f64,
        dropout: f64,
        init: &InitLoraWeights,
        seed: u64,
    ) -> Result<Self> {
        let (a0, b0, residual) = decompose(path, init, base, r, scaling, params.seed("pissa"))?;
        if params.is_loading() && matches!(init, InitLoraWeights::Pissa { niter: Some(_) }) {
            tracing::warn!(
                "{path}: init_lora_weights={}: the base residual is recomputed from a new random \
                 sketch, so it is not the one the adapter was trained on (as in peft); save the \
                 adapter with a conversion to plain LoRA to reload it exactly",
                init.to_json()
            );
        }
        let a = params
            .pp("lora_A")
            .get_with(&[r, base.in_features()], "weight", |_| Ok(a0.clone()))?;
        let b = params
            .pp("lora_B")
            .get_with(&[base.out_features(), r], "weight", |_| Ok(b0.clone()))?;
        Ok(LoraLinear {
            a,
            b,
            scaling: Scaling::new(scaling),
            dropout: Dropout::new(dropout, seed),
            magnitude: None,
            b_bias: None,
            rewritten: Mutex::new(Some(residual)),
        })
    }

    /// `base` with the weight this layer's initialisation left in it, if it rewrites the base
    /// (what DoRA's magnitude is initialised over, as peft initialises DoRA after PiSSA).
    pub fn rewritten_base(&self, base: &dyn LinearLike) -> Result<Option<Arc<dyn LinearLike>>> {
        let pending = self.rewritten.lock().map_err(|_| poisoned())?.clone();
        pending
            .map(|w| peft_core::layers::with_stored_weight(base, &w))
            .transpose()
    }

    /// A layer over factors made elsewhere (`a: [r, in]`, `b: [out, r]`): a head tied to an
    /// embedding's LoRA reads that adapter's (transposed) parameters.
    pub fn from_factors(a: Tensor, b: Tensor, scaling: f64, dropout: f64, seed: u64) -> Self {
        LoraLinear {
            a,
            b,
            scaling: Scaling::new(scaling),
            dropout: Dropout::new(dropout, seed),
            magnitude: None,
            b_bias: None,
            rewritten: Mutex::new(None),
        }
    }

    /// Gives `lora_B` a bias (`lora_bias`): `lora_B.bias` `[out]` under `params`, zeros by
    /// default as peft initialises it, torch's `nn.Linear` bias init (uniform on `±1/sqrt(r)`)
    /// with `init_lora_weights=false`.
    pub fn with_lora_bias(mut self, params: &ParamBuilder, init: &InitLoraWeights) -> Result<Self> {
        let (out, r) = self.b.dims2()?;
        let init = match init {
            InitLoraWeights::Random => Init::kaiming_uniform_linear(r),
            _ => Init::Zeros,
        };
        self.b_bias = Some(params.pp("lora_B").get(&[out], "bias", init)?);
        Ok(self)
    }

    /// `y + scaling * lora_B.bias` (with `lora_bias`), in `y`'s dtype.
    fn add_b_bias(&self, y: Tensor) -> Result<Tensor> {
        let Some(b) = &self.b_bias else {
            return Ok(y);
        };
        let b = (b * self.scaling.get())?.to_dtype(y.dtype())?;
        Ok(y.broadcast_add(&b)?)
    }

    /// Makes this a DoRA layer over `base`: builds (or loads) `lora_magnitude_vector` `[out]`
    /// under `params`, initialised to the weight norm `||W + scaling B A||`.
    pub fn with_dora(mut self, params: &ParamBuilder, base: &dyn LinearLike) -> Result<Self> {
        let magnitude = params.get_with(&[base.out_features()], "lora_magnitude_vector", |_| {
            self.weight_norm(&weight_out_in(base)?)
        })?;
        self.magnitude = Some(magnitude);
        Ok(self)
    }

    /// DoRA's magnitude `[out]`, if this is a DoRA layer.
    pub fn magnitude(&self) -> Option<&Tensor> {
        self.magnitude.as_ref()
    }

    /// `||weight + scaling B A||` per output feature, detached; `weight` is f32 `[out, in]`.
    fn weight_norm(&self, weight: &Tensor) -> Result<Tensor> {
        let delta = (self.b.detach().matmul(&self.a.detach())? * self.scaling.get())?;
        row_norm(&(weight + delta)?)
    }

    /// DoRA's scale `m / ||W + scaling B A||` `[out]` over `base`'s weight.
    fn dora_scale(&self, magnitude: &Tensor, base: &dyn LinearLike) -> Result<Tensor> {
        Ok(magnitude.broadcast_div(&self.weight_norm(&weight_out_in(base)?)?)?)
    }

    /// `z * scale + bias * (1 - scale)` in f32, back in `dtype`: peft's
    /// `y + (scale - 1) (y - bias) + scale * lora` with `z = y + lora`, in one pass.
    fn rescale(z: &Tensor, scale: &Tensor, base: &dyn LinearLike, dtype: DType) -> Result<Tensor> {
        let bias = base.bias().map(f32).transpose()?;
        Ok(scale_features(z, scale, bias.as_ref())?.to_dtype(dtype)?)
    }

    /// The DoRA layer's output (see the module docs).
    fn dora_output(
        &self,
        magnitude: &Tensor,
        base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        let x = f32(x)?;
        let x = self.dropout.forward(&x, training)?;
        let scale = self.dora_scale(magnitude, base)?;
        let h = (linear_forward(&x, &self.a, false)? * self.scaling.get())?;
        let lora = linear_forward(&h, &self.b, false)?;
        let dtype = y.dtype();
        let y = f32(&y)?;
        if self.dropout.is_identity(training) {
            return Self::rescale(&(y + lora)?, &scale, base, dtype);
        }
        // With dropout, peft recomputes the base product on the dropped input.
        let weight = weight_out_in(base)?;
        let base_result = linear_forward(&x, &weight, false)?;
        let dora = (base_result.broadcast_mul(&(&scale - 1.0)?)? + lora.broadcast_mul(&scale)?)?;
        Ok((y + dora)?.to_dtype(dtype)?)
    }

    /// The scaling applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        self.scaling.get()
    }

    /// `(B @ A) * scaling`, shaped `[out, in]`.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)? * self.scaling.get())?)
    }
}

impl LinearAdapter for LoraLinear {
    fn take_rewritten_base(&self) -> Option<Tensor> {
        self.rewritten.lock().ok().and_then(|mut w| w.take())
    }

    fn hotswap_settings(&self, path: &str, config: &dyn peft_core::MethodConfig) -> Result<()> {
        self.scaling.set(scaling_for(path, config)?);
        Ok(())
    }

    fn adapt_output(
        &self,
        base: &dyn LinearLike,
        x: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        if let Some(m) = &self.magnitude {
            return self.dora_output(m, base, x, y, training);
        }
        let x = if x.dtype() == DType::F32 {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let x = self.dropout.forward(&x, training)?;
        // Scale the rank-r intermediate, not the [.., out] delta: one small temporary instead
        // of a full-width one (and its gradient).
        let h = (linear_forward(&x, &self.a, false)? * self.scaling.get())?;
        let delta = linear_forward(&h, &self.b, false)?;
        let delta = if y.dtype() == DType::F32 {
            delta
        } else {
            delta.to_dtype(y.dtype())?
        };
        self.add_b_bias((y + delta)?)
    }

    fn fused_forward(
        &self,
        base: &dyn LinearLike,
        x: &Tensor,
        training: bool,
    ) -> Result<Option<Tensor>> {
        let Some(dense) = base.as_any().downcast_ref::<DenseLinear>() else {
            return Ok(None);
        };
        if !self.dropout.is_identity(training) {
            return Ok(None);
        }
        let Some(y) = lowrank_linear_forward(x, dense, &self.a, &self.b, self.scaling.get())?
        else {
            return Ok(None);
        };
        match &self.magnitude {
            None => Ok(Some(self.add_b_bias(y)?)),
            // DoRA: the fused `W x + bias + scaling B A x`, rescaled.
            Some(m) => {
                let scale = self.dora_scale(m, base)?;
                Ok(Some(Self::rescale(&y, &scale, base, DType::F32)?))
            }
        }
    }

    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let delta = self.delta_weight()?;
        let merged = (weight + &delta)?;
        let Some(m) = &self.magnitude else {
            let bias = match (&self.b_bias, bias) {
                (None, bias) => bias.cloned(),
                (Some(b), Some(bias)) => Some((bias + (b * self.scaling.get())?)?),
                (Some(_), None) => {
                    return Err(peft_core::PeftError::InvalidState(
                        "cannot merge a LoRA adapter with lora_bias=true into a layer without a bias (peft refuses it too)".into(),
                    ))
                }
            };
            return Ok((merged, bias));
        };
        // peft: the norm of the unmerged weight plus this delta; the bias is not rescaled.
        let factor = m.broadcast_div(&row_norm(&(base_weight + delta)?)?)?;
        Ok((merged.broadcast_mul(&factor.unsqueeze(1)?)?, bias.cloned()))
    }
}

/// LoRA on an embedding table.
#[derive(Debug)]
pub struct LoraEmbedding {
    /// `[r, num_embeddings]`
    a: Tensor,
    /// `[dim, r]`
    b: Tensor,
    scaling: Scaling,
    padding_idx: Option<usize>,
    /// DoRA's magnitude `[dim]` (one per embedding feature).
    magnitude: Option<Tensor>,
}

impl LoraEmbedding {
    /// Builds (or loads) `lora_embedding_A` `[r, vocab]` and `lora_embedding_B` `[dim, r]`.
    pub fn new(
        params: &ParamBuilder,
        num_embeddings: usize,
        dim: usize,
        r: usize,
        scaling: f64,
        init: &InitLoraWeights,
        padding_idx: Option<usize>,
    ) -> Result<Self> {
        let (a, b) = Self::factors(params, num_embeddings, dim, r, init)?;
        Ok(LoraEmbedding {
            a,
            b,
            scaling: Scaling::new(scaling),
            padding_idx,
            magnitude: None,
        })
    }

    /// Builds (or loads) `lora_embedding_A` `[r, vocab]` and `lora_embedding_B` `[dim, r]`
    /// under `params` (A zero and B normal, as peft; both normal with `init_lora_weights=false`).
    pub fn factors(
        params: &ParamBuilder,
        num_embeddings: usize,
        dim: usize,
        r: usize,
        init: &InitLoraWeights,
    ) -> Result<(Tensor, Tensor)> {
        let normal = Init::Normal {
            mean: 0.0,
            std: 1.0,
        };
        let (init_a, init_b) = match init {
            InitLoraWeights::Random => (normal, normal),
            _ => (Init::Zeros, normal),
        };
        Ok((
            params.get(&[r, num_embeddings], "lora_embedding_A", init_a)?,
            params.get(&[dim, r], "lora_embedding_B", init_b)?,
        ))
    }

    /// Makes this a DoRA embedding over `base`: `lora_magnitude_vector` `[dim]`, initialised to
    /// the norm of each feature over the vocabulary, `||W^T + scaling B A||` per row.
    pub fn with_dora(mut self, params: &ParamBuilder, base: &dyn EmbeddingLike) -> Result<Self> {
        let magnitude =
            params.get_with(&[base.embedding_dim()], "lora_magnitude_vector", |_| {
                self.weight_norm(&f32(&base.weight()?)?)
            })?;
        self.magnitude = Some(magnitude);
        Ok(self)
    }

    /// `scaling * (B A)^T`, shaped like the table `[num_embeddings, dim]`.
    fn delta_weight(&self) -> Result<Tensor> {
        Ok((self.b.matmul(&self.a)?.t()? * self.scaling.get())?)
    }

    /// `||table^T + scaling B A||` per embedding feature, detached; `table` is f32
    /// `[num_embeddings, dim]`.
    fn weight_norm(&self, table: &Tensor) -> Result<Tensor> {
        let delta = (self.b.detach().matmul(&self.a.detach())? * self.scaling.get())?;
        row_norm(&(table.t()? + delta)?)
    }
}

impl EmbeddingAdapter for LoraEmbedding {
    fn hotswap_settings(&self, path: &str, config: &dyn peft_core::MethodConfig) -> Result<()> {
        self.scaling.set(scaling_for(path, config)?);
        Ok(())
    }

    fn adapt_output(
        &self,
        base: &dyn EmbeddingLike,
        ids: &Tensor,
        y: Tensor,
        training: bool,
    ) -> Result<Tensor> {
        let table = self.a.t()?.contiguous()?;
        let mut after_a = embedding_lookup(&table, ids)?;
        if let (true, Some(pad)) = (training, self.padding_idx) {
            // torch's padding_idx: the padding row gets no gradient.
            let is_pad = ids
                .to_dtype(DType::U32)?
                .eq(pad as u32)?
                .unsqueeze(candle_core::D::Minus1)?;
            let is_pad = is_pad.broadcast_as(after_a.shape())?;
            after_a = is_pad.where_cond(&after_a.detach(), &after_a)?;
        }
        let delta = (linear_forward(&after_a, &self.b, false)? * self.scaling.get())?;
        if let Some(m) = &self.magnitude {
            // peft: `scale * y + scale * delta`, scale = m / ||W^T + scaling B A|| per feature.
            let scale = m.broadcast_div(&self.weight_norm(&f32(&base.weight()?)?)?)?;
            let out_dtype = y.dtype();
            let adapted = (f32(&y)? + delta)?.broadcast_mul(&scale)?;
            return Ok(adapted.to_dtype(out_dtype)?);
        }
        let delta = if y.dtype() == DType::F32 {
            delta
        } else {
            delta.to_dtype(y.dtype())?
        };
        Ok((y + delta)?)
    }

    fn merge(&self, weight: &Tensor, base_weight: &Tensor) -> Result<Tensor> {
        let delta = self.delta_weight()?;
        let merged = (weight + &delta)?;
        let Some(m) = &self.magnitude else {
            return Ok(merged);
        };
        let factor = m.broadcast_div(&row_norm(&(base_weight + delta)?.t()?)?)?;
        Ok(merged.broadcast_mul(&factor.unsqueeze(0)?)?)
    }
}
