//! The f32 matrix product's rate (GFLOP/s) at the side-by-side job's shapes, the `gemm` crate
//! (what candle's CPU matmul runs) against this project's `sgemm` (what the frozen layers, the
//! fused attention and the fused head run), for `x W^T` (a `[out, in]` weight, the forward) and
//! `x W` (the input gradient), and `sgemm` with the weight kept in bf16:
//! `cargo run --release -p peft-benches --example gemm_probe` (threads: RAYON_NUM_THREADS).
//! The two alternate `ROUNDS` (5) times per shape and the medians are printed: this VM's speed
//! drifts 10-30% between seconds.
#![allow(clippy::unwrap_used)]
#[cfg(target_arch = "x86_64")]
use std::time::Instant;

#[cfg(target_arch = "x86_64")]
use half::bf16;
#[cfg(target_arch = "x86_64")]
use peft::kernels::sgemm::{sgemm, Operand, Rhs};

#[cfg(not(target_arch = "x86_64"))]
fn main() {
    eprintln!("gemm_probe: sgemm exists on x86-64 only");
}

#[cfg(target_arch = "x86_64")]
fn secs(mut f: impl FnMut()) -> f64 {
    f();
    let s = Instant::now();
    f();
    f();
    s.elapsed().as_secs_f64() / 2.0
}

#[cfg(target_arch = "x86_64")]
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[cfg(target_arch = "x86_64")]
fn main() {
    assert!(
        peft::kernels::sgemm::available(),
        "sgemm needs AVX2 and FMA (and PEFT_GEMM_CRATE unset)"
    );
    let threads = rayon::current_num_threads();
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    println!(
        "threads {threads}; GFLOP/s, median of {rounds}: gemm crate / sgemm / sgemm bf16 weight"
    );
    for (m, k, n) in [
        (1024, 768, 768),
        (1024, 768, 2048),
        (1024, 2048, 768),
        (1024, 768, 32000),
        (256, 768, 768),
        (256, 768, 2048),
        (256, 2048, 768),
        (256, 768, 32000),
        (256, 32000, 768),
    ] {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104_729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let w16: Vec<bf16> = w.iter().map(|&x| bf16::from_f32(x)).collect();
        let mut dst = vec![0f32; m * n];
        let gflop = 2.0 * (m * k * n) as f64 / 1e9;
        let mut line = format!("{m:>5} x {k:>5} x {n:>5}");
        // (row, column) strides of the right-hand matrix: W^T of an [n, k] W, or a [k, n] W.
        for (name, (rs, cs)) in [("x W^T", (1, k)), ("x W", (n, 1))] {
            let (mut crate_s, mut ours, mut ours16) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..rounds {
                crate_s.push(secs(|| unsafe {
                    gemm::gemm(
                        m,
                        n,
                        k,
                        dst.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        a.as_ptr(),
                        1,
                        k as isize,
                        w.as_ptr(),
                        cs as isize,
                        rs as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        if threads > 1 {
                            gemm::Parallelism::Rayon(threads)
                        } else {
                            gemm::Parallelism::None
                        },
                    );
                }));
                let x = Operand {
                    ptr: a.as_ptr(),
                    rs: k,
                    cs: 1,
                };
                ours.push(secs(|| unsafe {
                    sgemm(
                        (m, n, k),
                        dst.as_mut_ptr(),
                        n,
                        false,
                        x,
                        Rhs::F32(Operand {
                            ptr: w.as_ptr(),
                            rs,
                            cs,
                        }),
                        1.0,
                        threads,
                    )
                }));
                ours16.push(secs(|| unsafe {
                    sgemm(
                        (m, n, k),
                        dst.as_mut_ptr(),
                        n,
                        false,
                        x,
                        Rhs::Bf16 {
                            ptr: w16.as_ptr(),
                            rs,
                            cs,
                        },
                        1.0,
                        threads,
                    )
                }));
            }
            line += &format!(
                "   {name}: {:5.1} / {:5.1} / {:5.1}",
                gflop / median(crate_s),
                gflop / median(ours),
                gflop / median(ours16)
            );
        }
        println!("{line}");
    }
}
