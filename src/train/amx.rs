//! Matrix products in bf16 on the AMX tile units of Intel Xeons (Sapphire Rapids and later),
//! accumulated in f32: the frozen weights' products in training, `x @ Wᵀ` forward and
//! `grad @ W` backward. One tile instruction does 16 × 16 × 32 multiply-adds; on the projections'
//! shapes at 220 tokens this runs at ~900 GFLOP/s on 2 cores, where gemm's f32 AVX-512 kernels
//! run at 200–350 (README, Training). AVX512-BF16's `vdpbf16ps` was tried too and ran at
//! 0.5–1.1× gemm's f32 on that Xeon, so there is no kernel for CPUs without AMX.
//!
//! The weight is rounded to bf16 once and stored in the tiles' layout ([`Packed`]); the left
//! operand is rounded on each call. Rounding is to nearest even, as PyTorch's `bfloat16` does.
//! The tile instructions are written as inline assembly: Rust's AMX intrinsics are unstable.

use std::sync::OnceLock;

use candle_core::Result;

use rayon::prelude::*;

use super::ops::CHUNK;

/// Rows and columns of a result tile; a left operand's tile is 16 rows × 32 bf16.
const TILE: usize = 16;
/// The reduction length of one tile product (32 bf16 = one 64-byte tile row).
const DEPTH: usize = 32;

/// Whether this CPU and its operating system run AMX's bf16 tile products (asked once).
pub fn available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(amx)
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn amx() -> bool {
    // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE; the tile registers' state must be
    // enabled by the OS (XCR0 bits 17, 18), and Linux hands it out per process on request.
    let leaf = std::arch::x86_64::__cpuid_count(7, 0);
    if leaf.edx & (1 << 22) == 0 || leaf.edx & (1 << 24) == 0 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: the request only asks the kernel for permission; it changes no memory of ours.
    unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn amx() -> bool {
    false
}

/// Whether a right operand of these sides fits the tiles whole (the left operand's rows are
/// padded instead).
fn fits(depth: usize, columns: usize) -> bool {
    depth > 0 && columns > 0 && depth.is_multiple_of(DEPTH) && columns.is_multiple_of(2 * TILE)
}

/// A right operand (depth, columns) in bf16, as tiles: for each 16 columns, for each 32 of depth,
/// 16 rows of 16 column pairs (two consecutive depths of one column side by side).
pub struct Packed {
    tiles: Vec<u16>,
    depth: usize,
    columns: usize,
}

/// f32 → bf16, rounded to nearest even.
fn bf16(v: f32) -> u16 {
    let bits = v.to_bits();
    if v.is_nan() {
        return 0x7fc0;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

impl Packed {
    /// The operand `B` (depth, columns) with `B[d][c] = at(d, c)`; `None` where its sides do
    /// not fit the tiles whole.
    fn new(depth: usize, columns: usize, at: impl Fn(usize, usize) -> f32 + Sync) -> Option<Packed> {
        if !fits(depth, columns) {
            return None;
        }
        let mut tiles = vec![0u16; depth * columns];
        let per_column_block = depth * TILE;
        tiles.par_chunks_mut(per_column_block).enumerate().for_each(|(block, chunk)| {
            for (i, v) in chunk.iter_mut().enumerate() {
                let row = i / (2 * TILE);
                let (column, pair) = ((i % (2 * TILE)) / 2, i % 2);
                *v = bf16(at(2 * row + pair, block * TILE + column));
            }
        });
        Some(Packed { tiles, depth, columns })
    }

    /// `W` (n_out, n_in) as the right operand of `x @ Wᵀ`.
    pub fn transposed(w: &[f32], n_out: usize, n_in: usize) -> Option<Packed> {
        Packed::new(n_in, n_out, |d, c| w[c * n_in + d])
    }

    /// `W` (n_out, n_in) as the right operand of `grad @ W`.
    pub fn plain(w: &[f32], n_out: usize, n_in: usize) -> Option<Packed> {
        Packed::new(n_out, n_in, |d, c| w[d * n_in + c])
    }

    pub fn depth(&self) -> usize {
        self.depth
    }

    pub fn columns(&self) -> usize {
        self.columns
    }
}

/// The tile configuration: palette 1; tiles 0–3 results (16 × 16 f32), 4–5 left operands
/// (16 × 32 bf16), 6–7 right operands (16 rows of 16 pairs).
#[repr(C, align(64))]
struct Config([u8; 64]);

impl Config {
    fn new() -> Config {
        let mut c = [0u8; 64];
        c[0] = 1;
        for tile in 0..8 {
            c[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
            c[48 + tile] = TILE as u8;
        }
        Config(c)
    }
}

/// The result's values, which the tasks of one product write in disjoint columns.
struct Out(*mut f32);
// SAFETY: each task writes only its own columns (see `matmul`).
unsafe impl Send for Out {}
// SAFETY: as above.
unsafe impl Sync for Out {}

/// `a @ B` for `a` (rows, B's depth), row-major f32: (rows, B's columns), row-major.
pub fn matmul(a: &[f32], rows: usize, b: &Packed) -> Result<Vec<f32>> {
    let (depth, columns) = (b.depth, b.columns);
    if !available() {
        candle_core::bail!("bf16 products need AMX, which this CPU does not have")
    }
    if a.len() != rows * depth {
        candle_core::bail!("bf16 product of {} values as ({rows}, {depth})", a.len())
    }
    let padded = rows.div_ceil(2 * TILE) * 2 * TILE;
    let mut left = vec![0u16; padded * depth];
    left.par_iter_mut().zip(a).with_min_len(CHUNK).for_each(|(to, &from)| *to = bf16(from));
    let mut out = vec![0f32; padded * columns];
    let out_ptr = Out(out.as_mut_ptr());
    let blocks = columns / (2 * TILE);
    // Enough tasks per thread that one finishing early waits little.
    let per_task = blocks.div_ceil(rayon::current_num_threads() * 4).max(1);
    (0..blocks).into_par_iter().with_min_len(per_task).for_each(|pair| {
        let out_ptr = &out_ptr;
        // SAFETY: `available()` said the CPU runs AMX and the OS granted its state; each task
        // writes only its own 32 columns of `out`, whose size covers every padded row; every
        // load reads within `left` (padded rows) and `b.tiles` (whole tiles, checked by `fits`
        // when packed).
        unsafe { tile_columns(&left, padded, depth, &b.tiles, pair, out_ptr.0, columns) }
    });
    out.truncate(rows * columns);
    Ok(out)
}

/// Result columns `32·pair .. 32·pair + 32`, every row: 2 × 2 result tiles per 32 rows.
#[cfg(target_arch = "x86_64")]
unsafe fn tile_columns(
    left: &[u16],
    rows: usize,
    depth: usize,
    tiles: &[u16],
    pair: usize,
    out: *mut f32,
    columns: usize,
) {
    // SAFETY: as the caller's; the pointers below stay within the slices and `out`.
    unsafe {
        use std::arch::asm;
        let config = Config::new();
        let tile_words = TILE * DEPTH; // u16 per operand tile
        let per_block = depth / DEPTH;
        let b0 = tiles.as_ptr().add(2 * pair * per_block * tile_words);
        let b1 = b0.add(per_block * tile_words);
        let a_stride = depth * 2;
        let c_stride = columns * 4;
        asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack, readonly));
        for r0 in (0..rows).step_by(2 * TILE) {
            asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
            let a0 = left.as_ptr().add(r0 * depth);
            let a1 = a0.add(TILE * depth);
            for k in 0..per_block {
                asm!(
                    "tileloadd tmm4, [{a0} + {sa} * 1]",
                    "tileloadd tmm5, [{a1} + {sa} * 1]",
                    "tileloadd tmm6, [{b0} + {sb} * 1]",
                    "tileloadd tmm7, [{b1} + {sb} * 1]",
                    "tdpbf16ps tmm0, tmm4, tmm6",
                    "tdpbf16ps tmm1, tmm4, tmm7",
                    "tdpbf16ps tmm2, tmm5, tmm6",
                    "tdpbf16ps tmm3, tmm5, tmm7",
                    a0 = in(reg) a0.add(k * DEPTH),
                    a1 = in(reg) a1.add(k * DEPTH),
                    b0 = in(reg) b0.add(k * tile_words),
                    b1 = in(reg) b1.add(k * tile_words),
                    sa = in(reg) a_stride,
                    sb = in(reg) 64usize,
                    options(nostack, readonly),
                );
            }
            let c = out.add(r0 * columns + pair * 2 * TILE);
            asm!(
                "tilestored [{c00} + {sc} * 1], tmm0",
                "tilestored [{c01} + {sc} * 1], tmm1",
                "tilestored [{c10} + {sc} * 1], tmm2",
                "tilestored [{c11} + {sc} * 1], tmm3",
                c00 = in(reg) c,
                c01 = in(reg) c.add(TILE),
                c10 = in(reg) c.add(TILE * columns),
                c11 = in(reg) c.add(TILE * columns + TILE),
                sc = in(reg) c_stride,
                options(nostack),
            );
        }
        asm!("tilerelease", options(nostack, nomem));
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn tile_columns(_: &[u16], _: usize, _: usize, _: &[u16], _: usize, _: *mut f32, _: usize) {
    unreachable!("AMX is x86-64 only; `available` is false elsewhere")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0).collect()
    }

    #[test]
    fn tile_products_match_f32_within_bf16_rounding() {
        if !available() {
            eprintln!("skipped: this CPU has no AMX");
            return;
        }
        // Rows not a multiple of the tiles' 32 (padded); two 32-column blocks; three depth tiles.
        let (rows, n_out, n_in) = (37, 64, 96);
        let (x, w, grad) = (values(rows * n_in, 1), values(n_out * n_in, 2), values(rows * n_out, 3));
        let forward = matmul(&x, rows, &Packed::transposed(&w, n_out, n_in).unwrap()).unwrap();
        let backward = matmul(&grad, rows, &Packed::plain(&w, n_out, n_in).unwrap()).unwrap();
        for r in 0..rows {
            for o in 0..n_out {
                let exact: f32 = (0..n_in).map(|i| x[r * n_in + i] * w[o * n_in + i]).sum();
                // Both factors rounded to 8 significant bits: within ~2⁻⁸ of the sum of magnitudes.
                let bound: f32 = (0..n_in).map(|i| (x[r * n_in + i] * w[o * n_in + i]).abs()).sum::<f32>() / 128.0;
                assert!((forward[r * n_out + o] - exact).abs() <= bound, "forward ({r}, {o})");
            }
            for i in 0..n_in {
                let exact: f32 = (0..n_out).map(|o| grad[r * n_out + o] * w[o * n_in + i]).sum();
                let bound: f32 = (0..n_out).map(|o| (grad[r * n_out + o] * w[o * n_in + i]).abs()).sum::<f32>() / 128.0;
                assert!((backward[r * n_in + i] - exact).abs() <= bound, "backward ({r}, {i})");
            }
        }
        assert!(matmul(&x[1..], rows, &Packed::plain(&w, n_out, n_in).unwrap()).is_err());
    }

    #[test]
    fn sides_that_are_not_whole_tiles_are_not_packed() {
        assert!(Packed::transposed(&values(48 * 64, 0), 48, 64).is_none());
        assert!(Packed::plain(&values(64 * 40, 0), 64, 40).is_none());
    }

    #[test]
    fn rounding_to_bf16_is_to_nearest_even() {
        assert_eq!(bf16(1.0), 0x3f80);
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: to the even one, 1.
        assert_eq!(bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(bf16(-2.0), 0xc000);
        assert_eq!(bf16(f32::NAN), 0x7fc0);
    }
}
