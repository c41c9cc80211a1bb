//! Human-readable output of the commands (the JSON output serialises the same values).

use std::fmt::Write;

use serde::Serialize;
use snapshot_core::{
    Abandoned, Activity, CreateReport, DeleteReport, DiskSnapshot, DomainState, Health, MemoryLoad,
    MemoryRead, Name, Recovery, RescanReport, RevertReport, SnapshotFiles, SnapshotRecord, ThawOutcome,
    VerifyReport,
};

/// One line of `domain list`.
#[derive(Debug, Serialize)]
pub struct DomainRow {
    name: Name,
    state: DomainState,
    pid: Option<u32>,
    /// The accelerator it runs (or would run) under: `kvm` or `tcg`.
    accel: qemu::Accel,
    /// The snapshot memory image its RAM is mapped from (after a lazy revert), while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    mapped_image: Option<std::path::PathBuf>,
    /// The guest agent channel's Unix socket (`guest_agent = true`), while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    guest_agent_socket: Option<std::path::PathBuf>,
    /// What domsnap is doing on it: idle, busy (another command holds its lock) or interrupted.
    activity: Activity,
}

impl DomainRow {
    pub fn new(status: &qemu::DomainStatus, activity: Activity) -> Self {
        DomainRow {
            name: status.name.clone(),
            state: status.state,
            pid: status.pid,
            accel: status.accel,
            mapped_image: status.mapped_image.clone(),
            guest_agent_socket: status.guest_agent_socket.clone(),
            activity,
        }
    }
}

/// An activity in words.
pub fn activity_text(activity: &Activity) -> String {
    match activity {
        Activity::Idle => "idle".to_owned(),
        Activity::Busy {
            pid,
            operation,
            snapshot,
        } => {
            let what = match (operation, snapshot) {
                (Some(operation), Some(snapshot)) => {
                    format!("{operation} of snapshot {snapshot} in progress")
                }
                _ => "another command holds its lock".to_owned(),
            };
            match pid {
                Some(pid) => format!("busy: {what} (pid {pid})"),
                None => format!("busy: {what}"),
            }
        }
        Activity::Interrupted { operation, snapshot } => {
            format!("interrupted {operation} of snapshot {snapshot}: run `domsnap recover`")
        }
    }
}

/// What `recover NAME --abandon` gave up.
pub fn abandoned(domain: &Name, abandoned: Option<&Abandoned>) -> String {
    let Some(abandoned) = abandoned else {
        return format!("domain {domain}: nothing to abandon\n");
    };
    let mut out = format!(
        "domain {domain}: abandoned the interrupted {} of snapshot {}; left behind:\n",
        abandoned.operation, abandoned.snapshot
    );
    for item in &abandoned.left_behind {
        let _ = writeln!(out, "  {item}");
    }
    out
}

fn state_text(state: DomainState) -> &'static str {
    match state {
        DomainState::Running => "running",
        DomainState::Paused => "paused",
        DomainState::ShutOff => "shut-off",
    }
}

pub fn domains(rows: &[DomainRow]) -> String {
    let mut out = format!(
        "{:<24} {:<9} {:<8} {:<5} {}\n",
        "NAME", "STATE", "PID", "ACCEL", "ACTIVITY"
    );
    for row in rows {
        let pid = row.pid.map_or_else(|| "-".to_owned(), |p| p.to_string());
        let _ = writeln!(
            out,
            "{:<24} {:<9} {pid:<8} {:<5} {}",
            row.name.as_str(),
            state_text(row.state),
            row.accel.as_str(),
            activity_text(&row.activity)
        );
        if let Some(image) = &row.mapped_image {
            let _ = writeln!(out, "  RAM mapped copy-on-write from {}", image.display());
        }
        if let Some(socket) = &row.guest_agent_socket {
            let _ = writeln!(out, "  guest agent channel on {}", socket.display());
        }
    }
    out
}

/// `snapshot show`'s JSON document (after `"version"`): whether it is the domain's current
/// snapshot, and its record (which has its own `"version"`, the metadata layout's).
#[derive(Debug, Serialize)]
pub struct ShowDocument<'a> {
    current: bool,
    record: &'a SnapshotRecord,
}

impl<'a> ShowDocument<'a> {
    pub fn new(record: &'a SnapshotRecord, current: Option<&Name>) -> Self {
        ShowDocument {
            current: current == Some(&record.name),
            record,
        }
    }
}

/// One line of `snapshot list`.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotRow {
    name: Name,
    current: bool,
    created_unix_ms: u64,
    state: DomainState,
    memory: bool,
    parent: Option<Name>,
    disks: Vec<String>,
    description: Option<String>,
    /// Why it cannot be reverted to, as the last rescan found; `None`: not broken.
    broken: Option<Vec<String>>,
}

impl SnapshotRow {
    pub fn new(record: &SnapshotRecord, current: Option<&Name>) -> Self {
        SnapshotRow {
            name: record.name.clone(),
            current: current == Some(&record.name),
            created_unix_ms: record.created_unix_ms,
            state: record.state,
            memory: record.memory.is_some(),
            parent: record.parent.clone(),
            disks: record.disks.iter().map(disk_text).collect(),
            description: record.description.clone(),
            broken: record.broken.as_ref().map(|b| b.reasons.clone()),
        }
    }
}

fn disk_text(disk: &snapshot_core::DiskRecord) -> String {
    match &disk.snapshot {
        DiskSnapshot::Internal { .. } => format!("{}:internal", disk.target),
        DiskSnapshot::External { .. } => format!("{}:external", disk.target),
        DiskSnapshot::Excluded => format!("{}:excluded", disk.target),
    }
}

/// Seconds since the epoch as UTC `YYYY-MM-DD HH:MM:SS` (civil-from-days, no time zone
/// database needed).
fn utc(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    #[allow(
        clippy::cast_possible_wrap,
        reason = "days since the epoch of a u64 of milliseconds are below 2^38, far inside i64"
    )]
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

pub fn snapshots(rows: &[SnapshotRow]) -> String {
    let mut out = format!(
        "  {:<20} {:<19} {:<9} {:<6} {:<16} {}\n",
        "NAME", "CREATED (UTC)", "STATE", "MEMORY", "PARENT", "DISKS"
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{} {:<20} {:<19} {:<9} {:<6} {:<16} {}",
            if row.current { "*" } else { " " },
            row.name.as_str(),
            utc(row.created_unix_ms),
            state_text(row.state),
            if row.memory { "yes" } else { "no" },
            row.parent.as_ref().map_or("-", Name::as_str),
            row.disks.join(" ")
        );
        for reason in row.broken.iter().flatten() {
            let _ = writeln!(out, "  ! broken: {reason}");
        }
    }
    out
}

pub fn show(record: &SnapshotRecord, current: Option<&Name>, files: &SnapshotFiles) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "snapshot:    {}{}",
        record.name,
        if current == Some(&record.name) {
            " (current)"
        } else {
            ""
        }
    );
    let _ = writeln!(out, "domain:      {}", record.domain);
    let _ = writeln!(out, "created:     {} UTC", utc(record.created_unix_ms));
    let _ = writeln!(out, "state:       {}", state_text(record.state));
    let _ = writeln!(
        out,
        "parent:      {}",
        record.parent.as_ref().map_or("-", Name::as_str)
    );
    if let Some(description) = &record.description {
        let _ = writeln!(out, "description: {description}");
    }
    if record.quiesced {
        let _ = writeln!(
            out,
            "quiesced:    yes (filesystems frozen through the guest agent)"
        );
    }
    if let Some(broken) = &record.broken {
        let _ = writeln!(
            out,
            "broken:      since {} UTC (a revert is refused; `snapshot rescan` unmarks it once repaired)",
            utc(broken.since_unix_ms)
        );
        for reason in &broken.reasons {
            let _ = writeln!(out, "  {reason}");
        }
    }
    write_memory(&mut out, record, files);
    write_disks(&mut out, record);
    out
}

/// `show`'s memory lines: the image's size and consistency, and where its files are.
fn write_memory(out: &mut String, record: &SnapshotRecord, files: &SnapshotFiles) {
    match &record.memory {
        Some(memory) => {
            let consistency = match memory.consistency {
                snapshot_core::Consistency::End => "end of the create (pause)",
                snapshot_core::Consistency::Start => "start of the create",
            };
            let _ = writeln!(
                out,
                "memory:      {} MiB, consistent at the {consistency}",
                memory.ram_bytes >> 20
            );
            let _ = writeln!(out, "  image:     {}", files.memory_image.display());
            let _ = writeln!(out, "  devices:   {}", files.device_state.display());
        }
        None => {
            let _ = writeln!(out, "memory:      none (disk-only snapshot)");
        }
    }
}

/// `show`'s line for each disk: what its snapshot is and where.
fn write_disks(out: &mut String, record: &SnapshotRecord) {
    for disk in &record.disks {
        match &disk.snapshot {
            DiskSnapshot::Internal { name } => {
                let _ = writeln!(
                    out,
                    "disk {}:    internal snapshot {name} in {}",
                    disk.target,
                    disk.image.display()
                );
            }
            DiskSnapshot::External { overlay, format } => {
                let _ = writeln!(
                    out,
                    "disk {}:    external: {} is the snapshot, {} ({format}) the overlay made then",
                    disk.target,
                    disk.image.display(),
                    overlay.display()
                );
            }
            DiskSnapshot::Excluded => {
                let _ = writeln!(
                    out,
                    "disk {}:    left out ({} is not part of the snapshot; a revert leaves it as it is)",
                    disk.target,
                    disk.image.display()
                );
            }
        }
    }
}

pub fn created(report: &CreateReport) -> String {
    let record = &report.record;
    let mut out = format!(
        "created snapshot {} of {} ({} memory): total {:.0} ms, guest paused {:.1} ms",
        record.name, record.domain, report.memory_mode, report.total_ms, report.guest_pause_ms
    );
    if let Some((total, stored)) = report.memory_pages {
        let passes = match &report.streamed {
            Some(streamed) => streamed.passes,
            None => u64::try_from(report.memory_rounds.len()).unwrap_or(u64::MAX),
        };
        let read = match report.memory_read {
            Some(MemoryRead::Stream) => "QEMU's stream",
            _ => "the shared RAM",
        };
        let _ = write!(
            out,
            ", {passes} memory pass(es) read from {read}, {stored} of {total} pages stored"
        );
        if let Some(downtime) = report.streamed.as_ref().and_then(|s| s.hypervisor_downtime_ms) {
            let _ = write!(out, ", QEMU's downtime {downtime:.0} ms");
        }
    } else {
        out.push_str(", disks only");
    }
    out.push('\n');
    out
}

pub fn deleted(report: &DeleteReport) -> String {
    let names: Vec<&str> = report.deleted.iter().map(Name::as_str).collect();
    let mut out = format!("deleted {} in {:.0} ms\n", names.join(", "), report.total_ms);
    for image in &report.removed_images {
        let _ = writeln!(out, "removed overlay {} (no snapshot needs it)", image.display());
    }
    for snapshot in &report.memory_in_use {
        let _ = writeln!(
            out,
            "the memory image of {snapshot} is still mapped by the running domain: its data stays \
             on disk until the domain stops"
        );
    }
    out
}

pub fn reverted(domain: &Name, report: &RevertReport) -> String {
    let memory = match report.memory_load {
        MemoryLoad::Mapped => "memory mapped from the snapshot's image".to_owned(),
        MemoryLoad::Copied => format!("memory copied in {:.0} ms", report.memory_ms),
        MemoryLoad::None => "no memory".to_owned(),
    };
    let mut out = format!(
        "reverted {domain} to {}: now {}, total {:.0} ms ({memory})\n",
        report.snapshot,
        state_text(report.state),
        report.total_ms,
    );
    if let Some(reason) = &report.memory_fallback {
        let _ = writeln!(out, "note: {reason}");
    }
    if let Some(downtime) = report.downtime_ms {
        let how = if report.standby {
            "the new QEMU was started beside the old one"
        } else {
            "the new QEMU was started after the old one ended"
        };
        let _ = writeln!(out, "the domain had no guest for {downtime:.0} ms ({how})");
    }
    if let Some(reason) = &report.standby_unavailable {
        let _ = writeln!(out, "note: not started beside the old QEMU: {reason}");
    }
    match &report.thaw {
        None => {}
        Some(ThawOutcome::Thawed { filesystems }) => {
            let _ = writeln!(
                out,
                "the snapshot was quiesced: {filesystems} filesystem(s) thawed"
            );
        }
        Some(ThawOutcome::Pending) => {
            let _ = writeln!(
                out,
                "note: the snapshot was quiesced and the guest is paused, so its filesystems are \
                 frozen: `domsnap domain resume {domain}`, then `domsnap domain thaw {domain}`"
            );
        }
        Some(ThawOutcome::Failed { error }) => {
            let _ = writeln!(
                out,
                "warning: the snapshot was quiesced and its filesystems could not be thawed ({error}): \
                 `domsnap domain thaw {domain}`"
            );
        }
    }
    out
}

pub fn verified(report: &VerifyReport) -> String {
    if report.problems.is_empty() {
        let mut out = format!("snapshot {} is intact", report.snapshot);
        if let Some((total, stored)) = report.memory_pages {
            let _ = write!(
                out,
                " (memory image: {stored} of {total} pages stored, checksums good)"
            );
        }
        out.push('\n');
        out
    } else {
        report
            .problems
            .iter()
            .map(|p| format!("problem: {p}\n"))
            .collect()
    }
}

pub fn rescanned(report: &RescanReport) -> String {
    let mut out = format!("rescanned {} in {:.0} ms", report.domain, report.total_ms);
    out.push_str(if report.first {
        " (its first rescan: the chains are recorded, later rescans compare against them)\n"
    } else {
        "\n"
    });
    for change in &report.changed {
        match change.health {
            Health::Broken => {
                let _ = writeln!(out, "snapshot {}: broken", change.snapshot);
                for reason in &change.reasons {
                    let _ = writeln!(out, "  {reason}");
                }
            }
            Health::Repaired => {
                let _ = writeln!(out, "snapshot {}: repaired (its parts are back)", change.snapshot);
            }
        }
    }
    for disk in &report.disks {
        for change in &disk.changed {
            let _ = writeln!(out, "disk {}: {change} (recorded)", disk.target);
        }
        if let Some(problem) = &disk.problem {
            let _ = writeln!(out, "disk {}: {problem}", disk.target);
        }
    }
    let broken: Vec<&str> = report.broken.iter().map(Name::as_str).collect();
    if broken.is_empty() {
        out.push_str("no snapshot is broken\n");
    } else {
        let _ = writeln!(out, "broken snapshots: {}", broken.join(", "));
    }
    out
}

pub fn recoveries(recovered: &[Recovery]) -> String {
    if recovered.is_empty() {
        return "nothing to recover\n".to_owned();
    }
    recovered
        .iter()
        .map(|r| {
            format!(
                "{}: {} of snapshot {} {}\n",
                r.domain, r.operation, r.snapshot, r.outcome
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00");
        assert_eq!(super::utc(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(super::utc(951_782_400_000), "2000-02-29 00:00:00");
    }
}
