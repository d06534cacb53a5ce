//! Measures the f32 matmul rate (GFLOP/s) of candle's CPU gemm at the side-by-side job's
//! shapes: `cargo run --release -p peft-benches --example gemm_probe` (threads: RAYON_NUM_THREADS).
#![allow(clippy::unwrap_used)]
use std::time::Instant;
use candle_core::{Device, Tensor};

fn main() {
    let dev = Device::Cpu;
    for (m, k, n) in [
        (1024, 768, 768), (1024, 768, 2048), (1024, 2048, 768), (1024, 768, 32000), (1024, 32000, 768),
        (256, 768, 768), (256, 768, 2048), (256, 2048, 768), (256, 768, 32000),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let bt = b.t().unwrap();
        for _ in 0..3 {
            a.matmul(&bt).unwrap();
        }
        let runs = 5;
        let s = Instant::now();
        for _ in 0..runs {
            a.matmul(&bt).unwrap();
        }
        let dt = s.elapsed().as_secs_f64() / runs as f64;
        println!("{m} {k} {n} {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
        // The same product split by columns across threads, one single-threaded gemm each.
        let av = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let bv = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut out = vec![0f32; m * n];
        for parts in [2usize, 4, 8] {
            let run = |out: &mut Vec<f32>| {
                let cols = n.div_ceil(parts);
                let ptr = out.as_mut_ptr() as usize;
                use rayon::prelude::*;
                (0..parts).into_par_iter().for_each(|p| {
                    let c0 = p * cols;
                    let c1 = ((p + 1) * cols).min(n);
                    if c0 >= c1 { return; }
                    unsafe {
                        peft::layers::gemm_f32((m, c1 - c0, k), (ptr as *mut f32).add(c0), n, false, av.as_ptr(), (k, 1), bv.as_ptr().add(c0 * k), (1, k), 1.0, false);
                    }
                });
            };
            for _ in 0..3 { run(&mut out); }
            let s = Instant::now();
            for _ in 0..runs { run(&mut out); }
            let dt = s.elapsed().as_secs_f64() / runs as f64;
            println!("   split {parts}: {:.1} GFLOP/s", 2.0 * (m * k * n) as f64 / dt / 1e9);
        }
    }
}
