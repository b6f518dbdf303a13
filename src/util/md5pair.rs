//! MD5 of a part and MD5 of the whole file, computed in one pass over the bytes.
//!
//! Every multipart upload needs two MD5s of the same bytes: each part's (`Content-MD5`, and
//! to check the part's ETag) and the whole file's (kept in the journal, answered by look-ups).
//! MD5 cannot be combined from the parts' digests, and it is slow — each of its 64 steps per
//! block waits for the previous one, so a core runs it slowly while most of its execution
//! units idle; computed one after the other, the two digests were most of the daemon's CPU.
//!
//! [`Md5Pair`] runs both MD5 states over each 64-byte block in the same loop: the two
//! dependency chains are independent, so the core executes them side by side and the second
//! digest costs a fraction of the first (see `benches/md5pair.rs`). Part boundaries are
//! multiples of 1 MiB, hence of the 64-byte block, so both states always see the same blocks;
//! if a part ever ended inside a block, the pair falls back to finishing the whole-file state
//! on its own.
//!
//! The compression function follows RFC 1321. It is checked against the `md-5` crate in the
//! tests below, over many lengths and part splits.

/// Per-step additive constants, `floor(abs(sin(i + 1)) * 2^32)` (RFC 1321).
const T: [u32; 64] = [
    0xd76aa478, 0xe8c7b756, 0x242070db, 0xc1bdceee, 0xf57c0faf, 0x4787c62a, 0xa8304613, 0xfd469501,
    0x698098d8, 0x8b44f7af, 0xffff5bb1, 0x895cd7be, 0x6b901122, 0xfd987193, 0xa679438e, 0x49b40821,
    0xf61e2562, 0xc040b340, 0x265e5a51, 0xe9b6c7aa, 0xd62f105d, 0x02441453, 0xd8a1e681, 0xe7d3fbc8,
    0x21e1cde6, 0xc33707d6, 0xf4d50d87, 0x455a14ed, 0xa9e3e905, 0xfcefa3f8, 0x676f02d9, 0x8d2a4c8a,
    0xfffa3942, 0x8771f681, 0x6d9d6122, 0xfde5380c, 0xa4beea44, 0x4bdecfa9, 0xf6bb4b60, 0xbebfbc70,
    0x289b7ec6, 0xeaa127fa, 0xd4ef3085, 0x04881d05, 0xd9d4d039, 0xe6db99e5, 0x1fa27cf8, 0xc4ac5665,
    0xf4292244, 0x432aff97, 0xab9423a7, 0xfc93a039, 0x655b59c3, 0x8f0ccc92, 0xffeff47d, 0x85845dd1,
    0x6fa87e4f, 0xfe2ce6e0, 0xa3014314, 0x4e0811a1, 0xf7537e82, 0xbd3af235, 0x2ad7d2bb, 0xeb86d391,
];

/// Initial state (RFC 1321).
const INIT: [u32; 4] = [0x67452301, 0xefcdab89, 0x98badcfe, 0x10325476];

#[inline(always)]
fn f(x: u32, y: u32, z: u32) -> u32 {
    z ^ (x & (y ^ z))
}
#[inline(always)]
fn g(x: u32, y: u32, z: u32) -> u32 {
    // (x & z) | (y & !z): the two halves never overlap, so `+` is the same and schedules better.
    (x & z).wrapping_add(y & !z)
}
#[inline(always)]
fn h(x: u32, y: u32, z: u32) -> u32 {
    x ^ y ^ z
}
#[inline(always)]
fn i(x: u32, y: u32, z: u32) -> u32 {
    y ^ (x | !z)
}

/// The message word used by step `n` (0..64).
const fn word_index(n: usize) -> usize {
    match n / 16 {
        0 => n,
        1 => (5 * n + 1) % 16,
        2 => (3 * n + 5) % 16,
        _ => (7 * n) % 16,
    }
}

/// The rotation of step `n`.
const fn shift(n: usize) -> u32 {
    const S: [[u32; 4]; 4] = [
        [7, 12, 17, 22],
        [5, 9, 14, 20],
        [4, 11, 16, 23],
        [6, 10, 15, 21],
    ];
    S[n / 16][n % 4]
}

fn load(block: &[u8; 64]) -> [u32; 16] {
    let mut x = [0u32; 16];
    for (w, c) in x.iter_mut().zip(block.chunks_exact(4)) {
        *w = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
    }
    x
}

/// One step for every state in `$s` (each `[a, b, c, d]` named by position).
macro_rules! steps {
    ($x:ident, $n:expr, $fun:ident, $a:tt $b:tt $c:tt $d:tt; $($s:ident),+) => {{
        const N: usize = $n;
        let xt = $x[word_index(N)].wrapping_add(T[N]);
        $(
            $s[$a] = $s[$b].wrapping_add(
                $s[$a]
                    .wrapping_add($fun($s[$b], $s[$c], $s[$d]))
                    .wrapping_add(xt)
                    .rotate_left(shift(N)),
            );
        )+
    }};
}

/// The 64 steps for every state listed.
macro_rules! all_steps {
    ($x:ident; $($s:ident),+) => {{
        steps!($x, 0, f, 0 1 2 3; $($s),+); steps!($x, 1, f, 3 0 1 2; $($s),+);
        steps!($x, 2, f, 2 3 0 1; $($s),+); steps!($x, 3, f, 1 2 3 0; $($s),+);
        steps!($x, 4, f, 0 1 2 3; $($s),+); steps!($x, 5, f, 3 0 1 2; $($s),+);
        steps!($x, 6, f, 2 3 0 1; $($s),+); steps!($x, 7, f, 1 2 3 0; $($s),+);
        steps!($x, 8, f, 0 1 2 3; $($s),+); steps!($x, 9, f, 3 0 1 2; $($s),+);
        steps!($x, 10, f, 2 3 0 1; $($s),+); steps!($x, 11, f, 1 2 3 0; $($s),+);
        steps!($x, 12, f, 0 1 2 3; $($s),+); steps!($x, 13, f, 3 0 1 2; $($s),+);
        steps!($x, 14, f, 2 3 0 1; $($s),+); steps!($x, 15, f, 1 2 3 0; $($s),+);
        steps!($x, 16, g, 0 1 2 3; $($s),+); steps!($x, 17, g, 3 0 1 2; $($s),+);
        steps!($x, 18, g, 2 3 0 1; $($s),+); steps!($x, 19, g, 1 2 3 0; $($s),+);
        steps!($x, 20, g, 0 1 2 3; $($s),+); steps!($x, 21, g, 3 0 1 2; $($s),+);
        steps!($x, 22, g, 2 3 0 1; $($s),+); steps!($x, 23, g, 1 2 3 0; $($s),+);
        steps!($x, 24, g, 0 1 2 3; $($s),+); steps!($x, 25, g, 3 0 1 2; $($s),+);
        steps!($x, 26, g, 2 3 0 1; $($s),+); steps!($x, 27, g, 1 2 3 0; $($s),+);
        steps!($x, 28, g, 0 1 2 3; $($s),+); steps!($x, 29, g, 3 0 1 2; $($s),+);
        steps!($x, 30, g, 2 3 0 1; $($s),+); steps!($x, 31, g, 1 2 3 0; $($s),+);
        steps!($x, 32, h, 0 1 2 3; $($s),+); steps!($x, 33, h, 3 0 1 2; $($s),+);
        steps!($x, 34, h, 2 3 0 1; $($s),+); steps!($x, 35, h, 1 2 3 0; $($s),+);
        steps!($x, 36, h, 0 1 2 3; $($s),+); steps!($x, 37, h, 3 0 1 2; $($s),+);
        steps!($x, 38, h, 2 3 0 1; $($s),+); steps!($x, 39, h, 1 2 3 0; $($s),+);
        steps!($x, 40, h, 0 1 2 3; $($s),+); steps!($x, 41, h, 3 0 1 2; $($s),+);
        steps!($x, 42, h, 2 3 0 1; $($s),+); steps!($x, 43, h, 1 2 3 0; $($s),+);
        steps!($x, 44, h, 0 1 2 3; $($s),+); steps!($x, 45, h, 3 0 1 2; $($s),+);
        steps!($x, 46, h, 2 3 0 1; $($s),+); steps!($x, 47, h, 1 2 3 0; $($s),+);
        steps!($x, 48, i, 0 1 2 3; $($s),+); steps!($x, 49, i, 3 0 1 2; $($s),+);
        steps!($x, 50, i, 2 3 0 1; $($s),+); steps!($x, 51, i, 1 2 3 0; $($s),+);
        steps!($x, 52, i, 0 1 2 3; $($s),+); steps!($x, 53, i, 3 0 1 2; $($s),+);
        steps!($x, 54, i, 2 3 0 1; $($s),+); steps!($x, 55, i, 1 2 3 0; $($s),+);
        steps!($x, 56, i, 0 1 2 3; $($s),+); steps!($x, 57, i, 3 0 1 2; $($s),+);
        steps!($x, 58, i, 2 3 0 1; $($s),+); steps!($x, 59, i, 1 2 3 0; $($s),+);
        steps!($x, 60, i, 0 1 2 3; $($s),+); steps!($x, 61, i, 3 0 1 2; $($s),+);
        steps!($x, 62, i, 2 3 0 1; $($s),+); steps!($x, 63, i, 1 2 3 0; $($s),+);
    }};
}

/// One block into one state (the fastest way this CPU has).
fn compress1(state: &mut [u32; 4], block: &[u8; 64]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        let mut unused = INIT;
        // SAFETY: `available` checked that the CPU has AVX-512F and AVX-512VL.
        unsafe { simd::compress2(state, &mut unused, block) };
        return;
    }
    compress1_scalar(state, block);
}

/// One block into one state, with general-purpose registers.
fn compress1_scalar(state: &mut [u32; 4], block: &[u8; 64]) {
    let x = load(block);
    let mut s = *state;
    all_steps!(x; s);
    for (st, v) in state.iter_mut().zip(s) {
        *st = st.wrapping_add(v);
    }
}

/// One block into two states at once (the fastest way this CPU has).
fn compress2(s1: &mut [u32; 4], s2: &mut [u32; 4], block: &[u8; 64]) {
    #[cfg(target_arch = "x86_64")]
    if simd::available() {
        // SAFETY: `available` checked that the CPU has AVX-512F and AVX-512VL.
        unsafe { simd::compress2(s1, s2, block) };
        return;
    }
    compress2_scalar(s1, s2, block);
}

/// One block into two states at once, with general-purpose registers: the two dependency
/// chains interleave, so the second digest costs little.
fn compress2_scalar(s1: &mut [u32; 4], s2: &mut [u32; 4], block: &[u8; 64]) {
    let x = load(block);
    let (mut a, mut b) = (*s1, *s2);
    all_steps!(x; a, b);
    for (st, v) in s1.iter_mut().zip(a) {
        *st = st.wrapping_add(v);
    }
    for (st, v) in s2.iter_mut().zip(b) {
        *st = st.wrapping_add(v);
    }
}

/// MD5 steps on AVX-512VL vector registers: each of the four working variables is one
/// register whose lanes hold the two states. `vpternlogd` computes the round function and
/// `vprold` the rotation in one instruction each, which shortens the chain each step waits
/// on (about four instructions instead of five or six); both lanes ride along for free.
#[cfg(target_arch = "x86_64")]
mod simd {
    use super::{T, shift, word_index};
    use std::arch::x86_64::*;
    use std::sync::atomic::{AtomicU8, Ordering};

    static DETECTED: AtomicU8 = AtomicU8::new(0);

    /// Whether this CPU has AVX-512F and AVX-512VL (checked once).
    pub fn available() -> bool {
        match DETECTED.load(Ordering::Relaxed) {
            1 => true,
            2 => false,
            _ => {
                let yes = std::is_x86_feature_detected!("avx512f")
                    && std::is_x86_feature_detected!("avx512vl");
                DETECTED.store(if yes { 1 } else { 2 }, Ordering::Relaxed);
                yes
            }
        }
    }

    // Truth tables for vpternlogd with the operands (b, c, d) as (0xF0, 0xCC, 0xAA).
    const F: i32 = 0xCA; // (b & c) | (!b & d)
    const G: i32 = 0xE4; // (b & d) | (c & !d)
    const H: i32 = 0x96; // b ^ c ^ d
    const I: i32 = 0x39; // c ^ (b | !d)

    macro_rules! vstep {
        ($x:ident, $n:expr, $imm:ident, $a:ident, $b:ident, $c:ident, $d:ident) => {{
            const N: usize = $n;
            let xt = _mm_set1_epi32($x[word_index(N)].wrapping_add(T[N]) as i32);
            let f = _mm_ternarylogic_epi32::<$imm>($b, $c, $d);
            let t = _mm_add_epi32(_mm_add_epi32($a, xt), f);
            $a = _mm_add_epi32($b, _mm_rol_epi32::<{ shift(N) as i32 }>(t));
        }};
    }

    macro_rules! vround {
        ($x:ident, $base:expr, $imm:ident, $a:ident, $b:ident, $c:ident, $d:ident) => {{
            vstep!($x, $base, $imm, $a, $b, $c, $d);
            vstep!($x, $base + 1, $imm, $d, $a, $b, $c);
            vstep!($x, $base + 2, $imm, $c, $d, $a, $b);
            vstep!($x, $base + 3, $imm, $b, $c, $d, $a);
            vstep!($x, $base + 4, $imm, $a, $b, $c, $d);
            vstep!($x, $base + 5, $imm, $d, $a, $b, $c);
            vstep!($x, $base + 6, $imm, $c, $d, $a, $b);
            vstep!($x, $base + 7, $imm, $b, $c, $d, $a);
            vstep!($x, $base + 8, $imm, $a, $b, $c, $d);
            vstep!($x, $base + 9, $imm, $d, $a, $b, $c);
            vstep!($x, $base + 10, $imm, $c, $d, $a, $b);
            vstep!($x, $base + 11, $imm, $b, $c, $d, $a);
            vstep!($x, $base + 12, $imm, $a, $b, $c, $d);
            vstep!($x, $base + 13, $imm, $d, $a, $b, $c);
            vstep!($x, $base + 14, $imm, $c, $d, $a, $b);
            vstep!($x, $base + 15, $imm, $b, $c, $d, $a);
        }};
    }

    /// # Safety
    /// The CPU must support AVX-512F and AVX-512VL ([`available`]).
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn compress2(s1: &mut [u32; 4], s2: &mut [u32; 4], block: &[u8; 64]) {
        let x = super::load(block);
        let lanes = |i: usize| _mm_set_epi32(0, 0, s2[i] as i32, s1[i] as i32);
        let (a0, b0, c0, d0) = (lanes(0), lanes(1), lanes(2), lanes(3));
        let (mut a, mut b, mut c, mut d) = (a0, b0, c0, d0);
        vround!(x, 0, F, a, b, c, d);
        vround!(x, 16, G, a, b, c, d);
        vround!(x, 32, H, a, b, c, d);
        vround!(x, 48, I, a, b, c, d);
        let out = [
            _mm_add_epi32(a, a0),
            _mm_add_epi32(b, b0),
            _mm_add_epi32(c, c0),
            _mm_add_epi32(d, d0),
        ];
        for (i, v) in out.into_iter().enumerate() {
            s1[i] = _mm_extract_epi32::<0>(v) as u32;
            s2[i] = _mm_extract_epi32::<1>(v) as u32;
        }
    }

    macro_rules! ystep {
        ($x:ident, $n:expr, $imm:ident, $a:ident, $b:ident, $c:ident, $d:ident) => {{
            const N: usize = $n;
            let xt = _mm256_add_epi32($x[word_index(N)], _mm256_set1_epi32(T[N] as i32));
            let f = _mm256_ternarylogic_epi32::<$imm>($b, $c, $d);
            let t = _mm256_add_epi32(_mm256_add_epi32($a, xt), f);
            $a = _mm256_add_epi32($b, _mm256_rol_epi32::<{ shift(N) as i32 }>(t));
        }};
    }

    macro_rules! yround {
        ($x:ident, $base:expr, $imm:ident, $a:ident, $b:ident, $c:ident, $d:ident) => {{
            ystep!($x, $base, $imm, $a, $b, $c, $d);
            ystep!($x, $base + 1, $imm, $d, $a, $b, $c);
            ystep!($x, $base + 2, $imm, $c, $d, $a, $b);
            ystep!($x, $base + 3, $imm, $b, $c, $d, $a);
            ystep!($x, $base + 4, $imm, $a, $b, $c, $d);
            ystep!($x, $base + 5, $imm, $d, $a, $b, $c);
            ystep!($x, $base + 6, $imm, $c, $d, $a, $b);
            ystep!($x, $base + 7, $imm, $b, $c, $d, $a);
            ystep!($x, $base + 8, $imm, $a, $b, $c, $d);
            ystep!($x, $base + 9, $imm, $d, $a, $b, $c);
            ystep!($x, $base + 10, $imm, $c, $d, $a, $b);
            ystep!($x, $base + 11, $imm, $b, $c, $d, $a);
            ystep!($x, $base + 12, $imm, $a, $b, $c, $d);
            ystep!($x, $base + 13, $imm, $d, $a, $b, $c);
            ystep!($x, $base + 14, $imm, $c, $d, $a, $b);
            ystep!($x, $base + 15, $imm, $b, $c, $d, $a);
        }};
    }

    /// Transposes eight rows of eight words: word `w` of row `r` becomes word `r` of row `w`.
    #[target_feature(enable = "avx512f,avx512vl")]
    fn transpose8(r: [__m256i; 8]) -> [__m256i; 8] {
        let t0 = _mm256_unpacklo_epi32(r[0], r[1]);
        let t1 = _mm256_unpackhi_epi32(r[0], r[1]);
        let t2 = _mm256_unpacklo_epi32(r[2], r[3]);
        let t3 = _mm256_unpackhi_epi32(r[2], r[3]);
        let t4 = _mm256_unpacklo_epi32(r[4], r[5]);
        let t5 = _mm256_unpackhi_epi32(r[4], r[5]);
        let t6 = _mm256_unpacklo_epi32(r[6], r[7]);
        let t7 = _mm256_unpackhi_epi32(r[6], r[7]);
        let u0 = _mm256_unpacklo_epi64(t0, t2);
        let u1 = _mm256_unpackhi_epi64(t0, t2);
        let u2 = _mm256_unpacklo_epi64(t1, t3);
        let u3 = _mm256_unpackhi_epi64(t1, t3);
        let u4 = _mm256_unpacklo_epi64(t4, t6);
        let u5 = _mm256_unpackhi_epi64(t4, t6);
        let u6 = _mm256_unpacklo_epi64(t5, t7);
        let u7 = _mm256_unpackhi_epi64(t5, t7);
        [
            _mm256_permute2x128_si256::<0x20>(u0, u4),
            _mm256_permute2x128_si256::<0x20>(u1, u5),
            _mm256_permute2x128_si256::<0x20>(u2, u6),
            _mm256_permute2x128_si256::<0x20>(u3, u7),
            _mm256_permute2x128_si256::<0x31>(u0, u4),
            _mm256_permute2x128_si256::<0x31>(u1, u5),
            _mm256_permute2x128_si256::<0x31>(u2, u6),
            _mm256_permute2x128_si256::<0x31>(u3, u7),
        ]
    }

    /// Eight independent states, each over `nblocks` blocks of its own data: one register
    /// per working variable holds all eight, so the eight chains cost about what one does.
    ///
    /// # Safety
    /// The CPU must support AVX-512F and AVX-512VL ([`available`]).
    #[target_feature(enable = "avx512f,avx512vl")]
    pub unsafe fn compress8(states: &mut [[u32; 4]; 8], data: [&[u8]; 8], nblocks: usize) {
        if data.iter().any(|d| d.len() / 64 < nblocks) {
            return;
        }
        let mut cols = [[0u32; 8]; 4];
        for (lane, st) in states.iter().enumerate() {
            for (k, v) in st.iter().enumerate() {
                cols[k][lane] = *v;
            }
        }
        // SAFETY: each `cols[k]` is 32 bytes.
        let load = |c: &[u32; 8]| unsafe { _mm256_loadu_si256(c.as_ptr().cast()) };
        let (mut a, mut b, mut c, mut d) = (
            load(&cols[0]),
            load(&cols[1]),
            load(&cols[2]),
            load(&cols[3]),
        );
        for blk in 0..nblocks {
            let off = blk * 64;
            let mut lo = [_mm256_setzero_si256(); 8];
            let mut hi = [_mm256_setzero_si256(); 8];
            for lane in 0..8 {
                let block = &data[lane][off..off + 64];
                // SAFETY: `block` is 64 bytes; the loads are unaligned.
                unsafe {
                    lo[lane] = _mm256_loadu_si256(block.as_ptr().cast());
                    hi[lane] = _mm256_loadu_si256(block.as_ptr().add(32).cast());
                }
            }
            let (lo, hi) = (transpose8(lo), transpose8(hi));
            let x = [
                lo[0], lo[1], lo[2], lo[3], lo[4], lo[5], lo[6], lo[7], hi[0], hi[1], hi[2], hi[3],
                hi[4], hi[5], hi[6], hi[7],
            ];
            let (a0, b0, c0, d0) = (a, b, c, d);
            yround!(x, 0, F, a, b, c, d);
            yround!(x, 16, G, a, b, c, d);
            yround!(x, 32, H, a, b, c, d);
            yround!(x, 48, I, a, b, c, d);
            a = _mm256_add_epi32(a, a0);
            b = _mm256_add_epi32(b, b0);
            c = _mm256_add_epi32(c, c0);
            d = _mm256_add_epi32(d, d0);
        }
        for (k, v) in [a, b, c, d].into_iter().enumerate() {
            // SAFETY: each `cols[k]` is 32 bytes.
            unsafe { _mm256_storeu_si256(cols[k].as_mut_ptr().cast(), v) };
        }
        for (lane, st) in states.iter_mut().enumerate() {
            for (k, v) in st.iter_mut().enumerate() {
                *v = cols[k][lane];
            }
        }
    }
}

/// How many states [`compress_lanes`] advances in one pass over their blocks.
pub const LANES: usize = 8;

/// Advances `states[i]` over the first `nblocks` 64-byte blocks of `data[i]`, for every lane
/// at once (lanes may share their data, as a part and its whole file do). Independent chains
/// run side by side in vector registers, so up to [`LANES`] digests cost about what one does.
/// Lanes without `nblocks` whole blocks, and states without data, are left as they are.
pub fn compress_lanes(states: &mut [[u32; 4]], data: &[&[u8]], nblocks: usize) {
    let n = states.len().min(data.len());
    if n == 0 || nblocks == 0 || data[..n].iter().any(|d| d.len() / 64 < nblocks) {
        return;
    }
    let block = |d: &[u8], k: usize| -> [u8; 64] {
        let mut b = [0u8; 64];
        b.copy_from_slice(&d[k * 64..k * 64 + 64]);
        b
    };
    let mut lane = 0;
    while lane < n {
        let left = n - lane;
        #[cfg(target_arch = "x86_64")]
        if (left > 2 || (left == 2 && !std::ptr::eq(data[lane], data[lane + 1])))
            && simd::available()
        {
            let take = left.min(LANES);
            let mut st = [INIT; LANES];
            st[..take].copy_from_slice(&states[lane..lane + take]);
            // Unused lanes hash the first lane's bytes again; their states are dropped.
            let mut d = [data[lane]; LANES];
            d[..take].copy_from_slice(&data[lane..lane + take]);
            // SAFETY: `available` checked that the CPU has AVX-512F and AVX-512VL.
            unsafe { simd::compress8(&mut st, d, nblocks) };
            states[lane..lane + take].copy_from_slice(&st[..take]);
            lane += take;
            continue;
        }
        if left >= 2 && std::ptr::eq(data[lane], data[lane + 1]) {
            let (s1, s2) = states[lane..lane + 2].split_at_mut(1);
            for k in 0..nblocks {
                compress2(&mut s1[0], &mut s2[0], &block(data[lane], k));
            }
            lane += 2;
        } else {
            for k in 0..nblocks {
                compress1(&mut states[lane], &block(data[lane], k));
            }
            lane += 1;
        }
    }
}

/// Finishes a state that has consumed `len - tail.len()` bytes, with `tail` still pending.
fn finish(mut state: [u32; 4], tail: &[u8], len: u64) -> [u8; 16] {
    let mut block = [0u8; 128];
    block[..tail.len()].copy_from_slice(tail);
    block[tail.len()] = 0x80;
    let total = if tail.len() < 56 { 64 } else { 128 };
    block[total - 8..total].copy_from_slice(&(len.wrapping_mul(8)).to_le_bytes());
    for chunk in block[..total].chunks_exact(64) {
        let mut b = [0u8; 64];
        b.copy_from_slice(chunk);
        compress1(&mut state, &b);
    }
    let mut out = [0u8; 16];
    for (o, w) in out.chunks_exact_mut(4).zip(state) {
        o.copy_from_slice(&w.to_le_bytes());
    }
    out
}

/// A single MD5 (for objects of one part, whose part MD5 is the whole file's).
#[derive(Clone)]
pub struct Single {
    state: [u32; 4],
    buf: [u8; 64],
    buf_len: usize,
    len: u64,
}

impl Default for Single {
    fn default() -> Self {
        Self::new()
    }
}

impl Single {
    pub fn new() -> Self {
        Single {
            state: INIT,
            buf: [0; 64],
            buf_len: 0,
            len: 0,
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.buf_len > 0 {
            let take = (64 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 64 {
                return;
            }
            let b = self.buf;
            compress1(&mut self.state, &b);
            self.buf_len = 0;
        }
        let mut blocks = data.chunks_exact(64);
        for blk in &mut blocks {
            let mut b = [0u8; 64];
            b.copy_from_slice(blk);
            compress1(&mut self.state, &b);
        }
        let rest = blocks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    pub fn finish(&self) -> [u8; 16] {
        finish(self.state, &self.buf[..self.buf_len], self.len)
    }

    /// The state, when all the bytes fed so far filled whole blocks (none pending), so that
    /// more whole blocks can be run elsewhere ([`compress_lanes`]).
    pub fn aligned_state(&self) -> Option<[u32; 4]> {
        (self.buf_len == 0).then_some(self.state)
    }

    /// Takes `state`: [`Self::aligned_state`] run over `nbytes` more bytes of whole blocks.
    /// Refused (false, nothing changed) unless the hash was aligned and `nbytes` is whole blocks.
    pub fn advance_aligned(&mut self, state: [u32; 4], nbytes: u64) -> bool {
        if self.buf_len != 0 || !nbytes.is_multiple_of(64) {
            return false;
        }
        self.state = state;
        self.len += nbytes;
        true
    }
}

/// MD5 of the current part and of everything so far, in one pass.
#[derive(Clone)]
pub struct Md5Pair {
    whole: Single,
    /// The part's state while it is in step with `whole` (same pending bytes).
    part: [u32; 4],
    part_len: u64,
    /// Set once a part ended inside a block: from then on the part runs on its own.
    part_alone: Option<Single>,
}

impl Default for Md5Pair {
    fn default() -> Self {
        Self::new()
    }
}

impl Md5Pair {
    pub fn new() -> Md5Pair {
        Md5Pair {
            whole: Single::new(),
            part: INIT,
            part_len: 0,
            part_alone: None,
        }
    }

    /// Feeds `data` to both the current part and the whole.
    pub fn update(&mut self, mut data: &[u8]) {
        if let Some(p) = self.part_alone.as_mut() {
            p.update(data);
            self.whole.update(data);
            return;
        }
        self.part_len += data.len() as u64;
        let w = &mut self.whole;
        w.len += data.len() as u64;
        if w.buf_len > 0 {
            let take = (64 - w.buf_len).min(data.len());
            w.buf[w.buf_len..w.buf_len + take].copy_from_slice(&data[..take]);
            w.buf_len += take;
            data = &data[take..];
            if w.buf_len < 64 {
                return;
            }
            let b = w.buf;
            compress2(&mut w.state, &mut self.part, &b);
            w.buf_len = 0;
        }
        let mut blocks = data.chunks_exact(64);
        for blk in &mut blocks {
            let mut b = [0u8; 64];
            b.copy_from_slice(blk);
            compress2(&mut w.state, &mut self.part, &b);
        }
        let rest = blocks.remainder();
        w.buf[..rest.len()].copy_from_slice(rest);
        w.buf_len = rest.len();
    }

    /// The current part's MD5; the next bytes start a new part.
    pub fn finish_part(&mut self) -> [u8; 16] {
        let digest = match self.part_alone.take() {
            Some(p) => p.finish(),
            None => finish(
                self.part,
                &self.whole.buf[..self.whole.buf_len],
                self.part_len,
            ),
        };
        self.part = INIT;
        self.part_len = 0;
        if self.whole.buf_len != 0 {
            // The next part starts inside a block: it cannot share blocks with the whole.
            self.part_alone = Some(Single::new());
        }
        digest
    }

    /// The MD5 of everything fed so far.
    pub fn finish_whole(&self) -> [u8; 16] {
        self.whole.finish()
    }

    /// The whole file's and the part's states, when both are in step and no bytes are
    /// pending, so that more whole blocks can be run elsewhere ([`compress_lanes`], two lanes
    /// over the same bytes).
    pub fn aligned_states(&self) -> Option<[[u32; 4]; 2]> {
        (self.part_alone.is_none() && self.whole.buf_len == 0)
            .then_some([self.whole.state, self.part])
    }

    /// Takes `states`: [`Self::aligned_states`] run over `nbytes` more bytes of whole blocks.
    /// Refused (false, nothing changed) unless the pair was aligned and `nbytes` is whole blocks.
    pub fn advance_aligned(&mut self, states: [[u32; 4]; 2], nbytes: u64) -> bool {
        if self.part_alone.is_some() || !self.whole.advance_aligned(states[0], nbytes) {
            return false;
        }
        self.part = states[1];
        self.part_len += nbytes;
        true
    }
}

/// MD5 of a byte slice (this module's implementation; used by the tests and benchmarks).
pub fn md5(data: &[u8]) -> [u8; 16] {
    let mut s = Single::new();
    s.update(data);
    s.finish()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use md5::{Digest, Md5};

    /// The `md-5` crate's digest, to check against.
    pub(crate) fn reference(data: &[u8]) -> [u8; 16] {
        Md5::digest(data).into()
    }

    /// Deterministic pseudo-random bytes.
    pub(crate) fn data(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn vector_and_scalar_compressions_agree() {
        for seed in 0..200u64 {
            let d = data(64, seed + 1);
            let mut block = [0u8; 64];
            block.copy_from_slice(&d);
            let (mut a1, mut a2) = (INIT, [seed as u32, 1, 2, 3]);
            let (mut b1, mut b2) = (a1, a2);
            compress2(&mut a1, &mut a2, &block);
            compress2_scalar(&mut b1, &mut b2, &block);
            assert_eq!((a1, a2), (b1, b2));
            let (mut c, mut e) = (b2, b2);
            compress1(&mut c, &block);
            compress1_scalar(&mut e, &block);
            assert_eq!(c, e);
        }
    }

    #[test]
    fn lanes_match_one_state_at_a_time() {
        for n in 1..=19usize {
            let blocks = 1 + n % 4;
            let owned: Vec<Vec<u8>> = (0..n)
                .map(|i| data(64 * blocks + i, (n * 31 + i) as u64))
                .collect();
            let mut lanes: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
            // Neighbours sharing their bytes, as a part and its whole file do.
            for i in (1..n).step_by(3) {
                lanes[i] = lanes[i - 1];
            }
            let mut states: Vec<[u32; 4]> =
                (0..n as u32).map(|i| [i, 7 * i, INIT[2], !i]).collect();
            let mut want = states.clone();
            for (st, d) in want.iter_mut().zip(&lanes) {
                for k in 0..blocks {
                    let mut b = [0u8; 64];
                    b.copy_from_slice(&d[k * 64..k * 64 + 64]);
                    compress1_scalar(st, &b);
                }
            }
            compress_lanes(&mut states, &lanes, blocks);
            assert_eq!(states, want, "{n} lanes");
        }
    }

    #[test]
    fn lanes_refuse_short_data() {
        let d = data(128, 3);
        let mut states = [INIT; 3];
        compress_lanes(&mut states, &[&d, &d, &d[..64]], 2);
        assert_eq!(states, [INIT; 3]);
    }

    #[test]
    fn aligned_hashing_elsewhere_gives_the_same_digests() {
        let d = data(3 * 4096 + 100, 11);
        let aligned = d.len() / 64 * 64;
        let mut s = Single::new();
        let mut st = [s.aligned_state().unwrap()];
        compress_lanes(&mut st, &[&d], aligned / 64);
        assert!(s.advance_aligned(st[0], aligned as u64));
        s.update(&d[aligned..]);
        assert_eq!(s.finish(), reference(&d));
        assert!(s.aligned_state().is_none());
        assert!(!s.advance_aligned(INIT, 64));

        let mut pair = Md5Pair::new();
        let (a, b) = d.split_at(4096);
        let mut st = pair.aligned_states().unwrap();
        compress_lanes(&mut st, &[a, a], a.len() / 64);
        assert!(pair.advance_aligned(st, a.len() as u64));
        assert_eq!(pair.finish_part(), reference(a));
        pair.update(b);
        assert_eq!(pair.finish_part(), reference(b));
        assert_eq!(pair.finish_whole(), reference(&d));
        assert!(!pair.advance_aligned([INIT; 2], 7));
    }

    #[test]
    fn known_answers() {
        // RFC 1321 test suite.
        let cases: [(&str, &str); 4] = [
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
            (
                "12345678901234567890123456789012345678901234567890123456789012345678901234567890",
                "57edf4a22be3c955ac49da2e2107b67a",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(hex::encode(md5(input.as_bytes())), want);
        }
    }

    #[test]
    fn single_matches_reference_for_every_length_and_split() {
        for len in 0..300 {
            let d = data(len, len as u64 + 7);
            assert_eq!(md5(&d), reference(&d), "len {len}");
            let mut s = Single::new();
            let (a, b) = d.split_at(len / 3);
            s.update(a);
            s.update(b);
            assert_eq!(s.finish(), reference(&d), "split len {len}");
        }
    }

    #[test]
    fn pair_matches_reference_with_aligned_and_unaligned_parts() {
        for (total, part, chunk) in [
            (0usize, 64usize, 7usize),
            (1000, 128, 13),
            (4096, 1024, 1000),
            (5000, 1024, 333),
            (777, 100, 50), // parts end inside blocks
            (65 * 3, 65, 64),
            (3 * 1024 * 1024 + 17, 1024 * 1024, 512 * 1024),
        ] {
            let d = data(total, total as u64 + part as u64);
            let mut pair = Md5Pair::new();
            let mut parts = Vec::new();
            for p in d.chunks(part) {
                for c in p.chunks(chunk) {
                    pair.update(c);
                }
                parts.push(pair.finish_part());
            }
            assert_eq!(pair.finish_whole(), reference(&d), "whole {total}/{part}");
            for (k, p) in d.chunks(part).enumerate() {
                assert_eq!(parts[k], reference(p), "part {k} of {total}/{part}");
            }
        }
    }
}
