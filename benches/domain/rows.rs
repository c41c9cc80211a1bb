//! The tables: issue 11's targets and the figures around them, and the live modes side by side.
//! Every series key is relative to the guest size (`1024m.`, `4096m.`, see `report::size_key`).

use crate::report::{GridRow, Pick, Row, Target};

const UNLIMITED_DOWNTIME: (&str, &str) = (
    "QEMU live `migrate`, bandwidth unlimited: its `downtime`",
    "qemu.live_unlimited.downtime",
);
const DEFAULT_DOWNTIME: (&str, &str) = (
    "QEMU live `migrate`, default bandwidth: its `downtime`",
    "qemu.live_default.downtime",
);
const BACKGROUND_DOWNTIME: (&str, &str) = (
    "QEMU `background-snapshot` to `file:`: its `downtime`",
    "qemu.background_snapshot.downtime",
);
const HUGE_PAGES_BACKGROUND_DOWNTIME: (&str, &str) = (
    "QEMU `background-snapshot` to `file:`, RAM in huge pages: its `downtime`",
    "qemu.background_snapshot_huge.downtime",
);
const INCOMING: (&str, &str) = (
    "`migrate-incoming` of a paused `migrate` file, QEMU start-up included (no disk)",
    "qemu.migrate_incoming.with_startup",
);
const SNAPSHOT_LOAD: (&str, &str) = (
    "`snapshot-load` job into the running QEMU (memory, devices, disk)",
    "qemu.snapshot_load.wall",
);
const STEADY_RATE: (&str, &str) = (
    "the guest's own dirty rate before the revert (ticks)",
    "guest.steady_rate",
);
const STEADY_WORKING_SET: (&str, &str) = (
    "the same at the steady rate (64 MiB ÷ rate)",
    "guest.working_set_steady",
);
const EAGER: &str = "the same after an eager revert";

/// Issue 11's targets (part 5), and the figures that explain them.
pub const ROWS: &[Row] = &[
    // Pre-copy: the pause.
    Row {
        scenario: "pre-copy create: guest pause, QEMU's `STOP` → `RESUME` events (disk snapshot included)",
        domsnap: "domsnap.precopy.pause_events",
        baseline: Some(UNLIMITED_DOWNTIME),
        pick: Pick::Median,
        target: Target::AtMostPlus(0.010),
    },
    Row {
        scenario: "pre-copy create: guest pause, events",
        domsnap: "domsnap.precopy.pause_events",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.030),
    },
    Row {
        scenario: "pre-copy create: guest pause, events",
        domsnap: "domsnap.precopy.pause_events",
        baseline: Some(DEFAULT_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "pre-copy create: guest pause, events",
        domsnap: "domsnap.precopy.pause_events",
        baseline: Some((
            "QEMU live `migrate`, unlimited, `downtime-limit` 20 ms as ours: its `downtime`",
            "qemu.live_like_ours.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "pre-copy create: guest pause, the report's `guest_pause_ms`",
        domsnap: "domsnap.precopy.pause_report",
        baseline: Some(UNLIMITED_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "pre-copy create: QEMU's own `downtime` of our migration (disk snapshot inside it)",
        domsnap: "domsnap.precopy.qemu_downtime",
        baseline: Some(UNLIMITED_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    // Background: the first create of a QEMU process, then the later ones.
    Row {
        scenario: "FIRST background create of a fresh QEMU process: guest pause, events (one sample)",
        domsnap: "domsnap.background_first.pause_events",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.050),
    },
    Row {
        scenario: "FIRST background create: guest pause, report (one sample)",
        domsnap: "domsnap.background_first.pause_report",
        baseline: None,
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "FIRST background create: total time, QEMU's RAM populated first (one sample)",
        domsnap: "domsnap.background_first.wall",
        baseline: None,
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create (later ones): guest pause, events (disk snapshot and capture)",
        domsnap: "domsnap.background.pause_events",
        baseline: Some(BACKGROUND_DOWNTIME),
        pick: Pick::Median,
        target: Target::AtMostPlus(0.010),
    },
    Row {
        scenario: "background create: guest pause, report",
        domsnap: "domsnap.background.pause_report",
        baseline: Some(BACKGROUND_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create: QEMU's own `downtime` inside our pause",
        domsnap: "domsnap.background.qemu_downtime",
        baseline: Some(BACKGROUND_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    // Background again, on a second domain whose RAM is in 2 MiB huge pages.
    Row {
        scenario: "FIRST background create of a fresh QEMU process, RAM in huge pages: guest pause, \
                   events (one sample)",
        domsnap: "domsnap.background_huge_first.pause_events",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.050),
    },
    Row {
        scenario: "FIRST background create, RAM in huge pages: guest pause, report (one sample)",
        domsnap: "domsnap.background_huge_first.pause_report",
        baseline: None,
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "FIRST background create, RAM in huge pages: total time, QEMU's RAM populated first \
                   (one sample)",
        domsnap: "domsnap.background_huge_first.wall",
        baseline: None,
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create (later ones), RAM in huge pages: guest pause, events (disk \
                   snapshot and capture)",
        domsnap: "domsnap.background_huge.pause_events",
        baseline: Some(HUGE_PAGES_BACKGROUND_DOWNTIME),
        pick: Pick::Median,
        target: Target::AtMostPlus(0.010),
    },
    Row {
        scenario: "background create, RAM in huge pages: guest pause, report",
        domsnap: "domsnap.background_huge.pause_report",
        baseline: Some(HUGE_PAGES_BACKGROUND_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create, RAM in huge pages: QEMU's own `downtime` inside our pause",
        domsnap: "domsnap.background_huge.qemu_downtime",
        baseline: Some(HUGE_PAGES_BACKGROUND_DOWNTIME),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create, RAM in huge pages: total time (disk snapshot, everything fsynced)",
        domsnap: "domsnap.background_huge.wall",
        baseline: Some((
            "QEMU `background-snapshot` to `file:`, RAM in huge pages: `migrate` → `completed`",
            "qemu.background_snapshot_huge.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    // Background again, RAM in huge pages, each side after 512 MiB written to the guest disk
    // through QEMU (they wait in the host's page cache; QEMU's stop flushes them).
    Row {
        scenario: "background create after 512 MiB of disk writes, RAM in huge pages: guest pause, events",
        domsnap: "domsnap.background_huge_after_writes.pause_events",
        baseline: Some((
            "the same without the writes (domsnap's later background creates, huge pages)",
            "domsnap.background_huge.pause_events",
        )),
        pick: Pick::Median,
        target: Target::AtMostPlus(0.010),
    },
    Row {
        scenario: "background create after 512 MiB of disk writes, RAM in huge pages: guest pause, events",
        domsnap: "domsnap.background_huge_after_writes.pause_events",
        baseline: Some((
            "QEMU `background-snapshot` after the same writes: its `downtime` (its stop flushes them)",
            "qemu.background_snapshot_huge_after_writes.downtime",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "background create after 512 MiB of disk writes, RAM in huge pages: total time",
        domsnap: "domsnap.background_huge_after_writes.wall",
        baseline: Some((
            "QEMU `background-snapshot` after the same writes: `migrate` → `completed`",
            "qemu.background_snapshot_huge_after_writes.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    // Revert.
    Row {
        scenario: "revert (lazy: QEMU maps the image), end to end, guest running",
        domsnap: "domsnap.revert_lazy.wall",
        baseline: None,
        pick: Pick::Median,
        target: Target::AtMost(0.150),
    },
    Row {
        scenario: "revert (lazy), end to end",
        domsnap: "domsnap.revert_lazy.wall",
        baseline: Some(INCOMING),
        pick: Pick::Median,
        target: Target::RatioAtLeast(10.0),
    },
    Row {
        scenario: "revert (lazy), end to end",
        domsnap: "domsnap.revert_lazy.wall",
        baseline: Some(SNAPSHOT_LOAD),
        pick: Pick::Median,
        target: Target::RatioAtLeast(3.0),
    },
    Row {
        scenario: "revert (lazy): the domain without a guest, old QEMU ended → new one resumed (report's `downtime_ms`)",
        domsnap: "domsnap.revert_lazy.downtime",
        baseline: None,
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (eager: image copied into fresh RAM), end to end, guest running",
        domsnap: "domsnap.revert_eager.wall",
        baseline: None,
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (eager), end to end",
        domsnap: "domsnap.revert_eager.wall",
        baseline: Some(INCOMING),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (eager), end to end",
        domsnap: "domsnap.revert_eager.wall",
        baseline: Some(SNAPSHOT_LOAD),
        pick: Pick::Median,
        target: Target::None,
    },
    // The guest after a revert.
    Row {
        scenario: "revert (lazy): revert called → the guest's first tick",
        domsnap: "domsnap.revert_lazy.first_tick",
        baseline: Some((EAGER, "domsnap.revert_eager.first_tick")),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (lazy): first tick later than the guest's own wait for it",
        domsnap: "domsnap.revert_lazy.first_tick_late",
        baseline: Some((EAGER, "domsnap.revert_eager.first_tick_late")),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (lazy): guest dirty rate, resume → first tick",
        domsnap: "domsnap.revert_lazy.rate_to_first_tick",
        baseline: Some(STEADY_RATE),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (eager): guest dirty rate, resume → first tick",
        domsnap: "domsnap.revert_eager.rate_to_first_tick",
        baseline: Some(STEADY_RATE),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (lazy): guest dirty rate, first → second tick",
        domsnap: "domsnap.revert_lazy.rate_first_second",
        baseline: Some(STEADY_RATE),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (eager): guest dirty rate, first → second tick",
        domsnap: "domsnap.revert_eager.rate_first_second",
        baseline: Some(STEADY_RATE),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (lazy): resume → guest has rewritten its 64 MiB working set (ticks)",
        domsnap: "domsnap.revert_lazy.working_set",
        baseline: Some(STEADY_WORKING_SET),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (eager): resume → guest has rewritten its 64 MiB working set (ticks)",
        domsnap: "domsnap.revert_eager.working_set",
        baseline: Some(STEADY_WORKING_SET),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "revert (lazy): resume → dirty rate back to ≥ 90 % of steady (tick resolution)",
        domsnap: "domsnap.revert_lazy.back_to_steady",
        baseline: Some((EAGER, "domsnap.revert_eager.back_to_steady")),
        pick: Pick::Median,
        target: Target::None,
    },
    // Live create: total time and size.
    Row {
        scenario: "pre-copy create: total time (disk snapshot, everything fsynced)",
        domsnap: "domsnap.precopy.wall",
        baseline: Some((
            "QEMU live `migrate` to `file:`, bandwidth unlimited: `migrate` → `completed`",
            "qemu.live_unlimited.wall",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(1.0),
    },
    Row {
        scenario: "pre-copy create: total time",
        domsnap: "domsnap.precopy.wall",
        baseline: Some((
            "QEMU live `migrate` to `file:`, unlimited, `downtime-limit` 20 ms as ours: `migrate` → \
             `completed`",
            "qemu.live_like_ours.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "pre-copy create: total time",
        domsnap: "domsnap.precopy.wall",
        baseline: Some((
            "QEMU live `migrate` to `file:`, default bandwidth: `migrate` → `completed`",
            "qemu.live_default.wall",
        )),
        pick: Pick::Median,
        target: Target::RatioAtLeast(1.0),
    },
    Row {
        scenario: "pre-copy create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.precopy.image_allocated",
        baseline: Some((
            "the guest's non-zero RAM (pages the image stores × 4 KiB, largest)",
            "domsnap.precopy.nonzero_ram",
        )),
        pick: Pick::Max,
        target: Target::AtMostTimes(1.015),
    },
    Row {
        scenario: "background create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.background.image_allocated",
        baseline: Some((
            "the guest's non-zero RAM (pages the image stores × 4 KiB, largest)",
            "domsnap.background.nonzero_ram",
        )),
        pick: Pick::Max,
        target: Target::AtMostTimes(1.015),
    },
    Row {
        scenario: "pre-copy create: memory image, bytes allocated (largest)",
        domsnap: "domsnap.precopy.image_allocated",
        baseline: Some((
            "QEMU live `migrate` file, bandwidth unlimited (largest)",
            "qemu.live_unlimited.file_bytes",
        )),
        pick: Pick::Max,
        target: Target::None,
    },
    // Paused creates, for reference.
    Row {
        scenario: "paused create (domsnap reads the shared RAM): end to end",
        domsnap: "domsnap.paused.wall",
        baseline: Some((
            "`migrate` to `file:` with the guest paused, default bandwidth, + fsync (no disk)",
            "qemu.migrate_paused.wall_fsync",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "paused create through QEMU's stream (RAM mapped by a lazy revert): end to end",
        domsnap: "domsnap.paused_stream.wall",
        baseline: Some((
            "paused create reading the shared RAM directly",
            "domsnap.paused.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "paused create through QEMU's stream: guest pause (report)",
        domsnap: "domsnap.paused_stream.pause_report",
        baseline: Some((
            "paused create reading the shared RAM directly",
            "domsnap.paused.pause_report",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
    Row {
        scenario: "paused create: guest pause (report)",
        domsnap: "domsnap.paused.pause_report",
        baseline: Some((
            "`snapshot-save` job (guest stopped throughout)",
            "qemu.snapshot_save.wall",
        )),
        pick: Pick::Median,
        target: Target::None,
    },
];

/// The live ways side by side, in the order of [`GRID`]'s series.
pub const GRID_METHODS: &[&str] = &[
    "pre-copy (ours)",
    "background (ours)",
    "QEMU live `migrate`, unlimited",
    "QEMU live `migrate`, unlimited, 20 ms limit",
    "QEMU live `migrate`, default",
    "QEMU `background-snapshot`",
    "background (ours), RAM in huge pages",
    "QEMU `background-snapshot`, RAM in huge pages",
];

/// The live ways side by side.
pub const GRID: &[GridRow] = &[
    GridRow {
        quantity: "guest pause (ours: `STOP` → `RESUME` events; QEMU: its `downtime`), median",
        pick: Pick::Median,
        series: &[
            "domsnap.precopy.pause_events",
            "domsnap.background.pause_events",
            "qemu.live_unlimited.downtime",
            "qemu.live_like_ours.downtime",
            "qemu.live_default.downtime",
            "qemu.background_snapshot.downtime",
            "domsnap.background_huge.pause_events",
            "qemu.background_snapshot_huge.downtime",
        ],
    },
    GridRow {
        quantity: "total time (ours: `Orchestrator::create`; QEMU: `migrate` → `completed`), median",
        pick: Pick::Median,
        series: &[
            "domsnap.precopy.wall",
            "domsnap.background.wall",
            "qemu.live_unlimited.wall",
            "qemu.live_like_ours.wall",
            "qemu.live_default.wall",
            "qemu.background_snapshot.wall",
            "domsnap.background_huge.wall",
            "qemu.background_snapshot_huge.wall",
        ],
    },
    GridRow {
        quantity: "image (bytes allocated) / file length, largest",
        pick: Pick::Max,
        series: &[
            "domsnap.precopy.image_allocated",
            "domsnap.background.image_allocated",
            "qemu.live_unlimited.file_bytes",
            "qemu.live_like_ours.file_bytes",
            "qemu.live_default.file_bytes",
            "qemu.background_snapshot.file_bytes",
            "domsnap.background_huge.image_allocated",
            "qemu.background_snapshot_huge.file_bytes",
        ],
    },
    GridRow {
        quantity: "passes over RAM (QEMU: dirty-bitmap syncs), median",
        pick: Pick::Median,
        series: &[
            "domsnap.precopy.passes",
            "domsnap.background.passes",
            "qemu.live_unlimited.dirty_syncs",
            "qemu.live_like_ours.dirty_syncs",
            "qemu.live_default.dirty_syncs",
            "qemu.background_snapshot.dirty_syncs",
            "domsnap.background_huge.passes",
            "qemu.background_snapshot_huge.dirty_syncs",
        ],
    },
];
