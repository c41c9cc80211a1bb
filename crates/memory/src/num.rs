//! Conversions between `u64` (page numbers, file offsets, guest sizes) and `usize` (lengths and
//! indices of in-memory buffers).
//!
//! domsnap runs on 64-bit Linux hosts only (guest RAM is mapped into the address space whole),
//! where both types have the same width: these conversions are lossless, checked once at
//! compile time below instead of at every use.

const _: () = assert!(usize::BITS == u64::BITS, "domsnap supports 64-bit targets only");

/// `n` as a `usize`: lossless on the 64-bit targets this crate builds for.
#[inline]
#[allow(
    clippy::cast_possible_truncation,
    reason = "usize is 64 bits wide (checked above)"
)]
pub(crate) const fn to_usize(n: u64) -> usize {
    n as usize
}

/// `n` as a `u64`: lossless on the 64-bit targets this crate builds for.
#[inline]
pub(crate) const fn to_u64(n: usize) -> u64 {
    n as u64
}
