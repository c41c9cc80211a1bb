//! `snapshot list` (its filters and the tree, also as nested JSON) and `snapshot current`.

use anyhow::Result;
use snapshot_core::{Name, SnapshotRecord, SnapshotStore, SnapshotTree};

use crate::{
    contract::{Flat, Keyed},
    output::{self, SnapshotRow},
    App,
};

/// `snapshot list`'s filters: at most one.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[group(id = "filter", multiple = false)]
pub struct ListFilter {
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

/// Which snapshots `snapshot list` shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Filter {
    All,
    Roots,
    Leaves,
    Current,
}

impl ListFilter {
    pub fn get(self) -> Filter {
        match (self.roots, self.leaves, self.current) {
            (true, _, _) => Filter::Roots,
            (_, true, _) => Filter::Leaves,
            (_, _, true) => Filter::Current,
            _ => Filter::All,
        }
    }
}

/// The records `filter` keeps, in creation order.
fn filtered<'a>(
    records: &'a [SnapshotRecord],
    filter: Filter,
    current: Option<&Name>,
) -> Vec<&'a SnapshotRecord> {
    let tree = SnapshotTree::new(records);
    records
        .iter()
        .filter(|record| match filter {
            Filter::All => true,
            Filter::Roots => tree.roots().iter().any(|root| root.name == record.name),
            Filter::Leaves => tree.is_leaf(&record.name),
            Filter::Current => current == Some(&record.name),
        })
        .collect()
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
    pub(crate) async fn list(&self, domain: &Name, tree: bool, filter: Filter) -> Result<()> {
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
        let rows: Vec<SnapshotRow> = filtered(&records, filter, current.as_ref())
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, parent: Option<&str>) -> SnapshotRecord {
        serde_json::from_value(serde_json::json!({
            "version": 1, "name": name, "domain": "d", "created_unix_ms": 0,
            "parent": parent, "state": "shut-off", "config": null, "disks": []
        }))
        .unwrap()
    }

    #[test]
    fn filters_keep_roots_leaves_or_the_current_snapshot() {
        let records = [
            record("a", None),
            record("b", Some("a")),
            record("c", Some("a")),
            record("x", None),
        ];
        let names = |filter, current: Option<&str>| {
            let current = current.map(|c| Name::new(c).unwrap());
            filtered(&records, filter, current.as_ref())
                .iter()
                .map(|r| r.name.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(Filter::All, None), ["a", "b", "c", "x"]);
        assert_eq!(names(Filter::Roots, None), ["a", "x"]);
        assert_eq!(names(Filter::Leaves, None), ["b", "c", "x"]);
        assert_eq!(names(Filter::Current, Some("b")), ["b"]);
        assert!(names(Filter::Current, None).is_empty());
    }
}
