//! `peft-oft`: OFT (orthogonal fine-tuning, Qiu et al. 2023, as peft ≥ 0.18 implements it) for
//! peft-rs, checkpoint-compatible with peft's `OFTConfig` (`peft_type` `OFT`).
//!
//! Each targeted layer's input is split into blocks of `oft_block_size` features (or into `r`
//! blocks), and each block is rotated by an orthogonal matrix `R_i`, the Cayley transform of a
//! skew-symmetric `Q_i` whose upper triangle is the trained `oft_R.weight` row `i`
//! (`[r, b(b-1)/2]`, or one shared row with `block_share`). With `use_cayley_neumann` (peft's
//! default) `R = I + 2Q + 2Q² + … + Q^{n-1}`, the Neumann series of `(I + Q)(I - Q)⁻¹` to
//! `num_cayley_neumann_terms` as peft sums it; otherwise the exact `(I - Q)(I + Q)⁻¹`, solved by
//! elimination (no pivot is needed: `I + Q` has a positive-definite symmetric part). A linear
//! layer computes `base(x R)`, an embedding `E[ids] R`; merging folds `Rᵀ` (linear) or `R`
//! (embedding) into the weight. `coft` projects each `Q_i` back into a ball of radius
//! `eps / √blocks` before every use, in place, as peft does. `r` and `oft_block_size` that do
//! not divide the layer's width are adjusted per layer by peft's rule.
//!
//! `init_weights=true`: `Q = 0`, a no-op adapter; `false`: normal with std 0.1.
//!
//! Written only against `peft-core`'s public API. Not supported: convolutions (`oft.Conv2d`)
//! until a model here has one; GPT-2's Conv1D layers, which peft refuses too. `module_dropout`
//! is read and written but, as in peft 0.21's linear and embedding layers, has no effect.

use candle_core::{DType, Tensor};
use peft_core::delta::{map_rows, require_linear_layout};
use peft_core::json::ConfigFields;
use peft_core::{
    CommonConfig, EmbeddingAdapter, EmbeddingLike, Init, LayerMethod, LinearAdapter, LinearLike,
    MethodConfig, MethodRegistration, ParamBuilder, PeftError, Result, TargetModules, TargetSpec,
    TrainedBiases,
};
use serde_json::{Map, Value};

/// The `peft_type` this crate registers.
pub const PEFT_TYPE: &str = "OFT";

/// The `bias` value naming the adapted layers' biases.
const BIAS_ONLY: &str = "oft_only";

peft_core::register_method!(MethodRegistration {
    peft_type: PEFT_TYPE,
    description: "OFT: block-diagonal orthogonal rotations (Cayley) of linear and embedding inputs",
    crate_name: env!("CARGO_PKG_NAME"),
    parse,
});

/// The OFT configuration (peft's `OFTConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct OftConfig {
    /// Module selection (`target_modules`, `exclude_modules`, `layers_to_transform`,
    /// `layers_pattern`, `modules_to_save`).
    pub targets: TargetSpec,
    /// `r`: the number of blocks per layer (0: from `oft_block_size`).
    pub r: usize,
    /// `oft_block_size`: the block width (0: from `r`). Exactly one of the two is non-zero.
    pub oft_block_size: usize,
    /// `module_dropout` (kept for the file; no effect, as in peft).
    pub module_dropout: f64,
    /// `fan_in_fan_out` (peft resets it to `false` on linear layers).
    pub fan_in_fan_out: bool,
    /// `bias`: which base biases train with the adapter (`"none"`, `"all"`, `"oft_only"`).
    pub bias: TrainedBiases,
    /// `init_weights`: zero (a no-op adapter); `false`: normal with std 0.1.
    pub init_weights: bool,
    /// `coft`: the constrained variant (each block projected into the `eps` ball).
    pub coft: bool,
    /// `eps`: COFT's radius (before the `1/√blocks` factor).
    pub eps: f64,
    /// `block_share`: one rotation shared by every block of a layer.
    pub block_share: bool,
    /// `use_cayley_neumann`: the truncated Neumann series instead of the exact inverse.
    pub use_cayley_neumann: bool,
    /// `num_cayley_neumann_terms`.
    pub num_cayley_neumann_terms: usize,
}

impl Default for OftConfig {
    /// peft's defaults: `oft_block_size=32`, the Neumann series with 5 terms.
    fn default() -> Self {
        OftConfig {
            targets: TargetSpec::default(),
            r: 0,
            oft_block_size: 32,
            module_dropout: 0.0,
            fan_in_fan_out: false,
            bias: TrainedBiases::None,
            init_weights: true,
            coft: false,
            eps: 6e-5,
            block_share: false,
            use_cayley_neumann: true,
            num_cayley_neumann_terms: 5,
        }
    }
}

impl OftConfig {
    /// A config with blocks of `oft_block_size` features, peft's defaults otherwise.
    pub fn with_block_size(oft_block_size: usize) -> Self {
        OftConfig {
            oft_block_size,
            ..OftConfig::default()
        }
    }

    /// `(blocks, block size)` for a layer `width` features wide: peft's `update_layer`, which
    /// moves a value that does not divide the width to the nearest divisor (ties downwards).
    pub fn blocks_for(&self, width: usize) -> (usize, usize) {
        if self.r == 0 {
            let b = if !width.is_multiple_of(self.oft_block_size) || self.oft_block_size > width {
                adjust(width, self.oft_block_size)
            } else {
                self.oft_block_size
            };
            (width / b, b)
        } else {
            let r = if !width.is_multiple_of(self.r) || self.r > width {
                adjust(width, self.r)
            } else {
                self.r
            };
            (r, width / r)
        }
    }
}

/// peft's `adjust_oft_parameters`: the divisor of `width` nearest to `value` (the lower one on
/// a tie; `width` itself when `value` exceeds it).
fn adjust(width: usize, value: usize) -> usize {
    if value >= width {
        return width;
    }
    let mut higher = value;
    while higher <= width && !width.is_multiple_of(higher) {
        higher += 1;
    }
    let mut lower = value;
    while lower > 1 && !width.is_multiple_of(lower) {
        lower -= 1;
    }
    if value - lower <= higher - value {
        lower
    } else {
        higher
    }
}

/// Parses an OFT config (the registry's parse function).
pub fn parse(fields: &mut ConfigFields, _common: &CommonConfig) -> Result<Box<dyn MethodConfig>> {
    let d = OftConfig::default();
    let targets = TargetSpec::take_fields(fields, true)?;
    let r = fields.take_usize("r", d.r)?;
    let oft_block_size = fields.take_usize("oft_block_size", d.oft_block_size)?;
    if (r == 0) == (oft_block_size == 0) {
        return Err(PeftError::config_value(
            fields.source_name(),
            "r",
            "exactly one of r and oft_block_size non-zero (r x oft_block_size = in_features)",
            format!("r = {r}, oft_block_size = {oft_block_size}"),
        ));
    }
    let module_dropout = fields.take_probability("module_dropout", 0.0)?;
    let eps = fields.take_f64("eps", d.eps)?;
    let terms = fields.take_usize("num_cayley_neumann_terms", d.num_cayley_neumann_terms)?;
    Ok(Box::new(OftConfig {
        targets,
        r,
        oft_block_size,
        module_dropout,
        fan_in_fan_out: fields.take_bool("fan_in_fan_out", false)?,
        bias: TrainedBiases::take(fields, BIAS_ONLY)?,
        init_weights: fields.take_bool("init_weights", true)?,
        coft: fields.take_bool("coft", false)?,
        eps,
        block_share: fields.take_bool("block_share", false)?,
        use_cayley_neumann: fields.take_bool("use_cayley_neumann", true)?,
        num_cayley_neumann_terms: terms,
    }))
}

impl MethodConfig for OftConfig {
    fn peft_type(&self) -> &'static str {
        PEFT_TYPE
    }

    fn to_json_fields(&self) -> Map<String, Value> {
        let mut out = Map::new();
        self.targets.write_fields(&mut out, true);
        out.insert("r".into(), Value::from(self.r));
        out.insert("oft_block_size".into(), Value::from(self.oft_block_size));
        out.insert("module_dropout".into(), Value::from(self.module_dropout));
        out.insert("fan_in_fan_out".into(), Value::Bool(self.fan_in_fan_out));
        out.insert("bias".into(), Value::from(self.bias.as_str(BIAS_ONLY)));
        out.insert("init_weights".into(), Value::Bool(self.init_weights));
        out.insert("coft".into(), Value::Bool(self.coft));
        out.insert("eps".into(), Value::from(self.eps));
        out.insert("block_share".into(), Value::Bool(self.block_share));
        out.insert(
            "use_cayley_neumann".into(),
            Value::Bool(self.use_cayley_neumann),
        );
        out.insert(
            "num_cayley_neumann_terms".into(),
            Value::from(self.num_cayley_neumann_terms),
        );
        out
    }

    peft_core::layer_method_casts!();
}

/// The rotations of one layer (peft's `OFTRotationModule`).
#[derive(Debug)]
pub struct Rotation {
    /// `oft_R.weight` (or `oft_embedding_R.weight`), `[blocks or 1, b(b-1)/2]`.
    weight: Tensor,
    /// The number of blocks the input splits into.
    blocks: usize,
    block_size: usize,
    coft: bool,
    eps: f64,
    neumann_terms: Option<usize>,
    /// The fixed 0/1 matrix `[b(b-1)/2, b·b]` scattering an upper triangle (row-major, as
    /// `torch.triu_indices(b, b, 1)`) into a flattened `b × b` matrix.
    triu: Tensor,
}

impl Rotation {
    /// Builds (or loads) the rotation parameters of a layer `width` features wide, named `name`
    /// under `params`.
    pub fn new(
        config: &OftConfig,
        params: &ParamBuilder,
        name: &str,
        width: usize,
    ) -> Result<Self> {
        let (blocks, block_size) = config.blocks_for(width);
        let rows = if config.block_share { 1 } else { blocks };
        let n = block_size * (block_size - 1) / 2;
        let init = if config.init_weights {
            Init::Zeros
        } else {
            Init::Normal {
                mean: 0.0,
                std: 0.1,
            }
        };
        let b = block_size;
        let mut triu = vec![0f32; n * b * b];
        let mut k = 0;
        for i in 0..b {
            for j in i + 1..b {
                triu[k * b * b + i * b + j] = 1.0;
                k += 1;
            }
        }
        Ok(Rotation {
            triu: Tensor::from_vec(triu, (n, b * b), params.device())?,
            weight: params.pp(name).get(&[rows, n], "weight", init)?,
            blocks,
            block_size,
            coft: config.coft,
            eps: config.eps,
            neumann_terms: config
                .use_cayley_neumann
                .then_some(config.num_cayley_neumann_terms),
        })
    }

    /// `[rows, b, b]` skew-symmetric matrices from their upper triangles `vec` `[rows, n]`.
    fn skew(&self, vec: &Tensor) -> Result<Tensor> {
        let (b, rows) = (self.block_size, vec.dim(0)?);
        // upper[rows, b*b] = vec[rows, n] · triu[n, b*b].
        let upper = vec.matmul(&self.triu)?.reshape((rows, b, b))?;
        Ok((&upper - upper.transpose(1, 2)?)?)
    }

    /// peft's `_project_batch` (COFT) applied to the parameter in place: a block whose skew
    /// matrix has Frobenius norm above `eps / √rows` is scaled back onto that radius.
    fn project_in_place(&self) -> Result<()> {
        let w = self.weight.to_dtype(DType::F32)?.detach();
        let rows = w.dim(0)?;
        let eps = self.eps / (rows as f64).sqrt();
        // |skew(v)|_F = √2 |v|.
        let norms: Vec<f32> = (w.sqr()?.sum(1)? * 2.0)?.sqrt()?.to_vec1()?;
        let scale: Vec<f32> = norms
            .iter()
            .map(|&n| {
                if (n as f64) <= eps {
                    1.0
                } else {
                    (eps / n as f64) as f32
                }
            })
            .collect();
        let scale = Tensor::from_vec(scale, (rows, 1), w.device())?;
        let projected = w.broadcast_mul(&scale)?.to_dtype(self.weight.dtype())?;
        self.weight.slice_set(&projected, 0, 0)?;
        Ok(())
    }

    /// The orthogonal blocks `[rows, b, b]`, f32.
    fn rotations(&self) -> Result<Tensor> {
        if self.coft {
            self.project_in_place()?;
        }
        let q = self.skew(&self.weight.to_dtype(DType::F32)?)?;
        let (rows, b) = (q.dim(0)?, self.block_size);
        let eye = Tensor::eye(b, DType::F32, q.device())?
            .unsqueeze(0)?
            .broadcast_as((rows, b, b))?
            .contiguous()?;
        match self.neumann_terms {
            Some(terms) => neumann(&eye, &q, terms),
            None => cayley_exact(&eye, &q),
        }
    }

    /// `x R_bd` (or `x R_bdᵀ` with `transposed`) for `x` `[n, blocks·b]` f32.
    fn rotate(&self, x: &Tensor, transposed: bool) -> Result<Tensor> {
        let r = self.rotations()?;
        let r = if transposed {
            r.transpose(1, 2)?.contiguous()?
        } else {
            r
        };
        let n = x.dim(0)?;
        let b = self.block_size;
        if r.dim(0)? == 1 {
            // One rotation for every block: rotate all blocks of all rows in one product.
            let r0 = r.squeeze(0)?;
            return Ok(x
                .reshape((n * self.blocks, b))?
                .matmul(&r0)?
                .reshape((n, self.blocks * b))?);
        }
        // [n, blocks, b] -> [blocks, n, b] x [blocks, b, b] -> [n, blocks, b].
        let xb = x
            .reshape((n, self.blocks, b))?
            .transpose(0, 1)?
            .contiguous()?;
        let y = xb.matmul(&r)?.transpose(0, 1)?.contiguous()?;
        Ok(y.reshape((n, self.blocks * b))?)
    }

    /// `t R_bd` along the last dimension, in `t`'s dtype.
    fn rotate_last(&self, t: &Tensor) -> Result<Tensor> {
        map_rows(t, self.blocks * self.block_size, t.dtype(), |x| {
            self.rotate(&x, false)
        })
    }
}

/// peft's `_cayley_batch` with the Neumann series: `I + 2Q + 2Q² + … + 2Q^{n-2} + Q^{n-1}` for
/// `n` terms (exactly as peft sums it, so 3 and 4 terms agree).
fn neumann(eye: &Tensor, q: &Tensor, terms: usize) -> Result<Tensor> {
    let mut r = eye.clone();
    if terms > 1 {
        r = (r + (q * 2.0)?)?;
        if terms > 2 {
            let q2 = q.matmul(q)?;
            r = (r + (&q2 * 2.0)?)?;
            let mut power = q2;
            for _ in 3..terms.saturating_sub(1) {
                power = power.matmul(q)?;
                r = (r + (&power * 2.0)?)?;
            }
            power = power.matmul(q)?;
            r = (r + power)?;
        }
    }
    Ok(r)
}

/// The exact Cayley transform `X = (I - Q)(I + Q)⁻¹` (peft's `solve(I + Q, I - Q, left=False)`):
/// `Xᵀ = (I - Q)⁻¹ (I + Q)` (as `Qᵀ = -Q`), by Gauss–Jordan elimination of `[I - Q | I + Q]`,
/// differentiable. `I - Q` has symmetric part `I`, so every pivot is positive.
fn cayley_exact(eye: &Tensor, q: &Tensor) -> Result<Tensor> {
    let b = q.dim(1)?;
    let mut m = Tensor::cat(&[(eye - q)?, (eye + q)?], 2)?;
    for j in 0..b {
        let pivot_row = m.narrow(1, j, 1)?; // [rows, 1, 2b]
        let pivot = pivot_row.narrow(2, j, 1)?; // [rows, 1, 1]
        let p = pivot_row.broadcast_div(&pivot)?;
        let col = m.narrow(2, j, 1)?; // [rows, b, 1]
        let unit = eye.narrow(2, j, 1)?; // [rows, b, 1]
        m = (&m - (col - unit)?.broadcast_mul(&p)?)?;
    }
    Ok(m.narrow(2, b, b)?.transpose(1, 2)?.contiguous()?)
}

impl LinearAdapter for Rotation {
    fn adapt_input(&self, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.rotate_last(x)?))
    }

    /// `W R_bdᵀ`, peft's `(R_bd Wᵀ)ᵀ` (the bias unchanged).
    fn merge(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        _base_weight: &Tensor,
    ) -> Result<(Tensor, Option<Tensor>)> {
        Ok((self.rotate(weight, true)?, bias.cloned()))
    }
}

impl EmbeddingAdapter for Rotation {
    fn adapt_output(
        &self,
        _base: &dyn EmbeddingLike,
        _ids: &Tensor,
        y: Tensor,
        _training: bool,
    ) -> Result<Tensor> {
        self.rotate_last(&y)
    }

    /// `E R_bd`.
    fn merge(&self, weight: &Tensor, _base_weight: &Tensor) -> Result<Tensor> {
        self.rotate(weight, false)
    }
}

impl LayerMethod for OftConfig {
    fn target_spec(&self) -> &TargetSpec {
        &self.targets
    }

    fn target_spec_mut(&mut self) -> &mut TargetSpec {
        &mut self.targets
    }

    /// peft's OFT mapping is a copy of LoRA's.
    fn default_target_modules(&self, model_type: &str) -> Option<TargetModules> {
        peft_core::low_rank::default_targets(model_type)
    }

    /// peft sets `fan_in_fan_out` back to `false` on a linear layer.
    fn observe_weight_layout(&mut self, transposed: bool) {
        if !transposed {
            self.fan_in_fan_out = false;
        }
    }

    fn trained_biases(&self) -> TrainedBiases {
        self.bias
    }

    fn tuner_class_name(&self) -> String {
        "OFTModel".into()
    }

    fn layer_class_name(&self, embedding: bool) -> String {
        format!("oft.{}", if embedding { "Embedding" } else { "Linear" })
    }

    fn wrap_linear(
        &self,
        path: &str,
        base: &dyn LinearLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn LinearAdapter>> {
        require_linear_layout(path, base, PEFT_TYPE)?;
        Ok(Box::new(Rotation::new(
            self,
            params,
            "oft_R",
            base.in_features(),
        )?))
    }

    fn wrap_embedding(
        &self,
        _path: &str,
        base: &dyn EmbeddingLike,
        params: &ParamBuilder,
    ) -> Result<Box<dyn EmbeddingAdapter>> {
        Ok(Box::new(Rotation::new(
            self,
            params,
            "oft_embedding_R",
            base.embedding_dim(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use peft_core::ParamStore;

    fn rotation(config: &OftConfig, width: usize) -> Rotation {
        let store = ParamStore::new(7, &Device::Cpu, "");
        Rotation::new(config, &store.root(), "oft_R", width).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    /// peft's `adjust_oft_parameters` on a few widths.
    #[test]
    fn block_sizes_adjust_to_divisors_as_peft() {
        assert_eq!(adjust(64, 32), 32);
        assert_eq!(adjust(96, 40), 32); // 32 is 8 away, 48 is 8 away: the lower wins
        assert_eq!(adjust(100, 30), 25);
        assert_eq!(adjust(10, 32), 10);
        assert_eq!(adjust(7, 3), 1);
        let c = OftConfig::with_block_size(40);
        assert_eq!(c.blocks_for(96), (3, 32));
        let c = OftConfig {
            r: 5,
            oft_block_size: 0,
            ..OftConfig::default()
        };
        assert_eq!(c.blocks_for(64), (4, 16));
    }

    /// The exact Cayley transform is orthogonal and inverts `I + Q` correctly; the Neumann
    /// series approaches it for a small `Q`.
    #[test]
    fn cayley_transforms_are_orthogonal() {
        let exact = OftConfig {
            init_weights: false,
            use_cayley_neumann: false,
            ..OftConfig::with_block_size(4)
        };
        let rot = rotation(&exact, 8);
        let r = rot.rotations().unwrap();
        let rt = r.transpose(1, 2).unwrap();
        let eye = Tensor::eye(4, DType::F32, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap()
            .broadcast_as((2, 4, 4))
            .unwrap()
            .contiguous()
            .unwrap();
        assert!(max_diff(&r.matmul(&rt).unwrap(), &eye) < 1e-5);
        // X (I + Q) = I - Q.
        let q = rot.skew(&rot.weight).unwrap();
        let lhs = r.matmul(&(&eye + &q).unwrap()).unwrap();
        assert!(max_diff(&lhs, &(&eye - &q).unwrap()) < 1e-5);
        let series = neumann(&eye, &(&q * 0.01).unwrap(), 12).unwrap();
        let exact_small = cayley_exact(&eye, &(&q * 0.01).unwrap()).unwrap();
        // The series is of (I + Q)(I - Q)⁻¹ = X⁻¹ = Xᵀ.
        let exact_small_t = exact_small.transpose(1, 2).unwrap();
        assert!(max_diff(&series, &exact_small_t) < 1e-5);
    }

    /// COFT leaves a small block alone and scales a large one onto the radius.
    #[test]
    fn coft_projects_onto_the_eps_ball() {
        let c = OftConfig {
            init_weights: false,
            coft: true,
            eps: 1e-3,
            ..OftConfig::with_block_size(4)
        };
        let rot = rotation(&c, 8);
        rot.project_in_place().unwrap();
        let norms: Vec<f32> = (rot.weight.sqr().unwrap().sum(1).unwrap() * 2.0)
            .unwrap()
            .sqrt()
            .unwrap()
            .to_vec1()
            .unwrap();
        let radius = 1e-3 / 2f32.sqrt();
        for n in norms {
            assert!((n - radius).abs() < 1e-7, "{n} vs {radius}");
        }
    }
}
