//! A buffer of whole pages aligned to the page size: what direct I/O needs of the memory it writes
//! from (see [`crate::direct`]). Producers stage their pages in one, so that a run of pages can go
//! to the disk without a copy.

use std::ops::{Deref, DerefMut};

use crate::guest::PAGE_SIZE;

/// One page, aligned to its size. `repr(C)` over a byte array of its alignment: no padding, so a
/// slice of them is a slice of bytes.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct AlignedPage([u8; PAGE_SIZE]);

// The alignment above is written out (attributes take no constants): keep it the page size.
const _: () = assert!(std::mem::align_of::<AlignedPage>() == PAGE_SIZE);
const _: () = assert!(std::mem::size_of::<AlignedPage>() == PAGE_SIZE);

/// A zeroed, page-aligned buffer of a fixed number of pages, used as a byte slice.
pub(crate) struct PageBuf {
    pages: Box<[AlignedPage]>,
}

impl PageBuf {
    /// `pages` zeroed pages.
    pub(crate) fn zeroed(pages: usize) -> Self {
        PageBuf {
            pages: vec![AlignedPage([0; PAGE_SIZE]); pages].into_boxed_slice(),
        }
    }
}

impl Deref for PageBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `pages` is one allocation of `len` initialised `AlignedPage`s, each exactly
        // PAGE_SIZE bytes with no padding (asserted above), so it is `len * PAGE_SIZE` initialised
        // bytes; u8 has no alignment needs, and the borrow of `self` keeps it alive and unshared
        // for the slice's lifetime.
        unsafe { std::slice::from_raw_parts(self.pages.as_ptr().cast::<u8>(), self.pages.len() * PAGE_SIZE) }
    }
}

impl DerefMut for PageBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; the exclusive borrow of `self` makes the slice the only access,
        // and any byte pattern is a valid `AlignedPage`.
        unsafe {
            std::slice::from_raw_parts_mut(self.pages.as_mut_ptr().cast::<u8>(), self.pages.len() * PAGE_SIZE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroed_aligned_and_writable() {
        let mut buf = PageBuf::zeroed(3);
        assert_eq!(buf.len(), 3 * PAGE_SIZE);
        assert_eq!(buf.as_ptr().align_offset(PAGE_SIZE), 0);
        assert!(buf.iter().all(|&b| b == 0));
        buf[PAGE_SIZE + 1] = 7;
        assert_eq!(buf[PAGE_SIZE..][..2], [0, 7]);
        assert!(PageBuf::zeroed(0).is_empty());
    }
}
