//! `snapshot list` (its filters and the tree, also as nested JSON) and `snapshot current`.

use anyhow::Result;
use snapshot_core::{filter_records, ListFilter, Name, SnapshotRecord, SnapshotStore, SnapshotTree};

use crate::{
    contract::{Flat, Keyed},
    output::{self, SnapshotRow},
    App,
};

/// `snapshot list`'s filters: at most one.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[group(id = "filter", multiple = false)]
pub struct FilterArgs {
    /// Only the snapshots without a parent.
    #[arg(long)]
    roots: bool,
    /// Only the snapshots without children.
    #[arg(long)]
    leaves: bool,
    /// Only the current snapshot (none if the domain has none).
    #[arg(long)]
    current: bool,
}

impl FilterArgs {
    pub fn get(self) -> ListFilter {
        match (self.roots, self.leaves, self.current) {
            (true, _, _) => ListFilter::Roots,
            (_, true, _) => ListFilter::Leaves,
            (_, _, true) => ListFilter::Current,
            _ => ListFilter::All,
        }
    }
}

/// `snapshot current`'s document.
#[derive(Debug, serde::Serialize)]
struct CurrentDocument<'a> {
    domain: &'a Name,
    current: Option<&'a Name>,
}

impl App {
    /// `snapshot list`: rows (or the tree) of the snapshots `filter` keeps. Read-only: never
    /// waits for the domain's lock.
    pub(crate) async fn list(&self, domain: &Name, tree: bool, filter: ListFilter) -> Result<()> {
        self.note_activity(domain)?;
        // An unknown domain is an error, not an empty list.
        self.driver.status(domain).await?;
        let records = self.store.list(domain)?;
        let current = self.store.current(domain)?;
        let row = |record: &SnapshotRecord| SnapshotRow::new(record, current.as_ref());
        if tree {
            let tree = SnapshotTree::new(&records);
            return self.print(&Keyed::new("tree", &tree.nest(&row)), || {
                tree.render(current.as_ref())
            });
        }
        let rows: Vec<SnapshotRow> = filter_records(&records, filter, current.as_ref())
            .into_iter()
            .map(row)
            .collect();
        self.print(&Keyed::new("snapshots", &rows), || output::snapshots(&rows))
    }

    /// `snapshot current`: prints the current snapshot, or makes `snap` current first (under
    /// the domain's lock; an unknown snapshot is refused).
    pub(crate) async fn current(&self, domain: &Name, snap: Option<&Name>) -> Result<()> {
        if let Some(snap) = snap {
            self.orchestrator.set_current(domain, snap).await?;
        } else {
            self.note_activity(domain)?;
        }
        let current = self.orchestrator.current(domain)?;
        let document = CurrentDocument {
            domain,
            current: current.as_ref(),
        };
        self.print(&Flat::new(&document), || match &current {
            Some(current) => format!("{current}\n"),
            None => format!("domain {domain} has no current snapshot\n"),
        })
    }
}
