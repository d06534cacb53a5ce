//! Small dense linear algebra on the host, in f64: the truncated singular value decomposition
//! that adapter arithmetic needs (peft's `torch.linalg.svd` in `add_weighted_adapter`).
//!
//! [`svd`] is a one-sided Jacobi SVD (Hestenes): it orthogonalises the columns of the matrix
//! (of its transpose when that is narrower) by plane rotations until every pair is orthogonal
//! to machine precision, so the singular values and vectors are accurate to ~1e-15 relative,
//! at `O(sweeps · m · n²)` cost. The rotations of one round of a round-robin ordering touch
//! disjoint columns and run in parallel. [`svd_of_product`] decomposes `B @ A` for thin
//! factors without forming the product: QR of both factors, then the small core, which is
//! exact and costs `O((m + n) k²)`.
//!
//! Singular vectors are defined up to sign (and up to rotation within repeated singular values),
//! so two libraries agree on `U diag(S) Vᵀ` and on `S`, not on the factors themselves.

use rayon::prelude::*;

/// A row-major dense matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub cols: usize,
    /// `rows * cols` values, row after row.
    pub data: Vec<f64>,
}

impl Matrix {
    /// A matrix of zeros.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// Wraps row-major values; `data.len()` must be `rows * cols`.
    pub fn from_vec(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(data.len(), rows * cols, "matrix data length");
        Matrix { rows, cols, data }
    }

    /// Element `(i, j)`.
    pub fn at(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// The transpose.
    pub fn t(&self) -> Matrix {
        let mut out = Matrix::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                out.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        out
    }

    /// `self @ other`.
    pub fn matmul(&self, other: &Matrix) -> Matrix {
        assert_eq!(self.cols, other.rows, "matmul inner dimensions");
        let mut out = Matrix::zeros(self.rows, other.cols);
        out.data
            .par_chunks_mut(other.cols.max(1))
            .enumerate()
            .for_each(|(i, row)| {
                for k in 0..self.cols {
                    let a = self.data[i * self.cols + k];
                    if a == 0.0 {
                        continue;
                    }
                    let b = &other.data[k * other.cols..(k + 1) * other.cols];
                    for (o, b) in row.iter_mut().zip(b) {
                        *o += a * b;
                    }
                }
            });
        out
    }

    fn column(&self, j: usize) -> Vec<f64> {
        (0..self.rows).map(|i| self.at(i, j)).collect()
    }

    fn from_columns(rows: usize, columns: &[Vec<f64>]) -> Matrix {
        let mut out = Matrix::zeros(rows, columns.len());
        for (j, c) in columns.iter().enumerate() {
            for (i, v) in c.iter().enumerate() {
                out.data[i * columns.len() + j] = *v;
            }
        }
        out
    }
}

/// A thin singular value decomposition `M = U diag(s) Vt`, singular values descending.
#[derive(Debug, Clone)]
pub struct Svd {
    /// `[m, k]` left singular vectors (orthonormal columns, or zero columns for zero `s`).
    pub u: Matrix,
    /// `k = min(m, n)` singular values, descending.
    pub s: Vec<f64>,
    /// `[k, n]` right singular vectors as rows.
    pub vt: Matrix,
}

impl Svd {
    /// Keeps the first `rank` triplets (all of them if there are fewer) and returns
    /// `(U_r diag(s_r), Vt_r)`: the `[m, r]` and `[r, n]` factors of the best rank-`r`
    /// approximation, as peft's `U @ torch.diag(S)` and `Vh`.
    pub fn truncated_factors(&self, rank: usize) -> (Matrix, Matrix) {
        let r = rank.min(self.s.len());
        let (m, n) = (self.u.rows, self.vt.cols);
        let mut us = Matrix::zeros(m, r);
        for i in 0..m {
            for j in 0..r {
                us.data[i * r + j] = self.u.at(i, j) * self.s[j];
            }
        }
        let vt = Matrix::from_vec(r, n, self.vt.data[..r * n].to_vec());
        (us, vt)
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Rotates columns `(p, q)` of the working matrix (and of `V`) so that they become orthogonal;
/// returns whether a rotation was needed.
fn rotate(p: &mut [f64], q: &mut [f64], vp: &mut [f64], vq: &mut [f64]) -> bool {
    let alpha = dot(p, p);
    let beta = dot(q, q);
    let gamma = dot(p, q);
    // Orthogonal to working precision (a tolerance of a few ulps, or sweeps may never end).
    if gamma == 0.0 || gamma.abs() <= 4.0 * f64::EPSILON * (alpha * beta).sqrt() {
        return false;
    }
    let zeta = (beta - alpha) / (2.0 * gamma);
    // The smaller root of t^2 + 2 zeta t - 1 = 0 (zeta = 0 gives t = 1: signum(0.0) is 1).
    let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
    let c = 1.0 / (1.0 + t * t).sqrt();
    let s = c * t;
    for (x, y) in p.iter_mut().zip(q.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
    for (x, y) in vp.iter_mut().zip(vq.iter_mut()) {
        let (a, b) = (*x, *y);
        *x = c * a - s * b;
        *y = s * a + c * b;
    }
    true
}

/// The round-robin pairs of round `round` over `n` (even) slots: every pair of slots meets in
/// exactly one of `n - 1` rounds, and the pairs of a round are disjoint.
fn round_pairs(n: usize, round: usize) -> Vec<(usize, usize)> {
    let slot = |k: usize| -> usize {
        if k == 0 {
            0
        } else {
            1 + (k - 1 + round) % (n - 1)
        }
    };
    (0..n / 2).map(|k| (slot(k), slot(n - 1 - k))).collect()
}

/// Two columns of a round (their indices, the working columns, `V`'s columns), taken out of
/// the matrix so that the pairs of a round rotate in parallel.
type PairWork = (usize, usize, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>);

/// One-sided Jacobi on the columns of `[m, n]` with `n <= m`: returns the orthogonalised
/// columns (`U diag(s)`) and `V`'s columns.
fn jacobi_columns(m: &Matrix) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let n = m.cols;
    let mut cols: Vec<Vec<f64>> = (0..n).map(|j| m.column(j)).collect();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            e
        })
        .collect();
    if n < 2 {
        return (cols, v);
    }
    // An odd count gets an empty dummy slot.
    let slots = n + n % 2;
    for _sweep in 0..80 {
        let mut rotated = false;
        for round in 0..slots - 1 {
            let pairs: Vec<(usize, usize)> = round_pairs(slots, round)
                .into_iter()
                .filter(|&(a, b)| a < n && b < n)
                .map(|(a, b)| (a.min(b), a.max(b)))
                .collect();
            let mut work: Vec<PairWork> = pairs
                .iter()
                .map(|&(a, b)| {
                    (
                        a,
                        b,
                        std::mem::take(&mut cols[a]),
                        std::mem::take(&mut cols[b]),
                        std::mem::take(&mut v[a]),
                        std::mem::take(&mut v[b]),
                    )
                })
                .collect();
            let any = work
                .par_iter_mut()
                .map(|(_, _, p, q, vp, vq)| rotate(p, q, vp, vq))
                .reduce(|| false, |x, y| x || y);
            rotated |= any;
            for (a, b, p, q, vp, vq) in work {
                cols[a] = p;
                cols[b] = q;
                v[a] = vp;
                v[b] = vq;
            }
        }
        if !rotated {
            break;
        }
    }
    (cols, v)
}

/// The thin SVD of `m` (`[rows, cols]`), singular values descending.
pub fn svd(m: &Matrix) -> Svd {
    if m.cols > m.rows {
        // M^T = V S U^T.
        let t = svd(&m.t());
        return Svd {
            u: t.vt.t(),
            s: t.s,
            vt: t.u.t(),
        };
    }
    let (cols, v) = jacobi_columns(m);
    let norms: Vec<f64> = cols.iter().map(|c| dot(c, c).sqrt()).collect();
    let mut order: Vec<usize> = (0..cols.len()).collect();
    order.sort_by(|&a, &b| norms[b].total_cmp(&norms[a]).then(a.cmp(&b)));
    let u_cols: Vec<Vec<f64>> = order
        .iter()
        .map(|&j| {
            let s = norms[j];
            if s > 0.0 {
                cols[j].iter().map(|x| x / s).collect()
            } else {
                vec![0.0; m.rows]
            }
        })
        .collect();
    let v_cols: Vec<Vec<f64>> = order.iter().map(|&j| v[j].clone()).collect();
    Svd {
        u: Matrix::from_columns(m.rows, &u_cols),
        s: order.iter().map(|&j| norms[j]).collect(),
        vt: Matrix::from_columns(m.cols, &v_cols).t(),
    }
}

/// Thin QR of `[m, k]` (`k <= m`) by modified Gram-Schmidt, run twice for orthogonality:
/// `(Q [m, k], R [k, k])` with `M = Q R`. A column dependent on the earlier ones gets a zero
/// column in `Q` and a zero row in `R`, so the product still holds exactly.
pub fn thin_qr(m: &Matrix) -> (Matrix, Matrix) {
    let k = m.cols;
    let mut q: Vec<Vec<f64>> = (0..k).map(|j| m.column(j)).collect();
    let mut r = Matrix::zeros(k, k);
    let scale = q
        .iter()
        .map(|c| dot(c, c).sqrt())
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    for j in 0..k {
        for _pass in 0..2 {
            for i in 0..j {
                let proj = dot(&q[i], &q[j]);
                let (head, tail) = q.split_at_mut(j);
                for (x, y) in tail[0].iter_mut().zip(&head[i]) {
                    *x -= proj * y;
                }
                r.data[i * k + j] += proj;
            }
        }
        let norm = dot(&q[j], &q[j]).sqrt();
        if norm <= 1e-13 * scale {
            q[j].iter_mut().for_each(|x| *x = 0.0);
            // The remainder is noise: the column is (numerically) in the span of earlier ones.
        } else {
            q[j].iter_mut().for_each(|x| *x /= norm);
            r.data[j * k + j] = norm;
        }
    }
    (Matrix::from_columns(m.rows, &q), r)
}

/// The SVD of `b @ a` (`b: [m, k]`, `a: [k, n]`) without forming the `[m, n]` product when
/// `k` is smaller than both sides: `b = Q1 R1`, `aᵀ = Q2 R2`, so `b a = Q1 (R1 R2ᵀ) Q2ᵀ` and the
/// SVD of the `[k, k]` core gives the rest. Returns at most `k` triplets.
pub fn svd_of_product(b: &Matrix, a: &Matrix) -> Svd {
    assert_eq!(b.cols, a.rows, "factor inner dimensions");
    let k = b.cols;
    if k >= b.rows || k >= a.cols {
        return svd(&b.matmul(a));
    }
    let (q1, r1) = thin_qr(b);
    let (q2, r2) = thin_qr(&a.t());
    let core = svd(&r1.matmul(&r2.t()));
    Svd {
        u: q1.matmul(&core.u),
        s: core.s,
        vt: core.vt.matmul(&q2.t()),
    }
}

/// The `rank` leading singular triplets of `m`, for a truncation: block subspace iteration
/// (with Rayleigh-Ritz on an oversampled block) run until every kept triplet's residuals
/// `||M v - s u||` and `||Mᵀ u - s v||` are below `1e-12 · s_1`, which makes the kept values
/// and the truncated product accurate to about that (relative to the gap at the cut); the
/// full Jacobi [`svd`] when the block would not be much narrower than the matrix, or when the
/// iteration does not converge. Costs `O(m n p)` per iteration, `p ≈ 2 rank + 10`, instead of
/// the full SVD's `O(sweeps · m n²)` (a 2048 x 2048 delta: well under a second, not minutes).
pub fn svd_top(m: &Matrix, rank: usize) -> Svd {
    let small = m.rows.min(m.cols);
    let p = (2 * rank + 10).min(small);
    if rank == 0 || 2 * p >= small {
        return svd(m);
    }
    let mt = m.t();
    // A fixed pseudo-random start (xorshift), so results are reproducible.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let omega = Matrix::from_vec(
        m.cols,
        p,
        (0..m.cols * p)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect(),
    );
    let (mut q, _) = thin_qr(&m.matmul(&omega));
    for _iteration in 0..300 {
        // Rayleigh-Ritz: M ≈ Q (Qᵀ M), and the SVD of the small [p, n] block.
        let block = q.t().matmul(m);
        let small_svd = svd(&block);
        let u = q.matmul(&small_svd.u);
        let s1 = small_svd.s.first().copied().unwrap_or(0.0);
        if s1 == 0.0 {
            return Svd {
                u,
                s: small_svd.s,
                vt: small_svd.vt,
            };
        }
        let kept = rank.min(small_svd.s.len());
        let v = small_svd.vt.t();
        let mv = m.matmul(&v);
        let mtu = mt.matmul(&u);
        let mut worst = 0.0f64;
        for i in 0..kept {
            let s = small_svd.s[i];
            let r1: f64 = (0..m.rows)
                .map(|k| (mv.at(k, i) - s * u.at(k, i)).powi(2))
                .sum();
            let r2: f64 = (0..m.cols)
                .map(|k| (mtu.at(k, i) - s * v.at(k, i)).powi(2))
                .sum();
            worst = worst.max(r1.sqrt()).max(r2.sqrt());
        }
        if worst <= 1e-12 * s1 {
            return Svd {
                u,
                s: small_svd.s,
                vt: small_svd.vt,
            };
        }
        // One more power step: Q <- orth(M orth(Mᵀ Q)), reusing Mᵀ U (same span as Mᵀ Q).
        let (z, _) = thin_qr(&mtu);
        q = thin_qr(&m.matmul(&z)).0;
    }
    svd(m)
}

/// The first `rank` steps of a Householder QR of `m` (`[rows, cols]`, `rank <= min(rows,
/// cols)`): `(Q [rows, rank], R [rank, cols])`, the leading columns of `Q` and rows of `R` of
/// the full factorisation `M = Q R`, with LAPACK's sign convention (`geqrf`'s reflectors:
/// `R[k][k] = -sign(pivot) · ||column||`), so the factors equal `torch.linalg.qr`'s rather
/// than agreeing only up to sign (peft's OLoRA takes them as the adapter's factors).
pub fn householder_qr_leading(m: &Matrix, rank: usize) -> (Matrix, Matrix) {
    let (rows, cols) = (m.rows, m.cols);
    assert!(rank <= rows.min(cols), "QR rank above min(rows, cols)");
    let mut a = m.clone();
    // Reflector k: H = I - tau v vᵀ on rows k.., v[0] = 1.
    let mut reflectors: Vec<(f64, Vec<f64>)> = Vec::with_capacity(rank);
    for k in 0..rank {
        let alpha = a.at(k, k);
        let xnorm = ((k + 1)..rows)
            .map(|i| a.at(i, k).powi(2))
            .sum::<f64>()
            .sqrt();
        if xnorm == 0.0 {
            // dlarfg: H = I, the pivot stays as it is.
            reflectors.push((0.0, Vec::new()));
            continue;
        }
        // Fortran's SIGN(1, alpha): +1 for a zero pivot.
        let sign = if alpha < 0.0 { -1.0 } else { 1.0 };
        let beta = -sign * alpha.hypot(xnorm);
        let tau = (beta - alpha) / beta;
        let scale = 1.0 / (alpha - beta);
        let mut v = vec![1.0; rows - k];
        for i in (k + 1)..rows {
            v[i - k] = a.at(i, k) * scale;
        }
        a.data[k * cols + k] = beta;
        for i in (k + 1)..rows {
            a.data[i * cols + k] = 0.0;
        }
        for j in (k + 1)..cols {
            let w: f64 = (k..rows).map(|i| v[i - k] * a.at(i, j)).sum::<f64>() * tau;
            for i in k..rows {
                a.data[i * cols + j] -= w * v[i - k];
            }
        }
        reflectors.push((tau, v));
    }
    let mut r = Matrix::zeros(rank, cols);
    for i in 0..rank {
        for j in i..cols {
            r.data[i * cols + j] = a.at(i, j);
        }
    }
    // Q's leading columns: H_1 ... H_rank applied to the first `rank` unit vectors (dorg2r).
    let mut q = Matrix::zeros(rows, rank);
    for i in 0..rank {
        q.data[i * rank + i] = 1.0;
    }
    for (k, (tau, v)) in reflectors.iter().enumerate().rev() {
        if *tau == 0.0 {
            continue;
        }
        for j in 0..rank {
            let w: f64 = (k..rows).map(|i| v[i - k] * q.at(i, j)).sum::<f64>() * tau;
            for i in k..rows {
                q.data[i * rank + j] -= w * v[i - k];
            }
        }
    }
    (q, r)
}

/// `torch.svd_lowrank(m, q, niter)` (Halko et al.'s randomized SVD, algorithm 5, as torch
/// runs it): a Gaussian `[n, q]` sketch drawn from `normal`, `niter` power iterations with a
/// QR after each product, then the SVD of the projected `[q, ·]` block. The result is an
/// approximation whose quality depends on the spectrum and on `niter`, as in torch; with a
/// different random stream it is not torch's approximation, only one as good.
pub fn svd_lowrank(m: &Matrix, q: usize, niter: usize, mut normal: impl FnMut() -> f64) -> Svd {
    let q = q.min(m.rows).min(m.cols);
    let basis = |a: &Matrix, normal: &mut dyn FnMut() -> f64| -> Matrix {
        let at = a.t();
        let sketch = Matrix::from_vec(a.cols, q, (0..a.cols * q).map(|_| normal()).collect());
        let mut basis = thin_qr(&a.matmul(&sketch)).0;
        for _ in 0..niter {
            basis = thin_qr(&at.matmul(&basis)).0;
            basis = thin_qr(&a.matmul(&basis)).0;
        }
        basis
    };
    if m.rows < m.cols || m.cols > q {
        // Decompose through the transpose, as torch does: Q spans Mᵀ's range, M Q = U S Vhᵀ.
        let basis = basis(&m.t(), &mut normal);
        let small = svd(&m.matmul(&basis));
        Svd {
            u: small.u,
            s: small.s,
            vt: basis.matmul(&small.vt.t()).t(),
        }
    } else {
        let basis = basis(m, &mut normal);
        let small = svd(&basis.t().matmul(m));
        Svd {
            u: basis.matmul(&small.u),
            s: small.s,
            vt: small.vt,
        }
    }
}

/// `torch.quantile(values, q)` with its default linear interpolation (`q` in `[0, 1]`).
pub fn quantile(values: &[f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let pos = q * (sorted.len() - 1) as f64;
    let lo = pos.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    let frac = pos - lo as f64;
    sorted[lo] + (sorted[hi] - sorted[lo]) * frac
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        Matrix::from_vec(
            rows,
            cols,
            (0..rows * cols)
                .map(|_| rng.random::<f64>() * 2.0 - 1.0)
                .collect(),
        )
    }

    fn max_diff(a: &Matrix, b: &Matrix) -> f64 {
        a.data
            .iter()
            .zip(&b.data)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max)
    }

    fn reconstruct(s: &Svd) -> Matrix {
        let (us, vt) = s.truncated_factors(s.s.len());
        us.matmul(&vt)
    }

    fn assert_orthonormal_columns(m: &Matrix) {
        let g = m.t().matmul(m);
        for i in 0..g.rows {
            for j in 0..g.cols {
                let want = if i == j { 1.0 } else { 0.0 };
                assert!(
                    (g.at(i, j) - want).abs() < 1e-12,
                    "gram[{i},{j}] = {}",
                    g.at(i, j)
                );
            }
        }
    }

    #[test]
    fn jacobi_svd_reconstructs_tall_wide_and_odd_shapes() {
        for (m, n, seed) in [(7, 5, 1), (5, 9, 2), (6, 6, 3), (1, 4, 4), (13, 1, 5)] {
            let a = random(m, n, seed);
            let s = svd(&a);
            assert_eq!(s.s.len(), m.min(n));
            assert!(s.s.windows(2).all(|w| w[0] >= w[1]), "{:?}", s.s);
            assert!(max_diff(&reconstruct(&s), &a) < 1e-12);
            assert_orthonormal_columns(&s.u);
            assert_orthonormal_columns(&s.vt.t());
        }
    }

    #[test]
    fn householder_qr_factors_and_follows_lapacks_signs() {
        for (m, n, seed) in [(9, 6, 31), (5, 8, 32), (7, 7, 33)] {
            let a = random(m, n, seed);
            let k = m.min(n);
            let (q, r) = householder_qr_leading(&a, k);
            assert!(max_diff(&q.matmul(&r), &a) < 1e-12);
            assert_orthonormal_columns(&q);
            // geqrf: R's diagonal has the opposite sign of the pivot it replaced (the first
            // pivot is the matrix's own first element).
            assert_eq!(r.at(0, 0).signum(), -a.at(0, 0).signum());
            for i in 0..k {
                for j in 0..i {
                    assert_eq!(r.at(i, j), 0.0);
                }
            }
            // The leading steps are the leading rows and columns of the full factorisation.
            let (q2, r2) = householder_qr_leading(&a, 2);
            assert!(max_diff(&r2, &Matrix::from_vec(2, n, r.data[..2 * n].to_vec())) < 1e-13);
            let q_lead: Vec<f64> = (0..m).flat_map(|i| [q.at(i, 0), q.at(i, 1)]).collect();
            assert!(max_diff(&q2, &Matrix::from_vec(m, 2, q_lead)) < 1e-13);
        }
    }

    #[test]
    fn randomized_svd_recovers_a_low_rank_matrix() {
        // An exactly rank-3 matrix: the randomized SVD with q = 3 finds it (any sketch spans
        // the range), in both of torch's branches (tall and wide).
        let mut rng = rand::rngs::StdRng::seed_from_u64(41);
        for (m, n) in [(12, 8), (8, 12)] {
            let a = random(m, 3, 42).matmul(&random(3, n, 43));
            let s = svd_lowrank(&a, 3, 2, || rng.random::<f64>() - 0.5);
            assert_eq!(s.s.len(), 3);
            assert!(max_diff(&reconstruct(&s), &a) < 1e-10);
            let exact = svd(&a);
            for (x, y) in s.s.iter().zip(&exact.s) {
                assert!((x - y).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn truncation_is_the_best_low_rank_approximation() {
        // Eckart-Young: the error of the rank-r truncation in Frobenius norm is the norm of
        // the dropped singular values.
        let a = random(9, 7, 11);
        let s = svd(&a);
        let (us, vt) = s.truncated_factors(3);
        let approx = us.matmul(&vt);
        let err: f64 = a
            .data
            .iter()
            .zip(&approx.data)
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        let dropped: f64 = s.s[3..].iter().map(|x| x * x).sum();
        assert!((err - dropped).abs() < 1e-10, "{err} vs {dropped}");
    }

    #[test]
    fn product_svd_matches_the_dense_one_and_handles_rank_deficient_factors() {
        let b = random(20, 4, 21);
        let mut a = random(4, 15, 22);
        let dense = svd(&b.matmul(&a));
        let thin = svd_of_product(&b, &a);
        for (x, y) in thin.s.iter().zip(&dense.s) {
            assert!((x - y).abs() < 1e-12);
        }
        assert!(max_diff(&reconstruct(&thin), &b.matmul(&a)) < 1e-12);
        // A repeated row of `a` (and a zero factor) make the factors rank deficient.
        for j in 0..15 {
            a.data[15 + j] = a.data[j];
        }
        let thin = svd_of_product(&b, &a);
        assert!(max_diff(&reconstruct(&thin), &b.matmul(&a)) < 1e-12);
        let zero = Matrix::zeros(20, 4);
        assert!(svd_of_product(&zero, &a).s.iter().all(|s| *s == 0.0));
    }

    #[test]
    fn leading_triplets_match_the_full_svd_on_low_rank_plus_noise() {
        // A pruned sum of adapters: a rank-12 signal plus small dense noise.
        let (m, n) = (90, 70);
        let signal = random(m, 12, 31).matmul(&random(12, n, 32));
        let noise = random(m, n, 33);
        let a = Matrix::from_vec(
            m,
            n,
            signal
                .data
                .iter()
                .zip(&noise.data)
                .map(|(s, e)| s + 0.05 * e)
                .collect(),
        );
        let full = svd(&a);
        for rank in [4, 8, 12] {
            let top = svd_top(&a, rank);
            for i in 0..rank {
                assert!((top.s[i] - full.s[i]).abs() < 1e-10 * full.s[0], "s[{i}]");
            }
            let (us, vt) = top.truncated_factors(rank);
            let (fus, fvt) = full.truncated_factors(rank);
            assert!(
                max_diff(&us.matmul(&vt), &fus.matmul(&fvt)) < 1e-9,
                "rank {rank}"
            );
        }
        // A wide matrix and a zero one.
        let wide = a.t();
        let (us, vt) = svd_top(&wide, 6).truncated_factors(6);
        let (fus, fvt) = svd(&wide).truncated_factors(6);
        assert!(max_diff(&us.matmul(&vt), &fus.matmul(&fvt)) < 1e-9);
        assert!(svd_top(&Matrix::zeros(60, 50), 3)
            .s
            .iter()
            .all(|s| *s == 0.0));
    }

    #[test]
    fn quantile_interpolates_like_torch() {
        let v = [3.0, 1.0, 2.0, 4.0];
        assert_eq!(quantile(&v, 0.0), 1.0);
        assert_eq!(quantile(&v, 1.0), 4.0);
        assert!((quantile(&v, 0.5) - 2.5).abs() < 1e-15);
        assert!((quantile(&v, 0.9) - 3.7).abs() < 1e-12);
    }
}
