//! Live (pre-copy) saves: the restored memory equals the memory at `finish()`, byte for byte, and the
//! image equals what the reference builder makes of that memory.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

use common::{content_compare_save, fill_random, same_shape, snapshot, two_regions, Rng};
use memory::{
    receive_stream, reference, restore, ContentCompare, ConvergencePolicy, DirtySource, Durability, Error,
    Everything, GuestMemory, ImageLayout, ImageWriter, LiveSave, PageSink, PageTable, ReceiveOptions,
    RestoreOptions, SaveOptions, StopReason, StreamWriter, UffdWriteProtect, PAGE_SIZE,
};
use proptest::prelude::*;

fn writer(
    dir: &std::path::Path,
    mem: &GuestMemory,
    seed: u64,
) -> (std::path::PathBuf, ImageWriter, ImageLayout) {
    let path = dir.join("img");
    let layout = ImageLayout::with_seed(mem, seed);
    (
        path.clone(),
        ImageWriter::create(&path, layout.clone(), Durability::NoSync).unwrap(),
        layout,
    )
}

/// Runs a live save while a writer thread dirties memory, pauses it, finishes, and checks the image.
fn live_round_trip(source: Box<dyn DirtySource>, mem: &GuestMemory, seed: u64) {
    let dir = tempfile::tempdir().unwrap();
    let (path, sink, layout) = writer(dir.path(), mem, seed);
    let stop = AtomicBool::new(false);
    let progress_calls = Arc::new(AtomicU32::new(0));
    let calls = progress_calls.clone();
    let options = SaveOptions {
        policy: ConvergencePolicy {
            max_rounds: 4,
            ..Default::default()
        },
        progress: Some(Box::new(move |_| {
            calls.fetch_add(1, Ordering::Relaxed);
        })),
    };
    let mut save = LiveSave::begin(mem, source, Box::new(sink), options).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut rng = Rng(seed);
            let mut page = vec![0u8; PAGE_SIZE];
            while !stop.load(Ordering::Relaxed) {
                let p = rng.below(mem.total_pages());
                page.fill(if rng.below(4) == 0 { 0 } else { rng.next() as u8 });
                mem.write(mem.gpa_of_page(p), &page).unwrap();
            }
        });
        for _ in 0..3 {
            save.round().unwrap();
        }
        stop.store(true, Ordering::Relaxed);
    });
    // Paused: this is the memory the image must hold.
    let at_finish = snapshot(mem);
    let finished = save.finish().unwrap();
    assert!(finished.rounds().last().unwrap().final_round);
    assert_eq!(
        progress_calls.load(Ordering::Relaxed),
        5,
        "round 0, three rounds, final"
    );
    finished.seal().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        reference::image_bytes(&at_finish, &layout)
    );
    let target = same_shape(mem);
    restore(&path, &target, &RestoreOptions::default()).unwrap();
    assert_eq!(snapshot(&target), at_finish);
}

#[test]
fn content_compare_live_round_trip() {
    let mem = two_regions(2000, 100);
    fill_random(&mem, 40, &mut Rng(31));
    live_round_trip(Box::new(ContentCompare::new()), &mem, 32);
}

/// userfaultfd write-protect needs kernel support (this project's machines have it). Without it
/// these tests fail, naming what is missing, unless `DOMSNAP_ALLOW_NO_UFFD=1` says that running on
/// such a kernel is intended; they never skip silently.
fn uffd_available() -> bool {
    match UffdWriteProtect::probe() {
        Ok(()) => true,
        Err(e) if std::env::var_os("DOMSNAP_ALLOW_NO_UFFD").is_some() => {
            eprintln!("SKIPPED (DOMSNAP_ALLOW_NO_UFFD is set): userfaultfd write-protect unavailable: {e}");
            false
        }
        Err(e) => panic!("userfaultfd write-protect is unavailable on this kernel: {e}"),
    }
}

#[test]
fn uffd_live_round_trip() {
    if !uffd_available() {
        return;
    }
    let mem = two_regions(2000, 100);
    fill_random(&mem, 40, &mut Rng(35));
    live_round_trip(Box::new(UffdWriteProtect::new()), &mem, 36);
}

#[test]
fn uffd_on_a_shared_ram_file() {
    if !uffd_available() {
        return;
    }
    let file = tempfile::tempfile_in("/dev/shm").unwrap();
    file.set_len(600 * PAGE_SIZE as u64).unwrap();
    let mem = GuestMemory::builder()
        .file(0, 400 * PAGE_SIZE as u64, &file, 0)
        .unwrap()
        .file(1 << 32, 200 * PAGE_SIZE as u64, &file, 400 * PAGE_SIZE as u64)
        .unwrap()
        .build()
        .unwrap();
    fill_random(&mem, 40, &mut Rng(37));
    live_round_trip(Box::new(UffdWriteProtect::new()), &mem, 38);
}

#[test]
fn everything_live_round_trip() {
    let mem = two_regions(500, 100);
    fill_random(&mem, 40, &mut Rng(33));
    live_round_trip(Box::new(Everything), &mem, 34);
}

#[test]
fn quiet_guest_converges_after_one_round() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::anonymous(256 * PAGE_SIZE as u64).unwrap();
    fill_random(&mem, 50, &mut Rng(41));
    let mut save = content_compare_save(&mem, &dir.path().join("img"));
    assert_eq!(save.converged(), None, "round 0 alone says nothing");
    assert_eq!(save.precopy().unwrap(), StopReason::FewDirtyPages);
    assert_eq!(save.rounds().len(), 2);
    assert_eq!(save.rounds()[1].pages_dirty, 0);
    let summary = save.finish().unwrap().seal().unwrap();
    assert_eq!(summary.rounds.last().unwrap().pages_dirty, 0);

    let dir = tempfile::tempdir().unwrap();
    let (_, sink, _) = writer(dir.path(), &mem, 1);
    let policy = ConvergencePolicy {
        max_rounds: 1,
        ..Default::default()
    };
    let save = LiveSave::begin(
        &mem,
        Box::new(ContentCompare::new()),
        Box::new(sink),
        SaveOptions {
            policy,
            progress: None,
        },
    )
    .unwrap();
    assert_eq!(save.converged(), Some(StopReason::MaxRounds));
}

/// A sink that fails while `fail` is set: a failed round must lose no dirty pages.
struct Flaky {
    inner: ImageWriter,
    fail: Arc<AtomicBool>,
}

impl PageSink for Flaky {
    fn layout(&self) -> &ImageLayout {
        self.inner.layout()
    }
    fn write_pages(&self, first: u64, data: &[u8], sums: &[u64]) -> memory::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(Error::StreamWrite(std::io::Error::other("injected")));
        }
        self.inner.write_pages(first, data, sums)
    }
    fn zero_pages(&self, first: u64, count: u64) -> memory::Result<()> {
        self.inner.zero_pages(first, count)
    }
    fn seal(self: Box<Self>, table: &PageTable) -> memory::Result<()> {
        self.inner.seal(table)
    }
}

#[test]
fn failed_round_loses_no_dirty_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::anonymous(64 * PAGE_SIZE as u64).unwrap();
    fill_random(&mem, 50, &mut Rng(51));
    let (path, inner, layout) = writer(dir.path(), &mem, 9);
    let fail = Arc::new(AtomicBool::new(false));
    let sink = Flaky {
        inner,
        fail: fail.clone(),
    };
    let mut save = LiveSave::begin(
        &mem,
        Box::new(ContentCompare::new()),
        Box::new(sink),
        SaveOptions::default(),
    )
    .unwrap();
    fill_random(&mem, 30, &mut Rng(52));
    fail.store(true, Ordering::Relaxed);
    assert!(save.round().is_err());
    fail.store(false, Ordering::Relaxed);
    let at_finish = snapshot(&mem);
    save.finish().unwrap().seal().unwrap();
    assert_eq!(
        std::fs::read(&path).unwrap(),
        reference::image_bytes(&at_finish, &layout)
    );
}

/// How a round changes memory in the property test.
#[derive(Debug, Clone)]
enum Change {
    Random(u64, u8),
    Zero(u64),
    Same(u64),
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        (any::<u64>(), any::<u8>()).prop_map(|(p, b)| Change::Random(p, b)),
        any::<u64>().prop_map(Change::Zero),
        any::<u64>().prop_map(Change::Same),
    ]
}

fn apply(mem: &GuestMemory, c: &Change) {
    let n = mem.total_pages();
    let mut page = vec![0u8; PAGE_SIZE];
    match *c {
        Change::Random(p, b) => {
            page.iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = b.wrapping_add(i as u8) | 1);
            mem.write(mem.gpa_of_page(p % n), &page).unwrap();
        }
        Change::Zero(p) => mem.write(mem.gpa_of_page(p % n), &page).unwrap(),
        Change::Same(p) => {
            let gpa = mem.gpa_of_page(p % n);
            mem.read(gpa, &mut page).unwrap();
            mem.write(gpa, &page).unwrap();
        }
    }
}

fn build(regions: &[(u64, u64)]) -> GuestMemory {
    let mut gpa = 0;
    let mut b = GuestMemory::builder();
    for &(gap, pages) in regions {
        gpa += gap * PAGE_SIZE as u64;
        b = b.anonymous(gpa, pages * PAGE_SIZE as u64).unwrap();
        gpa += pages * PAGE_SIZE as u64;
    }
    b.build().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    /// Random regions, contents and dirtying between rounds, each dirty source, into a file or through
    /// a stream: each round's dirty count matches the reference diff, and the sealed image equals the
    /// reference image of the memory at finish.
    #[test]
    fn rounds_match_reference(
        regions in prop::collection::vec((0u64..4, 1u64..40), 1..4),
        initial in prop::collection::vec(change(), 0..60),
        rounds in prop::collection::vec(prop::collection::vec(change(), 0..30), 0..5),
        kind in 0u8..3,
        streamed in any::<bool>(),
        seed in any::<u64>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mem = build(&regions);
        initial.iter().for_each(|c| apply(&mem, c));
        let (path, image, layout) = writer(dir.path(), &mem, seed);
        let mut stream = Vec::new();
        let sink: Box<dyn PageSink + '_> = if streamed {
            drop(image);
            Box::new(StreamWriter::new(&mut stream, layout.clone()).unwrap())
        } else {
            Box::new(image)
        };
        let uffd = kind == 2 && UffdWriteProtect::probe().is_ok();
        let source: Box<dyn DirtySource> = match kind {
            0 => Box::new(ContentCompare::new()),
            2 if uffd => Box::new(UffdWriteProtect::new()),
            _ => Box::new(Everything),
        };
        let mut save = LiveSave::begin(&mem, source, sink, SaveOptions::default()).unwrap();
        let mut copied = snapshot(&mem);
        for changes in &rounds {
            changes.iter().for_each(|c| apply(&mem, c));
            let now = snapshot(&mem);
            let stats = save.round().unwrap().clone();
            let changed = reference::dirty_pages(&copied, &now).count();
            match kind {
                0 => prop_assert_eq!(stats.pages_dirty, changed),
                // Write-protection sees writes, not changes: rewriting a page with its own bytes counts.
                2 if uffd => prop_assert!(stats.pages_dirty >= changed),
                _ => prop_assert_eq!(stats.pages_dirty, mem.total_pages()),
            }
            copied = now;
        }
        save.finish().unwrap().seal().unwrap();
        if streamed {
            let options = ReceiveOptions { durability: Durability::NoSync, ..Default::default() };
            receive_stream(stream.as_slice(), &path, &options).unwrap();
        }
        prop_assert_eq!(std::fs::read(&path).unwrap(), reference::image_bytes(&copied, &layout));
        let target = same_shape(&mem);
        restore(&path, &target, &RestoreOptions::default()).unwrap();
        prop_assert_eq!(snapshot(&target), copied);
    }
}

#[test]
fn uffd_reports_written_pages_only() {
    if !uffd_available() {
        return;
    }
    let mem = two_regions(1024, 64);
    fill_random(&mem, 50, &mut Rng(71));
    let table = empty_table(&mem);
    let mut source = UffdWriteProtect::new();
    source.start(&mem).unwrap();
    assert_eq!(
        source.collect(&mem, &table).unwrap().count(),
        mem.total_pages(),
        "first collect is everything"
    );
    assert_eq!(
        source.collect(&mem, &table).unwrap().count(),
        0,
        "nothing written since"
    );
    let written = [3u64, 700, 1030];
    for &p in &written {
        mem.write(mem.gpa_of_page(p) + 100, b"x").unwrap();
    }
    let dirty = source.collect(&mem, &table).unwrap();
    assert!(
        written.iter().all(|&p| dirty.contains(p)),
        "{:?}",
        dirty.iter().collect::<Vec<_>>()
    );
    assert!(dirty.count() < 3 * 512, "at most one huge page per write");
    assert_eq!(
        source.collect(&mem, &table).unwrap().count(),
        0,
        "re-protected by the scan"
    );
    source.stop(&mem).unwrap();
}

/// A page table for `mem` as a fresh save has it (via a paused save into a throwaway stream).
fn empty_table(mem: &GuestMemory) -> PageTable {
    let reader_bytes = reference::image_bytes(&vec![0u8; mem.size() as usize], &ImageLayout::of(mem));
    memory::ImageReader::from_source(reader_bytes.as_slice())
        .unwrap()
        .table()
        .clone()
}
