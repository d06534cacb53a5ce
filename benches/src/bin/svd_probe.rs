//! How long adapter arithmetic's SVDs take at real layer sizes (`cargo run --release -p
//! peft-benches --bin svd_probe`): the leading triplets of a dense pruned delta (what the
//! `*_svd` combinations need: rank-16 signal + pruning noise, rank 8 kept) by subspace
//! iteration and by the full Jacobi SVD (up to 1536 wide), and the factored SVD of plain `svd`
//! (two rank-8 adapters: k = 16).

use std::time::Instant;

use peft::linalg::{svd, svd_of_product, svd_top, Matrix};

fn random(rows: usize, cols: usize, seed: u64) -> Matrix {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let data = (0..rows * cols)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect();
    Matrix::from_vec(rows, cols, data)
}

fn main() {
    for (m, n) in [(576, 576), (1536, 576), (2048, 2048), (4096, 4096)] {
        let signal = random(m, 16, 4).matmul(&random(16, n, 5));
        let noise = random(m, n, 1);
        let a = Matrix::from_vec(
            m,
            n,
            signal
                .data
                .iter()
                .zip(&noise.data)
                .map(|(s, e)| s + 0.1 * e)
                .collect(),
        );
        let t = Instant::now();
        let top = svd_top(&a, 8);
        println!(
            "leading 8 of {m} x {n}: {:.2} s (s_1 {:.6}, s_8 {:.6})",
            t.elapsed().as_secs_f64(),
            top.s[0],
            top.s[7]
        );
        if n <= 1536 {
            let t = Instant::now();
            let s = svd(&a);
            println!(
                "full jacobi svd {m} x {n}: {:.2} s (s_1 {:.6}, s_8 {:.6})",
                t.elapsed().as_secs_f64(),
                s.s[0],
                s.s[7]
            );
        }
        let (b, f) = (random(m, 16, 2), random(16, n, 3));
        let t = Instant::now();
        let s = svd_of_product(&b, &f);
        println!(
            "factored svd {m} x 16 @ 16 x {n}: {:.4} s ({} values)",
            t.elapsed().as_secs_f64(),
            s.s.len()
        );
    }
}
