//! Rescan, the seed's "the snapshot chain changed, adjust": re-read every disk's backing chain
//! and internal snapshot table and reconcile the records with what the disks hold now.
//!
//! A snapshot whose disk part is gone or changed (its image or a file under it missing, its
//! internal snapshot deleted, the chain under its image different from the one recorded) is
//! marked broken with the reasons, in its record; one whose parts are back is unmarked. The
//! chain under each snapshot's image is recorded the first time it is read complete (or, for an
//! image an older external snapshot made, taken from that snapshot: its overlay's backing file is
//! its image), and later rescans compare against it. domsnap never changes the backing file of an
//! image it keeps, so any difference was made outside it.
//!
//! The domain's own chains (from each disk's active image down) are recorded too
//! ([`crate::SnapshotStore::links`]): a rescan reports what changed in them outside domsnap since
//! the last one: a backing file that changed (`qemu-img rebase`) or an image domsnap did not make
//! (a new overlay someone made on the active image).

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::{Path, PathBuf},
    time::Instant,
};

use disk::DiskSnapshots;

use super::{
    disk_plan::holds_internal, millis, now_unix_ms, DiskChain, Health, Orchestrator, RescanReport,
    SnapshotChange,
};
use crate::{
    error::{DriverError, Error, Result},
    metadata::{Broken, DiskRecord, DiskSnapshot, SnapshotRecord},
    name::Name,
    store::ImageLinks,
};

/// Longest backing chain followed (a longer one is most likely a loop).
const MAX_CHAIN: usize = 256;

impl Orchestrator {
    /// Re-reads the domain's disks and reconciles the snapshot records with them: every
    /// snapshot, or only `snapshot` (whose absence is [`Error::SnapshotNotFound`]). Works on
    /// running, paused and shut-off domains (through the hypervisor's disk backend), under the
    /// domain's lock. Records are rewritten atomically, one at a time; a rescan that stops half
    /// way is simply run again.
    pub async fn rescan(&self, domain: &Name, snapshot: Option<&Name>) -> Result<RescanReport> {
        let started = Instant::now();
        let _lock = self.begin(domain).await?;
        if let Some(snapshot) = snapshot {
            self.store.get(domain, snapshot)?;
        }
        let backend = self
            .hypervisor
            .disk_backend(domain)
            .await
            .map_err(driver_error(domain, "reach the disks of"))?;
        let records = self.store.list(domain)?;
        let mut report = RescanReport {
            domain: domain.clone(),
            changed: Vec::new(),
            broken: Vec::new(),
            disks: Vec::new(),
            first: false,
            total_ms: 0.0,
        };
        let mut expectations = Expectations::default();
        let now = now_unix_ms();
        for record in &records {
            let (reasons, chains) = check_record(&*backend, record, &mut expectations).await;
            if snapshot.is_some_and(|wanted| *wanted != record.name) {
                continue;
            }
            let mut updated = record.clone();
            updated.chains = chains;
            report.changed.extend(reconcile(&mut updated, reasons, now));
            if updated.broken.is_some() {
                report.broken.push(updated.name.clone());
            }
            if updated != *record {
                self.store.commit(&updated)?;
            }
        }
        (report.disks, report.first) = self.rescan_chains(domain, &*backend, &records).await?;
        report.total_ms = millis(started.elapsed());
        Ok(report)
    }

    /// Reads each disk's chain from its active image, reports what changed in it outside
    /// domsnap since the last rescan, and records the links read. Returns the disks and whether
    /// this was the domain's first rescan.
    async fn rescan_chains(
        &self,
        domain: &Name,
        backend: &dyn DiskSnapshots,
        records: &[SnapshotRecord],
    ) -> Result<(Vec<DiskChain>, bool)> {
        let targets = self
            .hypervisor
            .disks(domain)
            .await
            .map_err(driver_error(domain, "read the disks of"))?;
        let previous = self.store.links(domain)?;
        let known = match &previous {
            Some(links) => Some(Known::new(links, self.store.overlays(domain)?, records)),
            None => None,
        };
        let mut disks = Vec::new();
        let mut links = ImageLinks::new();
        for target in targets {
            let walk = walk(backend, &target.image).await;
            let changed = known.as_ref().map(|k| k.changes(&walk)).unwrap_or_default();
            links.extend(walk.links.iter().cloned());
            disks.push(DiskChain {
                target: target.target,
                chain: walk.links.into_iter().map(|(image, _)| image).collect(),
                problem: walk.problem,
                changed,
            });
        }
        self.store.set_links(domain, &links)?;
        Ok((disks, previous.is_none()))
    }
}

/// Refuses a snapshot marked broken: a revert checks this before it touches the domain.
pub(super) fn check_not_broken(record: &SnapshotRecord) -> Result<()> {
    match &record.broken {
        Some(broken) => Err(Error::Broken {
            domain: record.domain.clone(),
            snapshot: record.name.clone(),
            reasons: broken.reasons.clone(),
        }),
        None => Ok(()),
    }
}

fn driver_error<'a>(domain: &'a Name, action: &'static str) -> impl FnOnce(DriverError) -> Error + 'a {
    move |source| Error::Driver {
        domain: domain.clone(),
        action,
        source,
    }
}

/// A backing chain as read from its top down.
#[derive(Debug, Default)]
struct Walk {
    /// Each image read, top first, and the backing file its header names.
    links: Vec<(PathBuf, Option<PathBuf>)>,
    /// Why the walk stopped before the base: a missing file, an unreadable header, a loop.
    problem: Option<String>,
}

impl Walk {
    /// The images below the top, nearest first.
    fn below(&self) -> Vec<PathBuf> {
        self.links
            .iter()
            .skip(1)
            .map(|(image, _)| image.clone())
            .collect()
    }
}

/// Reads the chain from `top` down, through the backing file each header names (the backend
/// reads headers natively, which is safe while a hypervisor holds the images).
async fn walk(backend: &dyn DiskSnapshots, top: &Path) -> Walk {
    let mut walk = Walk::default();
    let mut image = top.to_owned();
    if !image.exists() {
        walk.problem = Some(format!("image {} is missing", image.display()));
        return walk;
    }
    loop {
        let backing = match backend.backing_file(&image).await {
            Ok(backing) => backing,
            Err(e) => {
                walk.problem = Some(format!("cannot read {}: {e}", image.display()));
                return walk;
            }
        };
        walk.links.push((image.clone(), backing.clone()));
        let Some(next) = backing else {
            return walk;
        };
        if !next.exists() {
            walk.problem = Some(format!(
                "backing file {} of {} is missing",
                next.display(),
                image.display()
            ));
            return walk;
        }
        if walk.links.len() >= MAX_CHAIN || walk.links.iter().any(|(seen, _)| *seen == next) {
            walk.problem = Some(format!(
                "the backing chain of {} loops or is longer than {MAX_CHAIN} images",
                top.display()
            ));
            return walk;
        }
        image = next;
    }
}

/// A chain below an image, for messages.
fn chain_text(chain: &[PathBuf]) -> String {
    if chain.is_empty() {
        return "no backing file".to_owned();
    }
    let names: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
    names.join(" -> ")
}

fn backing_text(backing: Option<&PathBuf>) -> String {
    backing.map_or_else(|| "none".to_owned(), |p| p.display().to_string())
}

/// What the snapshots' images should have below them.
#[derive(Debug, Default)]
struct Expectations {
    /// Image → the chain below it, from the records seen so far (oldest first).
    below: HashMap<PathBuf, Vec<PathBuf>>,
}

impl Expectations {
    /// The chain `disk`'s image should have below it: recorded by an earlier rescan, else
    /// known from an older snapshot (an external snapshot's overlay backs onto its image).
    fn expected(&self, record: &SnapshotRecord, disk: &DiskRecord) -> Option<Vec<PathBuf>> {
        record
            .chains
            .get(&disk.target)
            .cloned()
            .or_else(|| self.below.get(&disk.image).cloned())
    }

    /// Learns the chain under `disk`'s image and, for an external snapshot, under its overlay.
    fn learn(&mut self, disk: &DiskRecord, chain: Vec<PathBuf>) {
        if let DiskSnapshot::External { overlay, .. } = &disk.snapshot {
            let mut under = vec![disk.image.clone()];
            under.extend(chain.iter().cloned());
            self.below.entry(overlay.clone()).or_insert(under);
        }
        self.below.entry(disk.image.clone()).or_insert(chain);
    }
}

/// Checks one snapshot's disks; returns what is missing or changed, and the chains to record
/// in it (those recorded before, and those read or known now).
async fn check_record(
    backend: &dyn DiskSnapshots,
    record: &SnapshotRecord,
    expectations: &mut Expectations,
) -> (Vec<String>, BTreeMap<String, Vec<PathBuf>>) {
    let mut reasons = Vec::new();
    let mut chains = record.chains.clone();
    for disk in record
        .disks
        .iter()
        .filter(|d| d.snapshot != DiskSnapshot::Excluded)
    {
        let expected = expectations.expected(record, disk);
        let (problems, found) = check_disk(backend, disk, expected.as_deref()).await;
        reasons.extend(problems.into_iter().map(|p| format!("disk {}: {p}", disk.target)));
        if let Some(chain) = expected.or(found) {
            chains.entry(disk.target.clone()).or_insert_with(|| chain.clone());
            expectations.learn(disk, chain);
        }
    }
    (reasons, chains)
}

/// Checks one disk of a snapshot: its image, the chain below it (against `expected`) and its
/// internal snapshot. Returns the problems and the chain below the image if it was read to the
/// base.
async fn check_disk(
    backend: &dyn DiskSnapshots,
    disk: &DiskRecord,
    expected: Option<&[PathBuf]>,
) -> (Vec<String>, Option<Vec<PathBuf>>) {
    let mut problems = Vec::new();
    let walk = walk(backend, &disk.image).await;
    let found = match &walk.problem {
        Some(problem) => {
            problems.push(problem.clone());
            None
        }
        None => Some(walk.below()),
    };
    if let (Some(expected), Some(found)) = (expected, &found) {
        if expected != found.as_slice() {
            problems.push(format!(
                "the chain under {} changed outside domsnap: was {}, now {}",
                disk.image.display(),
                chain_text(expected),
                chain_text(found)
            ));
        }
    }
    if let DiskSnapshot::Internal { name } = &disk.snapshot {
        if disk.image.exists() {
            match holds_internal(backend, &disk.image, name).await {
                Ok(true) => {}
                Ok(false) => problems.push(format!(
                    "internal snapshot {name} is gone from {}",
                    disk.image.display()
                )),
                Err(e) => problems.push(format!(
                    "cannot read the internal snapshots of {}: {e}",
                    disk.image.display()
                )),
            }
        }
    }
    (problems, found)
}

/// Marks `record` broken with `reasons`, or unmarks it when there are none; returns the change
/// to report, if its mark changed.
fn reconcile(record: &mut SnapshotRecord, reasons: Vec<String>, now: u64) -> Option<SnapshotChange> {
    let health = match (&record.broken, reasons.is_empty()) {
        (None, true) => return None,
        (Some(broken), false) if broken.reasons == reasons => return None,
        (Some(_), true) => {
            record.broken = None;
            Health::Repaired
        }
        (was, false) => {
            let since_unix_ms = was.as_ref().map_or(now, |b| b.since_unix_ms);
            record.broken = Some(Broken {
                since_unix_ms,
                reasons: reasons.clone(),
            });
            Health::Broken
        }
    };
    Some(SnapshotChange {
        snapshot: record.name.clone(),
        health,
        reasons,
    })
}

/// What domsnap knows of a domain's images, to tell the changes made outside it: the links the
/// last rescan read, the overlays domsnap made, and the images and overlays of the records.
struct Known<'a> {
    links: &'a ImageLinks,
    ours: HashSet<PathBuf>,
}

impl<'a> Known<'a> {
    fn new(links: &'a ImageLinks, overlays: Vec<PathBuf>, records: &[SnapshotRecord]) -> Self {
        let mut ours: HashSet<PathBuf> = overlays.into_iter().collect();
        for disk in records.iter().flat_map(|r| &r.disks) {
            ours.insert(disk.image.clone());
            if let DiskSnapshot::External { overlay, .. } = &disk.snapshot {
                ours.insert(overlay.clone());
            }
        }
        Known { links, ours }
    }

    /// The changes in `walk` made outside domsnap: a backing file other than the last rescan
    /// read (domsnap never changes the backing file of an image it keeps), or an image neither
    /// known then nor made by domsnap.
    fn changes(&self, walk: &Walk) -> Vec<String> {
        let mut changed = Vec::new();
        for (image, backing) in &walk.links {
            match self.links.get(image) {
                Some(before) if before != backing => changed.push(format!(
                    "the backing file of {} changed outside domsnap: was {}, now {}",
                    image.display(),
                    backing_text(before.as_ref()),
                    backing_text(backing.as_ref())
                )),
                None if !self.ours.contains(image) => changed.push(format!(
                    "{} was not made by domsnap (its backing file: {})",
                    image.display(),
                    backing_text(backing.as_ref())
                )),
                _ => {}
            }
        }
        changed
    }
}
