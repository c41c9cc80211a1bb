//! The snapshot tree of one domain: parents, children, and a printable view.

use std::collections::BTreeMap;

use crate::{metadata::SnapshotRecord, name::Name};

/// A domain's snapshots arranged by parent.
#[derive(Debug)]
pub struct SnapshotTree<'a> {
    roots: Vec<&'a SnapshotRecord>,
    children: BTreeMap<&'a Name, Vec<&'a SnapshotRecord>>,
}

impl<'a> SnapshotTree<'a> {
    /// Arranges `records` (in creation order, as the store lists them). A snapshot whose parent is
    /// not among them is shown as a root.
    pub fn new(records: &'a [SnapshotRecord]) -> Self {
        let known: Vec<&Name> = records.iter().map(|r| &r.name).collect();
        let mut roots = Vec::new();
        let mut children: BTreeMap<&Name, Vec<&SnapshotRecord>> = BTreeMap::new();
        for record in records {
            match &record.parent {
                Some(parent) if known.contains(&parent) => children.entry(parent).or_default().push(record),
                _ => roots.push(record),
            }
        }
        Self { roots, children }
    }

    /// The direct children of `name`, in creation order.
    pub fn children(&self, name: &Name) -> &[&'a SnapshotRecord] {
        self.children.get(name).map(Vec::as_slice).unwrap_or_default()
    }

    /// `name` and everything below it, parents before children.
    pub fn descendants(&self, name: &Name) -> Vec<&'a SnapshotRecord> {
        let mut found = Vec::new();
        let mut stack: Vec<&SnapshotRecord> = self.children(name).iter().rev().copied().collect();
        while let Some(record) = stack.pop() {
            found.push(record);
            stack.extend(self.children(&record.name).iter().rev());
        }
        found
    }

    /// One line per snapshot, indented by depth, the current one marked with `*`.
    pub fn render(&self, current: Option<&Name>) -> String {
        let mut out = String::new();
        let mut stack: Vec<(&SnapshotRecord, usize)> = self.roots.iter().rev().map(|r| (*r, 0)).collect();
        while let Some((record, depth)) = stack.pop() {
            let marker = if Some(&record.name) == current { " *" } else { "" };
            out.push_str(&format!("{}{}{marker}\n", "  ".repeat(depth), record.name));
            stack.extend(
                self.children(&record.name)
                    .iter()
                    .rev()
                    .map(|child| (*child, depth + 1)),
            );
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metadata::{DomainState, METADATA_VERSION};

    fn record(name: &str, parent: Option<&str>) -> SnapshotRecord {
        SnapshotRecord {
            version: METADATA_VERSION,
            name: Name::new(name).unwrap(),
            domain: Name::new("vm").unwrap(),
            description: None,
            created_unix_ms: 0,
            parent: parent.map(|p| Name::new(p).unwrap()),
            state: DomainState::ShutOff,
            config: serde_json::Value::Null,
            memory: None,
            disks: vec![],
            quiesced: false,
        }
    }

    #[test]
    fn branches_render_and_descend() {
        // s1 ─ s2
        //    └ s3 ─ s4        orphan (parent gone) is a root
        let records = [
            record("s1", None),
            record("s2", Some("s1")),
            record("s3", Some("s1")),
            record("s4", Some("s3")),
            record("orphan", Some("deleted")),
        ];
        let tree = SnapshotTree::new(&records);
        let s1 = Name::new("s1").unwrap();
        let names = |v: Vec<&SnapshotRecord>| v.iter().map(|r| r.name.to_string()).collect::<Vec<_>>();
        assert_eq!(names(tree.children(&s1).to_vec()), ["s2", "s3"]);
        assert_eq!(names(tree.descendants(&s1)), ["s2", "s3", "s4"]);
        assert_eq!(
            tree.render(Some(&Name::new("s4").unwrap())),
            "s1\n  s2\n  s3\n    s4 *\norphan\n"
        );
    }
}
