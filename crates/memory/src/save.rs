//! The save engine: a paused save, and the live (iterative pre-copy) session the orchestrator drives.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use crate::dirty::{DirtySource, Everything};
use crate::error::Result;
use crate::guest::{GuestMemory, PAGE, PAGE_SIZE};
use crate::image::PageSink;
use crate::num::{to_u64, to_usize};
use crate::page_buf::PageBuf;
use crate::par;
use crate::table::{is_zero, page_hash, set_bits, DirtySet, PageState, PageTable, CHUNK_PAGES, CHUNK_WORDS};

/// Pages a worker stages before it must write (512 KiB: stays in L2).
const STAGE_PAGES: usize = 128;

/// When pre-copy should stop and the orchestrator should pause the domain and call
/// [`LiveSave::finish`]. Any one condition stops it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvergencePolicy {
    /// Stop after this many rounds (round 0 included).
    pub max_rounds: u32,
    /// Stop when a round found at most this many dirty pages.
    pub dirty_page_threshold: u64,
    /// Stop when the estimated final pause is at most this.
    pub max_pause: Duration,
    /// Stop when a round found no fewer dirty pages than the one before (the guest dirties as fast as
    /// we copy; more rounds would not shorten the pause).
    pub stop_when_not_shrinking: bool,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        ConvergencePolicy {
            max_rounds: 30,
            dirty_page_threshold: 64,
            max_pause: Duration::from_millis(50),
            stop_when_not_shrinking: true,
        }
    }
}

/// Why pre-copy stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// [`ConvergencePolicy::max_rounds`] reached.
    MaxRounds,
    /// Few enough dirty pages.
    FewDirtyPages,
    /// The estimated final pause is short enough.
    PauseWithinTarget,
    /// Rounds stopped shrinking.
    NotShrinking,
}

/// What one round did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundStats {
    /// Round number; round 0 copies every non-zero page.
    pub round: u32,
    /// Whether this was the final round, run with the domain paused.
    pub final_round: bool,
    /// Pages the dirty source examined (the whole memory).
    pub pages_scanned: u64,
    /// Pages the source reported dirty.
    pub pages_dirty: u64,
    /// Non-zero pages written to the sink.
    pub pages_written: u64,
    /// Pages saved earlier that became zero.
    pub pages_zeroed: u64,
    /// Page bytes written to the sink.
    pub bytes_written: u64,
    /// Time spent finding dirty pages.
    pub collect_time: Duration,
    /// Time spent copying them.
    pub copy_time: Duration,
    /// Whole round.
    pub duration: Duration,
    /// Bytes dirtied per second since the previous round's collect (0 for round 0).
    pub dirty_rate: f64,
}

/// A callback given each round's statistics.
pub type Progress<'a> = Box<dyn FnMut(&RoundStats) + Send + 'a>;

/// Options for [`LiveSave::begin`].
#[derive(Default)]
pub struct SaveOptions<'a> {
    /// When pre-copy should stop.
    pub policy: ConvergencePolicy,
    /// Called after every round, with its statistics.
    pub progress: Option<Progress<'a>>,
}

impl fmt::Debug for SaveOptions<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SaveOptions")
            .field("policy", &self.policy)
            .field("progress", &self.progress.as_ref().map(|_| "callback"))
            .finish()
    }
}

/// A live save in progress: round 0 has copied every non-zero page; each [`LiveSave::round`] re-copies
/// what was dirtied since; [`LiveSave::finish`], called once the orchestrator has paused the domain,
/// copies the last dirty pages.
///
/// Memory used: the page table (9 bytes per guest page), one dirty bitmap (1 bit per page) and a
/// 512 KiB staging buffer per core; never a copy of guest RAM.
pub struct LiveSave<'a> {
    mem: &'a GuestMemory,
    source: Box<dyn DirtySource + 'a>,
    sink: Box<dyn PageSink + 'a>,
    table: PageTable,
    options: SaveOptions<'a>,
    rounds: Vec<RoundStats>,
    /// Dirty pages of a round that failed part-way, merged into the next so none are lost.
    pending: Option<DirtySet>,
    last_collect: Option<Instant>,
}

impl fmt::Debug for LiveSave<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LiveSave")
            .field("source", &self.source.name())
            .field("rounds", &self.rounds.len())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl<'a> LiveSave<'a> {
    /// Starts tracking with `source` and runs round 0 (every non-zero page into `sink`).
    pub fn begin(
        mem: &'a GuestMemory,
        mut source: Box<dyn DirtySource + 'a>,
        sink: Box<dyn PageSink + 'a>,
        options: SaveOptions<'a>,
    ) -> Result<Self> {
        sink.layout().check_matches(mem)?;
        let table = PageTable::new(mem.total_pages(), sink.layout().seed());
        source.start(mem)?;
        let mut save = LiveSave {
            mem,
            source,
            sink,
            table,
            options,
            rounds: Vec::new(),
            pending: None,
            last_collect: None,
        };
        save.run_round(false)?;
        Ok(save)
    }

    /// Re-copies the pages dirtied since the previous round.
    pub fn round(&mut self) -> Result<&RoundStats> {
        self.run_round(false)?;
        Ok(self.rounds.last().expect("a round just ran"))
    }

    /// Statistics of every round so far.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    /// Estimated duration of [`LiveSave::finish`] if called now: the last round's time to find dirty
    /// pages plus its dirty pages at the measured copy speed.
    pub fn estimated_pause(&self) -> Duration {
        let Some(last) = self.rounds.last() else {
            return Duration::ZERO;
        };
        let per_page_secs = self
            .rounds
            .iter()
            .rev()
            .find(|r| r.pages_dirty > 0)
            .map_or(0.0, |r| r.copy_time.as_secs_f64() / r.pages_dirty as f64);
        last.collect_time + Duration::from_secs_f64(per_page_secs * last.pages_dirty as f64)
    }

    /// Whether the policy says to stop pre-copy now, and why. Never after round 0 alone except for
    /// the round limit: round 0 copies everything and says nothing about the guest's dirty rate.
    pub fn converged(&self) -> Option<StopReason> {
        let policy = &self.options.policy;
        let last = self.rounds.last()?;
        if last.round + 1 >= policy.max_rounds {
            return Some(StopReason::MaxRounds);
        }
        if last.round == 0 {
            return None;
        }
        if last.pages_dirty <= policy.dirty_page_threshold {
            return Some(StopReason::FewDirtyPages);
        }
        if self.estimated_pause() <= policy.max_pause {
            return Some(StopReason::PauseWithinTarget);
        }
        match self.rounds.as_slice() {
            [.., prev, last]
                if policy.stop_when_not_shrinking
                    && prev.round > 0
                    && last.pages_dirty >= prev.pages_dirty =>
            {
                Some(StopReason::NotShrinking)
            }
            _ => None,
        }
    }

    /// Runs rounds until [`LiveSave::converged`] says to stop.
    pub fn precopy(&mut self) -> Result<StopReason> {
        loop {
            if let Some(reason) = self.converged() {
                return Ok(reason);
            }
            self.run_round(false)?;
        }
    }

    /// Final round: copies the pages dirtied since the last round. Call it only after pausing the
    /// domain. Its duration is the domain's pause for memory; the domain may be resumed (or its device
    /// state saved) before [`Finished::seal`], which also stops tracking (unregistering write-protection
    /// from 1 GiB takes milliseconds that need not be paused time). On error the save is abandoned
    /// (an image file's temporary is removed): resume the domain and start again.
    pub fn finish(mut self) -> Result<Finished<'a>> {
        self.run_round(true)?;
        Ok(self.into_finished())
    }

    fn into_finished(self) -> Finished<'a> {
        Finished {
            mem: self.mem,
            source: self.source,
            sink: self.sink,
            table: self.table,
            rounds: self.rounds,
        }
    }

    fn run_round(&mut self, final_round: bool) -> Result<()> {
        let started = Instant::now();
        let mut dirty = self.source.collect(self.mem, &self.table)?;
        let collect_time = started.elapsed();
        if let Some(pending) = self.pending.take() {
            dirty.union_with(&pending);
        }
        let copy_started = Instant::now();
        let (written, zeroed) = match copy_dirty(self.mem, &dirty, &mut self.table, &*self.sink) {
            Ok(counts) => counts,
            Err(e) => {
                self.pending = Some(dirty);
                return Err(e);
            }
        };
        let pages_dirty = dirty.count();
        let interval = self.last_collect.map(|t| started.duration_since(t).as_secs_f64());
        self.last_collect = Some(started);
        let stats = RoundStats {
            // Rounds are bounded by the convergence policy, far below u32::MAX.
            round: u32::try_from(self.rounds.len()).unwrap_or(u32::MAX),
            final_round,
            pages_scanned: self.mem.total_pages(),
            pages_dirty,
            pages_written: written,
            pages_zeroed: zeroed,
            bytes_written: written * PAGE,
            collect_time,
            copy_time: copy_started.elapsed(),
            duration: started.elapsed(),
            dirty_rate: interval
                .filter(|&s| s > 0.0)
                .map_or(0.0, |s| (pages_dirty * PAGE) as f64 / s),
        };
        if let Some(progress) = self.options.progress.as_mut() {
            progress(&stats);
        }
        self.rounds.push(stats);
        Ok(())
    }
}

/// A save whose last pages are copied; the domain may run again. [`Finished::seal`] completes the image.
pub struct Finished<'a> {
    mem: &'a GuestMemory,
    source: Box<dyn DirtySource + 'a>,
    sink: Box<dyn PageSink + 'a>,
    table: PageTable,
    rounds: Vec<RoundStats>,
}

impl fmt::Debug for Finished<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Finished")
            .field("rounds", &self.rounds)
            .finish_non_exhaustive()
    }
}

/// Summary of a completed save.
#[derive(Debug, Clone, PartialEq)]
pub struct SaveSummary {
    /// Every round's statistics; the last one ran with the domain paused.
    pub rounds: Vec<RoundStats>,
    /// Pages in the memory.
    pub total_pages: u64,
    /// Non-zero pages in the image.
    pub present_pages: u64,
}

impl SaveSummary {
    /// Duration of the last round: how long the domain had to be paused for memory.
    pub fn final_pause(&self) -> Duration {
        self.rounds.last().map_or(Duration::ZERO, |r| r.duration)
    }
}

impl Finished<'_> {
    /// Statistics of every round; the last is the final (paused) one.
    pub fn rounds(&self) -> &[RoundStats] {
        &self.rounds
    }

    /// Stops tracking, writes the page table and marks the image complete (for a file: fsync and
    /// rename).
    pub fn seal(mut self) -> Result<SaveSummary> {
        self.source.stop(self.mem)?;
        self.sink.seal(&self.table)?;
        Ok(SaveSummary {
            total_pages: self.table.pages(),
            present_pages: self.table.present_pages(),
            rounds: self.rounds,
        })
    }
}

/// Saves `mem` of a paused domain into `sink` and seals it: one pass over memory, zero pages skipped.
pub fn save_paused(mem: &GuestMemory, sink: Box<dyn PageSink + '_>) -> Result<SaveSummary> {
    copy_paused(mem, sink)?.seal()
}

/// The copy of [`save_paused`] without the seal: the domain may resume once this returns, and
/// the image's fsync and rename ([`Finished::seal`]) need not be paused time.
pub fn copy_paused<'a>(mem: &'a GuestMemory, sink: Box<dyn PageSink + 'a>) -> Result<Finished<'a>> {
    let mut finished =
        LiveSave::begin(mem, Box::new(Everything), sink, SaveOptions::default())?.into_finished();
    if let Some(only) = finished.rounds.first_mut() {
        only.final_round = true;
    }
    Ok(finished)
}

/// A worker's staging area: copies of up to [`STAGE_PAGES`] pages (ascending, not necessarily
/// consecutive) waiting to be written, with their checksums.
struct Stage {
    /// Page-aligned, so that the sink may write runs of it direct.
    data: PageBuf,
    sums: Vec<u64>,
    pages: Vec<u64>,
    /// Which pages of the current chunk may hold data (see [`crate::Region`]'s `data_map`).
    data_map: Vec<u8>,
}

impl Stage {
    fn new() -> Self {
        Stage {
            data: PageBuf::zeroed(STAGE_PAGES),
            sums: Vec::with_capacity(STAGE_PAGES),
            pages: Vec::with_capacity(STAGE_PAGES),
            data_map: vec![0u8; CHUNK_PAGES],
        }
    }
}

/// Copies the pages in `dirty` into `sink`, updating `table` after each successful write. Returns the
/// numbers of non-zero pages written and of pages that became zero.
fn copy_dirty(
    mem: &GuestMemory,
    dirty: &DirtySet,
    table: &mut PageTable,
    sink: &dyn PageSink,
) -> Result<(u64, u64)> {
    let (seed, zero_hash) = (table.seed(), table.zero_hash());
    let written = AtomicU64::new(0);
    let zeroed = AtomicU64::new(0);
    let io_turn = Mutex::new(());
    let (states, sums) = table.parts_mut();
    let chunks = dirty
        .words()
        .chunks(CHUNK_WORDS)
        .zip(states.chunks_mut(CHUNK_PAGES).zip(sums.chunks_mut(CHUNK_PAGES)))
        .enumerate();
    par::for_each(chunks, Stage::new, |stage, (index, (words, (states, sums)))| {
        if words.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let base = to_u64(index * CHUNK_PAGES);
        let end = base + to_u64(states.len());
        for (region, pages) in mem.segments(base..end) {
            let at = to_usize(pages.start - base)..to_usize(pages.end - base);
            region.data_map(pages, &mut stage.data_map[at]);
        }
        let mut chunk = ChunkCopy {
            mem,
            sink,
            io_turn: &io_turn,
            seed,
            zero_hash,
            base,
            states,
            sums,
            stage,
            zero_first: 0,
            zeros: 0,
            written: 0,
            zeroed: 0,
        };
        let result = set_bits(words, base).try_for_each(|page| chunk.page(page));
        let result = result
            .and_then(|()| chunk.flush_staged(true))
            .and_then(|()| chunk.flush_zeros());
        written.fetch_add(chunk.written, Ordering::Relaxed);
        zeroed.fetch_add(chunk.zeroed, Ordering::Relaxed);
        result
    })?;
    Ok((written.into_inner(), zeroed.into_inner()))
}

/// Copies the dirty pages of one chunk (ascending): stages non-zero pages and writes them in runs of
/// consecutive pages; collects pages that became zero into runs too.
///
/// Writes to one file serialise on its inode lock, so a worker that finds another one writing goes
/// on scanning and keeps staging (until its stage is full) instead of waiting for the lock.
struct ChunkCopy<'c> {
    mem: &'c GuestMemory,
    sink: &'c dyn PageSink,
    io_turn: &'c Mutex<()>,
    seed: u64,
    zero_hash: u64,
    base: u64,
    states: &'c mut [u8],
    sums: &'c mut [u64],
    stage: &'c mut Stage,
    zero_first: u64,
    zeros: u64,
    written: u64,
    zeroed: u64,
}

impl ChunkCopy<'_> {
    fn page(&mut self, page: u64) -> Result<()> {
        let mem = self.mem;
        // A hole of the RAM file is zero, and is not read (that would allocate it). Otherwise test the
        // live page first: most pages of a guest are zero and need no copy at all.
        let live = (self.stage.data_map[to_usize(page - self.base)] == 1)
            .then(|| mem.region_of_page(page).live(page..page + 1))
            .filter(|live| !is_zero(live));
        let checksum = if let Some(live) = live {
            let slot = &mut self.stage.data[self.stage.pages.len() * PAGE_SIZE..][..PAGE_SIZE];
            slot.copy_from_slice(live);
            // Decide on the copy, which cannot change any more: it is what gets written and hashed.
            (!is_zero(slot)).then(|| page_hash(self.seed, slot))
        } else {
            None
        };
        match checksum {
            Some(sum) => {
                self.stage.sums.push(sum);
                self.stage.pages.push(page);
                let staged = self.stage.pages.len();
                if staged >= STAGE_PAGES / 16 {
                    self.flush_staged(staged == STAGE_PAGES)?;
                }
            }
            None if self.states[to_usize(page - self.base)] == PageState::Present.byte() => {
                if self.zeros > 0 && self.zero_first + self.zeros != page {
                    self.flush_zeros()?;
                }
                if self.zeros == 0 {
                    self.zero_first = page;
                }
                self.zeros += 1;
            }
            None => {} // was zero, still zero
        }
        Ok(())
    }

    /// Writes the staged pages, one call per run of consecutive pages. Unless `wait`, returns at once
    /// when another worker is writing.
    fn flush_staged(&mut self, wait: bool) -> Result<()> {
        if self.stage.pages.is_empty() {
            return Ok(());
        }
        let _turn = match self.io_turn.try_lock() {
            Ok(turn) => turn,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) if wait => {
                self.io_turn.lock().unwrap_or_else(PoisonError::into_inner)
            }
            Err(TryLockError::WouldBlock) => return Ok(()),
        };
        let Stage {
            data, sums, pages, ..
        } = &mut *self.stage;
        let mut start = 0;
        while start < pages.len() {
            let mut end = start + 1;
            while end < pages.len() && pages[end] == pages[end - 1] + 1 {
                end += 1;
            }
            self.sink.write_pages(
                pages[start],
                &data[start * PAGE_SIZE..end * PAGE_SIZE],
                &sums[start..end],
            )?;
            for (&page, &sum) in pages[start..end].iter().zip(&sums[start..end]) {
                let at = to_usize(page - self.base);
                self.states[at] = PageState::Present.byte();
                self.sums[at] = sum;
            }
            self.written += to_u64(end - start);
            start = end;
        }
        pages.clear();
        sums.clear();
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        let n = to_usize(self.zeros);
        if n == 0 {
            return Ok(());
        }
        let _turn = self.io_turn.lock().unwrap_or_else(PoisonError::into_inner);
        self.sink.zero_pages(self.zero_first, self.zeros)?;
        let at = to_usize(self.zero_first - self.base);
        self.states[at..at + n].fill(PageState::Zero.byte());
        self.sums[at..at + n].fill(self.zero_hash);
        self.zeros = 0;
        self.zeroed += to_u64(n);
        Ok(())
    }
}
