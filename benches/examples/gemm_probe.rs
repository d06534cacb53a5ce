//! Measures the f32 matmul rate (GFLOP/s) of candle's CPU gemm at the side-by-side job's
//! shapes: `cargo run --release -p peft-benches --example gemm_probe` (threads: RAYON_NUM_THREADS).
#![allow(clippy::unwrap_used)]
use std::time::Instant;
use candle_core::{Device, Tensor};

fn main() {
    let dev = Device::Cpu;
    for (m, k, n) in [(1024, 768, 768), (1024, 768, 2048), (1024, 2048, 768), (1024, 768, 32000), (1024, 32000, 768)] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let bt = b.t().unwrap();
        for _ in 0..3 {
            a.matmul(&bt).unwrap();
        }
        let runs = 10;
        let s = Instant::now();
        for _ in 0..runs {
            a.matmul(&bt).unwrap();
        }
        let dt = s.elapsed().as_secs_f64() / runs as f64;
        println!("{m} {k} {n} {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
    }
}
