//! Spreading CPU-bound work (scanning, hashing, copying) over the machine's cores with scoped threads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::error::Error;

/// Worker threads to use: one per core.
pub(crate) fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Runs `work` on every item of `items`, pulled one at a time by up to [`threads()`] workers, each
/// with its own scratch state made by `init`. Pulling rather than pre-splitting keeps cores busy when
/// items cost different amounts (dirty pages are not spread evenly). Stops at the first error and
/// returns it.
pub(crate) fn for_each<I, S, F>(items: I, init: impl Fn() -> S + Sync, work: F) -> Result<(), Error>
where
    I: Iterator + Send,
    I::Item: Send,
    F: Fn(&mut S, I::Item) -> Result<(), Error> + Sync,
{
    let queue = Mutex::new(items);
    let failed = AtomicBool::new(false);
    let first_error = Mutex::new(None);
    let worker = || {
        let mut scratch = init();
        while !failed.load(Ordering::Relaxed) {
            let item = queue.lock().unwrap_or_else(PoisonError::into_inner).next();
            let Some(item) = item else { break };
            if let Err(e) = work(&mut scratch, item) {
                failed.store(true, Ordering::Relaxed);
                first_error
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get_or_insert(e);
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads() {
            s.spawn(worker);
        }
        worker();
    });
    first_error
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
        .map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[test]
    fn runs_every_item_and_reports_an_error() {
        let sum = AtomicU64::new(0);
        for_each(
            1..=100u64,
            || (),
            |_, i| {
                sum.fetch_add(i, Ordering::Relaxed);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(sum.into_inner(), 5050);
        let err = for_each(
            0..100u64,
            || (),
            |_, i| {
                if i == 50 {
                    Err(Error::StreamTruncated { records: i })
                } else {
                    Ok(())
                }
            },
        );
        assert!(matches!(err, Err(Error::StreamTruncated { records: 50 })));
    }
}
