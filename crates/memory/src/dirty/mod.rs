//! Dirty-page sources: what tells the save engine which pages changed since it last copied them.

mod content;
mod uffd;

pub use content::ContentCompare;
pub use uffd::UffdWriteProtect;

use crate::error::Result;
use crate::guest::GuestMemory;
use crate::table::{DirtySet, PageTable};

/// A way of finding the pages written since the last look.
///
/// The engine calls `start` once, then `collect` once per round (the first `collect` after `start`
/// returns every page: nothing has been copied yet), then `stop`. A page written at any time after a
/// `collect` returned must be in a later `collect`'s set.
pub trait DirtySource: Send + Sync {
    /// Short name for statistics and errors.
    fn name(&self) -> &'static str;
    /// Begins tracking writes to `mem`.
    fn start(&mut self, mem: &GuestMemory) -> Result<()>;
    /// Returns the pages written since the previous collect, and restarts tracking from now.
    /// `saved` is the state and checksum of every page as last copied.
    fn collect(&mut self, mem: &GuestMemory, saved: &PageTable) -> Result<DirtySet>;
    /// Stops tracking.
    fn stop(&mut self, mem: &GuestMemory) -> Result<()>;
}

/// Every page, every time: for a save of a paused domain, and as an oracle in tests.
#[derive(Debug, Default, Clone, Copy)]
pub struct Everything;

impl DirtySource for Everything {
    fn name(&self) -> &'static str {
        "everything"
    }
    fn start(&mut self, _mem: &GuestMemory) -> Result<()> {
        Ok(())
    }
    fn collect(&mut self, mem: &GuestMemory, _saved: &PageTable) -> Result<DirtySet> {
        Ok(DirtySet::full(mem.total_pages()))
    }
    fn stop(&mut self, _mem: &GuestMemory) -> Result<()> {
        Ok(())
    }
}
