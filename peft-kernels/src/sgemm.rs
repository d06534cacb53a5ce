//! An f32 matrix product for x86-64 CPUs with AVX2 and FMA, behind [`crate::gemm::gemm_f32`]
//! (the frozen base layers' products, forward and backward, LoRA's small products, the fused
//! attention, the fused output head and the quantized tiles) and [`crate::gemm::frozen_product`].
//!
//! The usual blocked scheme (Goto / BLIS): a `KC x NC` block of the right-hand matrix is packed
//! into 16-column panels, an `MC x KC` block of the left into 6-row slivers (scaled by `alpha` on
//! the way), and a 6 x 16 register-tile kernel (12 accumulators, two vector loads and six
//! broadcasts per step of `k`; 84-94 GFLOP/s a core on an AVX2 EPYC against a 97-100 FMA peak)
//! walks them. Where the CPU has AVX-512F, a 12 x 32 tile ([`kernel512`]: two slivers by two
//! panels of the same packs, 24 zmm accumulators) runs every full 12 x 32 block and the AVX2
//! kernel the edges (96-144 GFLOP/s a core on a 2-core AVX-512 Xeon, against the AVX2 kernel's
//! 60-72 there).
//! Threads split the output by columns or rows, each running the whole scheme on its part.
//!
//! What it adds over the `gemm` crate: a bf16 right-hand matrix is widened to f32 as its panels
//! are packed, so a frozen weight kept in bf16 is read in place, never copied to f32 (LoRA
//! steps with bf16-kept weights went from 4.3-5.4 s to 4.3-4.6 s on the side-by-side job, as fast
//! as f32 weights); and the thread split packs the smaller operand twice rather than always
//! the left one. On f32 at the job's shapes the two are within this VM's noise of each other
//! (the f32 step 4.2-4.9 s against 4.6-5.0 s with the `gemm` crate, alternating runs).

use std::arch::x86_64::*;

/// Rows of a register tile.
const MR: usize = 6;
/// Columns of a register tile (two 8-lane vectors).
const NR: usize = 16;
/// Depth of a packed block.
const KC: usize = 256;
/// Rows of a packed left block (a multiple of `MR`).
const MC: usize = 96;
/// Columns of a packed right block (a multiple of `NR`).
const NC: usize = 2048;

/// Whether the products here are used: the CPU has AVX2 and FMA, and the environment variable
/// `PEFT_GEMM_CRATE` is unset (set, it sends every product to the `gemm` crate, for comparing
/// the two). Checked once.
pub fn available() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| crate::cpu::has_avx2_fma() && std::env::var_os("PEFT_GEMM_CRATE").is_none())
}

/// Whether the 12 x 32 AVX-512 tile ([`kernel512`]) runs the full tiles: the CPU has AVX-512F and
/// `PEFT_SGEMM_AVX2` is unset (set, every tile takes the 6 x 16 AVX2 kernel, for comparing).
/// On a 2-core AVX-512 VM (Xeon, 2026-12-02) the AVX2 kernel ran the side-by-side job's shapes
/// at 60-72 GFLOP/s a core against the `gemm` crate's AVX-512 kernels' 96-134. Checked once.
fn wide() -> bool {
    use std::sync::OnceLock;
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        crate::cpu::features().avx512f && std::env::var_os("PEFT_SGEMM_AVX2").is_none()
    })
}

/// Rows and columns of the tiles a thread's share is made of (the thread split's units).
fn tile_units() -> (usize, usize) {
    if wide() {
        (2 * MR, 2 * NR)
    } else {
        (MR, NR)
    }
}

/// A strided f32 matrix operand: element `(i, j)` at `ptr + i * rs + j * cs`.
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    /// First element.
    pub ptr: *const f32,
    /// Row stride (elements).
    pub rs: usize,
    /// Column stride (elements).
    pub cs: usize,
}

/// The right-hand operand: f32, or bf16 widened to f32 while it is packed (frozen weights kept
/// in half the memory; the arithmetic stays f32).
#[derive(Clone, Copy, Debug)]
pub enum Rhs {
    /// f32 values.
    F32(Operand),
    /// bf16 values: element `(i, j)` at `ptr + i * rs + j * cs`.
    Bf16 {
        /// First element.
        ptr: *const half::bf16,
        /// Row stride (elements).
        rs: usize,
        /// Column stride (elements).
        cs: usize,
    },
}

// SAFETY: operands are only read, and the callers of `sgemm` vouch for the regions' validity
// for the product's duration.
unsafe impl Send for Operand {}
unsafe impl Sync for Operand {}
unsafe impl Send for Rhs {}
unsafe impl Sync for Rhs {}

impl Operand {
    /// The operand starting `rows` rows and `cols` columns further on.
    fn offset(self, rows: usize, cols: usize) -> Operand {
        Operand {
            ptr: self.ptr.wrapping_add(rows * self.rs + cols * self.cs),
            ..self
        }
    }
}

impl Rhs {
    /// The operand starting `rows` rows and `cols` columns further on.
    fn offset(self, rows: usize, cols: usize) -> Rhs {
        match self {
            Rhs::F32(o) => Rhs::F32(o.offset(rows, cols)),
            Rhs::Bf16 { ptr, rs, cs } => Rhs::Bf16 {
                ptr: ptr.wrapping_add(rows * rs + cols * cs),
                rs,
                cs,
            },
        }
    }
}

#[derive(Clone, Copy)]
struct Dst(*mut f32);
// SAFETY: threads write disjoint tiles of the destination.
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// `dst[m, n] = alpha * a[m, k] b[k, n] (+ dst if accumulate)`, `dst` row-major with row stride
/// `dst_rs`; `threads` > 1 splits the work over rayon's pool: by columns when `m < n` (each
/// thread then packs all of `a`, the smaller operand), else by rows.
///
/// # Safety
/// [`available`] must be true; the operands must address valid `m x k` and `k x n` regions and
/// `dst` a valid `m x n` region no one else touches meanwhile.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Rhs,
    alpha: f32,
    threads: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let dst = Dst(dst);
    // Small products are not worth a thread hand-off.
    let threads = if m * n * k < (1 << 18) {
        1
    } else {
        threads.max(1)
    };
    if threads == 1 {
        // SAFETY: the caller's contract.
        unsafe { sgemm_serial((m, n, k), dst.0, dst_rs, accumulate, a, b, alpha) };
        return;
    }
    use rayon::prelude::*;
    let (tm, tn) = tile_units();
    let by_columns = if m < tm * threads * 2 {
        true
    } else if n < tn * threads * 2 {
        false
    } else {
        m < n
    };
    // Each thread takes a run of whole tiles: columns `[s0, s1)` of dst, or rows.
    let (total, unit) = if by_columns { (n, tn) } else { (m, tm) };
    let per = total.div_ceil(threads).div_ceil(unit) * unit;
    (0..threads).into_par_iter().for_each(|t| {
        let (s0, s1) = (t * per, ((t + 1) * per).min(total));
        if s0 >= s1 {
            return;
        }
        let dst = &dst;
        // SAFETY: disjoint column (or row) ranges of dst; operands inside the caller's regions.
        unsafe {
            if by_columns {
                sgemm_serial(
                    (m, s1 - s0, k),
                    dst.0.add(s0),
                    dst_rs,
                    accumulate,
                    a,
                    b.offset(0, s0),
                    alpha,
                );
            } else {
                sgemm_serial(
                    (s1 - s0, n, k),
                    dst.0.add(s0 * dst_rs),
                    dst_rs,
                    accumulate,
                    a.offset(s0, 0),
                    b,
                    alpha,
                );
            }
        }
    });
}

/// Values in a [`Lane`].
const LANE: usize = 16;

/// A 64-byte aligned scratch buffer per thread, reused across calls (a packed panel's rows are
/// then whole cache lines, as [`kernel512`]'s loads want).
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Lane([f32; LANE]);

thread_local! {
    static PACKS: std::cell::RefCell<(Vec<Lane>, Vec<Lane>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// One thread's whole product.
#[allow(clippy::too_many_arguments)]
unsafe fn sgemm_serial(
    (m, n, k): (usize, usize, usize),
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: Operand,
    b: Rhs,
    alpha: f32,
) {
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                // SAFETY: row i of dst, n values.
                unsafe { std::ptr::write_bytes(dst.add(i * dst_rs), 0, n) };
            }
        }
        return;
    }
    PACKS.with(|packs| {
        let mut packs = packs.borrow_mut();
        let (ap, bp) = &mut *packs;
        let b_len = (KC * NC.min(n.div_ceil(NR) * NR)).div_ceil(LANE);
        let a_len = (KC * MC.min(m.div_ceil(MR) * MR)).div_ceil(LANE) + 1;
        if bp.len() < b_len {
            bp.resize(b_len, Lane([0.0; LANE]));
        }
        if ap.len() < a_len {
            ap.resize(a_len, Lane([0.0; LANE]));
        }
        let wide = wide();
        let ap = ap.as_mut_ptr() as *mut f32;
        let bp = bp.as_mut_ptr() as *mut f32;
        let mut jc = 0;
        while jc < n {
            let nc = NC.min(n - jc);
            let mut pc = 0;
            while pc < k {
                let kc = KC.min(k - pc);
                // SAFETY: bp holds kc x round_up(nc, NR) values; b's block lies in the operand.
                unsafe { pack_b(kc, nc, b, pc, jc, bp) };
                let add = accumulate || pc > 0;
                let mut ic = 0;
                while ic < m {
                    let mc = MC.min(m - ic);
                    // SAFETY: as above for a.
                    unsafe { pack_a(mc, kc, a, ic, pc, alpha, ap) };
                    let mut jr = 0;
                    while jr < nc {
                        // Two full panels side by side: 12 x 32 tiles where the rows allow.
                        let mut ir = 0;
                        if wide && nc - jr >= 2 * NR {
                            while mc - ir >= 2 * MR {
                                // SAFETY: two slivers and two panels in the packs; the tile
                                // in dst; the CPU checked by wide().
                                unsafe {
                                    kernel512(
                                        kc,
                                        ap.add(ir * kc),
                                        bp.add(jr * kc),
                                        dst.add((ic + ir) * dst_rs + jc + jr),
                                        dst_rs,
                                        add,
                                    )
                                };
                                ir += 2 * MR;
                            }
                        }
                        // The rest of this panel (and of the next one, if it went with it
                        // above) in 6 x 16 tiles.
                        let panels = if ir > 0 { 2 } else { 1 };
                        for q in 0..panels {
                            let jr = jr + q * NR;
                            let nr = NR.min(nc - jr);
                            let mut ir = ir;
                            while ir < mc {
                                let mr = MR.min(mc - ir);
                                // SAFETY: the sliver and panel lie in the packs; the tile in
                                // dst.
                                unsafe {
                                    let c = dst.add((ic + ir) * dst_rs + jc + jr);
                                    small_tile(
                                        kc,
                                        ap.add(ir * kc),
                                        bp.add(jr * kc),
                                        c,
                                        dst_rs,
                                        add,
                                        (mr, nr),
                                    )
                                };
                                ir += MR;
                            }
                        }
                        jr += panels * NR;
                    }
                    ic += mc;
                }
                pc += kc;
            }
            jc += nc;
        }
    });
}

/// Packs `a[i0.., p0..]` (`mc x kc`, times `alpha`) as `MR`-row slivers, each `kc` steps of
/// `MR` values (rows past `mc` zero). `out` has room for `round_up(mc, MR) * kc + 8` values (a
/// vector store may write two values past a sliver; the next sliver or the slack takes them).
unsafe fn pack_a(
    mc: usize,
    kc: usize,
    a: Operand,
    i0: usize,
    p0: usize,
    alpha: f32,
    out: *mut f32,
) {
    let mut o = out;
    let mut ir = 0;
    while ir < mc {
        let mr = MR.min(mc - ir);
        // SAFETY: the caller's block; out has the room above.
        unsafe {
            let base = a.ptr.add((i0 + ir) * a.rs + p0 * a.cs);
            if mr == MR && a.cs == 1 {
                pack_a_rows(kc, base, a.rs, alpha, o);
            } else {
                for p in 0..kc {
                    for r in 0..MR {
                        *o.add(p * MR + r) = if r < mr {
                            alpha * *base.add(r * a.rs + p * a.cs)
                        } else {
                            0.0
                        };
                    }
                }
            }
            o = o.add(MR * kc);
        }
        ir += MR;
    }
}

/// One full sliver from `MR` contiguous rows (`base + r * rs`): 8 steps at a time, the rows
/// (two zero rows added) transposed in registers, each step's `MR` values stored with a vector
/// whose last two lanes the next step overwrites.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_a_rows(kc: usize, base: *const f32, rs: usize, alpha: f32, o: *mut f32) {
    let full = kc / 8 * 8;
    // SAFETY: MR rows of kc values at base; o has kc x MR values plus 8 of slack.
    unsafe {
        let scale = _mm256_set1_ps(alpha);
        let zero = _mm256_setzero_ps();
        let mut p = 0;
        while p < full {
            let row = |r: usize| _mm256_mul_ps(scale, _mm256_loadu_ps(base.add(r * rs + p)));
            let t = transpose8([row(0), row(1), row(2), row(3), row(4), row(5), zero, zero]);
            for (q, v) in t.into_iter().enumerate() {
                _mm256_storeu_ps(o.add((p + q) * MR), v);
            }
            p += 8;
        }
        for p in full..kc {
            for r in 0..MR {
                *o.add(p * MR + r) = alpha * *base.add(r * rs + p);
            }
        }
    }
}

/// Packs `b[p0.., j0..]` (`kc x nc`) as `NR`-column panels, each `kc` rows of `NR` values
/// (columns past `nc` zero), bf16 widened to f32.
unsafe fn pack_b(kc: usize, nc: usize, b: Rhs, p0: usize, j0: usize, out: *mut f32) {
    let mut o = out;
    let mut jr = 0;
    while jr < nc {
        let nr = NR.min(nc - jr);
        // SAFETY: the caller's block; out has room for kc x round_up(nc, NR) values.
        unsafe {
            match b.offset(p0, j0 + jr) {
                Rhs::F32(Operand { ptr, rs, cs }) => pack_b_panel(kc, nr, ptr, rs, cs, o),
                Rhs::Bf16 { ptr, rs, cs } => pack_b_panel(kc, nr, ptr, rs, cs, o),
            }
            o = o.add(NR * kc);
        }
        jr += NR;
    }
}

/// A right-hand matrix element type: f32, or bf16 (the top half of an f32).
trait Elem: Copy {
    /// Eight contiguous values at `p` as f32.
    unsafe fn load8(p: *const Self) -> __m256;
    /// The value as f32.
    fn value(self) -> f32;
}

impl Elem for f32 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const f32) -> __m256 {
        // SAFETY: the caller's 8 values.
        unsafe { _mm256_loadu_ps(p) }
    }
    fn value(self) -> f32 {
        self
    }
}

impl Elem for half::bf16 {
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const half::bf16) -> __m256 {
        // SAFETY: the caller's 8 values.
        unsafe {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }
    fn value(self) -> f32 {
        self.to_f32()
    }
}

/// One `NR`-column panel of `kc` rows (`nr` of its columns real, the rest zero) from the matrix
/// at `base` with strides `rs`, `cs`: rows copied 8 values at a time when the columns are
/// contiguous, 8 x 8 blocks transposed in registers when the rows are (a transposed row-major
/// weight), one value at a time otherwise.
#[target_feature(enable = "avx2,fma")]
unsafe fn pack_b_panel<T: Elem>(
    kc: usize,
    nr: usize,
    base: *const T,
    rs: usize,
    cs: usize,
    o: *mut f32,
) {
    // SAFETY: the caller's panel: nr columns of kc values; o has kc x NR room.
    unsafe {
        if nr == NR && cs == 1 {
            for p in 0..kc {
                let row = base.add(p * rs);
                _mm256_storeu_ps(o.add(p * NR), T::load8(row));
                _mm256_storeu_ps(o.add(p * NR + 8), T::load8(row.add(8)));
            }
        } else if nr == NR && rs == 1 {
            let full = kc / 8 * 8;
            let mut p = 0;
            while p < full {
                for half in 0..NR / 8 {
                    let col = |r: usize| T::load8(base.add((half * 8 + r) * cs + p));
                    let t = transpose8([
                        col(0),
                        col(1),
                        col(2),
                        col(3),
                        col(4),
                        col(5),
                        col(6),
                        col(7),
                    ]);
                    for (q, v) in t.into_iter().enumerate() {
                        _mm256_storeu_ps(o.add((p + q) * NR + half * 8), v);
                    }
                }
                p += 8;
            }
            for p in full..kc {
                for j in 0..NR {
                    *o.add(p * NR + j) = (*base.add(j * cs + p)).value();
                }
            }
        } else {
            for p in 0..kc {
                for j in 0..NR {
                    *o.add(p * NR + j) = if j < nr {
                        (*base.add(p * rs + j * cs)).value()
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// The transpose of the 8 x 8 matrix whose rows are `r`.
#[target_feature(enable = "avx2,fma")]
unsafe fn transpose8(r: [__m256; 8]) -> [__m256; 8] {
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let s0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let s1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let s2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let s3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let s4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let s5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let s6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let s7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    [
        _mm256_permute2f128_ps::<0x20>(s0, s4),
        _mm256_permute2f128_ps::<0x20>(s1, s5),
        _mm256_permute2f128_ps::<0x20>(s2, s6),
        _mm256_permute2f128_ps::<0x20>(s3, s7),
        _mm256_permute2f128_ps::<0x31>(s0, s4),
        _mm256_permute2f128_ps::<0x31>(s1, s5),
        _mm256_permute2f128_ps::<0x31>(s2, s6),
        _mm256_permute2f128_ps::<0x31>(s3, s7),
    ]
}

/// `c[mr, nr] (+)= a_sliver^T b_panel` (the first `mr` rows and `nr` columns of a 6 x 16 tile).
///
/// # Safety
/// As [`kernel`], for an `mr x nr` region of `c`.
unsafe fn small_tile(
    kc: usize,
    ap: *const f32,
    bp: *const f32,
    c: *mut f32,
    rs: usize,
    add: bool,
    (mr, nr): (usize, usize),
) {
    // SAFETY: the caller's slivers and tile; the tile buffer holds 6 x 16 values.
    unsafe {
        if mr == MR && nr == NR {
            kernel(kc, ap, bp, c, rs, add);
            return;
        }
        let mut tile = [Lane([0.0; LANE]); MR * NR / LANE];
        let t = tile.as_mut_ptr() as *mut f32;
        kernel(kc, ap, bp, t, NR, false);
        for i in 0..mr {
            for j in 0..nr {
                let v = *t.add(i * NR + j);
                let c = c.add(i * rs + j);
                *c = if add { *c + v } else { v };
            }
        }
    }
}

/// `c[12, 32] (+)= [a0; a1]^T [b0 b1]` over `kc` steps with AVX-512: two consecutive 6-row
/// slivers (`a0` at `a`, `a1` `MR * kc` values on) and two consecutive 16-column panels (`b1`
/// `NR * kc` values after `b0`), 24 accumulators, two vector loads and twelve broadcasts per
/// step; `c` row stride `rs`.
///
/// # Safety
/// The CPU has AVX-512F; `a` holds `2 x kc x MR` values and `b` `2 x kc x NR` (64-byte
/// aligned); `c` addresses a 12 x 32 tile.
#[target_feature(enable = "avx512f")]
unsafe fn kernel512(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rs: usize, add: bool) {
    // SAFETY: the caller's contract.
    unsafe {
        for r in 0..2 * MR {
            let row = c.add(r * rs);
            _mm_prefetch::<_MM_HINT_T0>(row as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(row.add(16) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(row.add(2 * NR - 1) as *const i8);
        }
        let mut acc = [[_mm512_setzero_ps(); 2]; 2 * MR];
        let (mut a0, mut a1) = (a, a.add(MR * kc));
        let (mut b0, mut b1) = (b, b.add(NR * kc));
        for _ in 0..kc {
            let v0 = _mm512_load_ps(b0);
            let v1 = _mm512_load_ps(b1);
            for r in 0..MR {
                let x = _mm512_set1_ps(*a0.add(r));
                acc[r][0] = _mm512_fmadd_ps(x, v0, acc[r][0]);
                acc[r][1] = _mm512_fmadd_ps(x, v1, acc[r][1]);
                let y = _mm512_set1_ps(*a1.add(r));
                acc[MR + r][0] = _mm512_fmadd_ps(y, v0, acc[MR + r][0]);
                acc[MR + r][1] = _mm512_fmadd_ps(y, v1, acc[MR + r][1]);
            }
            a0 = a0.add(MR);
            a1 = a1.add(MR);
            b0 = b0.add(NR);
            b1 = b1.add(NR);
        }
        for (r, row) in acc.iter().enumerate() {
            let c = c.add(r * rs);
            let (mut v0, mut v1) = (row[0], row[1]);
            if add {
                v0 = _mm512_add_ps(v0, _mm512_loadu_ps(c));
                v1 = _mm512_add_ps(v1, _mm512_loadu_ps(c.add(NR)));
            }
            _mm512_storeu_ps(c, v0);
            _mm512_storeu_ps(c.add(NR), v1);
        }
    }
}

/// `c[6, 16] (+)= a_sliver^T b_panel` over `kc` steps; `c` row stride `rs`.
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel(kc: usize, a: *const f32, b: *const f32, c: *mut f32, rs: usize, add: bool) {
    // SAFETY: a holds kc x MR and b kc x NR values (b 32-byte aligned); c a 6 x 16 tile.
    unsafe {
        // The tile's rows are read (or written) after the loop: ask for them now, so that
        // their misses overlap the arithmetic.
        for r in 0..MR {
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * rs) as *const i8);
            _mm_prefetch::<_MM_HINT_T0>(c.add(r * rs + NR - 1) as *const i8);
        }
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut a = a;
        let mut b = b;
        for _ in 0..kc {
            let b0 = _mm256_load_ps(b);
            let b1 = _mm256_load_ps(b.add(8));
            for (r, row) in acc.iter_mut().enumerate() {
                let x = _mm256_broadcast_ss(&*a.add(r));
                row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                row[1] = _mm256_fmadd_ps(x, b1, row[1]);
            }
            a = a.add(MR);
            b = b.add(NR);
        }
        for (r, row) in acc.iter().enumerate() {
            let c = c.add(r * rs);
            let (mut v0, mut v1) = (row[0], row[1]);
            if add {
                v0 = _mm256_add_ps(v0, _mm256_loadu_ps(c));
                v1 = _mm256_add_ps(v1, _mm256_loadu_ps(c.add(8)));
            }
            _mm256_storeu_ps(c, v0);
            _mm256_storeu_ps(c.add(8), v1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i + 1) * 2_654_435_761 + seed * 40_503) % 2001) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// How an operand is laid out in its buffer.
    #[derive(Clone, Copy, Debug)]
    enum Layout {
        /// Row-major, rows padded by 3.
        Rows,
        /// Column-major (a transposed row-major matrix).
        Columns,
        /// Both strides above 1.
        Strided,
    }

    /// A `rows x cols` matrix `v` stored per `layout`: the buffer and its (row, column) strides.
    fn store(v: &[f32], rows: usize, cols: usize, layout: Layout) -> (Vec<f32>, usize, usize) {
        let (rs, cs, len) = match layout {
            Layout::Rows => (cols + 3, 1, rows * (cols + 3)),
            Layout::Columns => (1, rows, rows * cols),
            Layout::Strided => (2 * cols * 2 + 1, 2, rows * (4 * cols + 1)),
        };
        let mut buf = vec![f32::NAN; len.max(1)];
        for i in 0..rows {
            for j in 0..cols {
                buf[i * rs + j * cs] = v[i * cols + j];
            }
        }
        (buf, rs, cs)
    }

    #[allow(clippy::too_many_arguments)]
    fn check(
        m: usize,
        n: usize,
        k: usize,
        la: Layout,
        lb: Layout,
        bf: bool,
        accumulate: bool,
        alpha: f32,
        threads: usize,
    ) {
        let av = values(m * k, 1);
        let mut bv = values(k * n, 2);
        if bf {
            // The reference uses the values bf16 holds.
            bv.iter_mut().for_each(|x| *x = bf16::from_f32(*x).to_f32());
        }
        let (abuf, ars, acs) = store(&av, m, k, la);
        let (bbuf, brs, bcs) = store(&bv, k, n, lb);
        let bbuf16: Vec<bf16> = bbuf.iter().map(|&x| bf16::from_f32(x)).collect();
        let dst_rs = n + 5;
        let init = values(m * dst_rs, 3);
        let mut dst = init.clone();
        let a = Operand {
            ptr: abuf.as_ptr(),
            rs: ars,
            cs: acs,
        };
        let b = if bf {
            Rhs::Bf16 {
                ptr: bbuf16.as_ptr(),
                rs: brs,
                cs: bcs,
            }
        } else {
            Rhs::F32(Operand {
                ptr: bbuf.as_ptr(),
                rs: brs,
                cs: bcs,
            })
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        // SAFETY: the buffers hold the regions the strides address; available() checked by the
        // caller.
        pool.install(|| unsafe {
            sgemm(
                (m, n, k),
                dst.as_mut_ptr(),
                dst_rs,
                accumulate,
                a,
                b,
                alpha,
                threads,
            )
        });
        for i in 0..m {
            for j in 0..dst_rs {
                let got = dst[i * dst_rs + j];
                if j >= n {
                    assert_eq!(
                        got.to_bits(),
                        init[i * dst_rs + j].to_bits(),
                        "wrote past column {n}"
                    );
                    continue;
                }
                let mut want: f64 = (0..k)
                    .map(|p| av[i * k + p] as f64 * bv[p * n + j] as f64)
                    .sum::<f64>()
                    * alpha as f64;
                if accumulate {
                    want += init[i * dst_rs + j] as f64;
                }
                let tol = 1e-5 * (k as f64).sqrt().max(1.0) * 4.0;
                assert!(
                    (got as f64 - want).abs() <= tol,
                    "{m}x{n}x{k} {la:?} {lb:?} bf16={bf} acc={accumulate} alpha={alpha} threads={threads}: [{i},{j}] {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn equals_the_plain_product() {
        if !available() {
            eprintln!("no AVX2/FMA: the gemm crate serves every product");
            return;
        }
        let layouts = [Layout::Rows, Layout::Columns, Layout::Strided];
        // Shapes below, at and above the tiles (6 x 16; 12 x 32 with AVX-512) and block (MC 96,
        // KC 256) sizes.
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 1),
            (24, 48, 17),
            (30, 80, 5),
            (5, 17, 3),
            (6, 16, 8),
            (7, 33, 9),
            (13, 31, 257),
            (97, 40, 300),
            (100, 100, 100),
            (4, 2060, 5),
            (3, 2, 0),
        ] {
            for la in layouts {
                for lb in layouts {
                    for bf in [false, true] {
                        check(m, n, k, la, lb, bf, false, 1.0, 1);
                        check(m, n, k, la, lb, bf, true, 0.5, 1);
                    }
                }
            }
        }
        // Threaded splits: by rows (m >= n) and by columns (m < n), odd edges.
        for &(m, n, k) in &[(200, 70, 64), (40, 300, 70), (101, 99, 513), (12, 2100, 20)] {
            for threads in [2, 3] {
                check(
                    m,
                    n,
                    k,
                    Layout::Rows,
                    Layout::Columns,
                    false,
                    false,
                    1.0,
                    threads,
                );
                check(
                    m,
                    n,
                    k,
                    Layout::Columns,
                    Layout::Rows,
                    true,
                    true,
                    -2.0,
                    threads,
                );
            }
        }
    }
}
