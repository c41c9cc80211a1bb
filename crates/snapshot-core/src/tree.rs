//! The snapshot tree of one domain: parents, children, and a printable view.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::{metadata::SnapshotRecord, name::Name};

/// One snapshot of a nested tree ([`SnapshotTree::nest`]): what the caller made of its record,
/// and its children.
#[derive(Debug, Clone, Serialize)]
pub struct TreeNode<T> {
    /// The snapshot, as the caller describes it (its keys come first in JSON).
    #[serde(flatten)]
    pub item: T,
    /// Its children, in creation order.
    pub children: Vec<TreeNode<T>>,
}

/// Which snapshots a listing keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ListFilter {
    /// Every snapshot.
    #[default]
    All,
    /// The snapshots without a parent (among the records).
    Roots,
    /// The snapshots without children.
    Leaves,
    /// The current snapshot only (none if the domain has none).
    Current,
}

/// The records `filter` keeps, in their order (`current`: the domain's current snapshot).
pub fn filter_records<'a>(
    records: &'a [SnapshotRecord],
    filter: ListFilter,
    current: Option<&Name>,
) -> Vec<&'a SnapshotRecord> {
    let tree = SnapshotTree::new(records);
    records
        .iter()
        .filter(|record| match filter {
            ListFilter::All => true,
            ListFilter::Roots => tree.roots().iter().any(|root| root.name == record.name),
            ListFilter::Leaves => tree.is_leaf(&record.name),
            ListFilter::Current => current == Some(&record.name),
        })
        .collect()
}

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

    /// The snapshots without a parent among the records, in creation order.
    pub fn roots(&self) -> &[&'a SnapshotRecord] {
        &self.roots
    }

    /// Whether `name` has no children.
    pub fn is_leaf(&self, name: &Name) -> bool {
        self.children(name).is_empty()
    }

    /// The whole tree as nested nodes, each snapshot described by `describe`.
    pub fn nest<T>(&self, describe: &impl Fn(&SnapshotRecord) -> T) -> Vec<TreeNode<T>> {
        self.roots.iter().map(|root| self.node(root, describe)).collect()
    }

    fn node<T>(&self, record: &SnapshotRecord, describe: &impl Fn(&SnapshotRecord) -> T) -> TreeNode<T> {
        TreeNode {
            item: describe(record),
            children: self
                .children(&record.name)
                .iter()
                .map(|child| self.node(child, describe))
                .collect(),
        }
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

    /// One line per snapshot, indented by depth, the current one marked with `*` and broken
    /// ones with `(broken)`.
    pub fn render(&self, current: Option<&Name>) -> String {
        let mut out = String::new();
        let mut stack: Vec<(&SnapshotRecord, usize)> = self.roots.iter().rev().map(|r| (*r, 0)).collect();
        while let Some((record, depth)) = stack.pop() {
            let marker = if Some(&record.name) == current { " *" } else { "" };
            let broken = if record.broken.is_some() { " (broken)" } else { "" };
            out.push_str(&format!(
                "{}{}{marker}{broken}\n",
                "  ".repeat(depth),
                record.name
            ));
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
            broken: None,
            chains: Default::default(),
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
        let roots: Vec<String> = tree.roots().iter().map(|r| r.name.to_string()).collect();
        assert_eq!(roots, ["s1", "orphan"]);
        assert!(!tree.is_leaf(&s1) && tree.is_leaf(&Name::new("s2").unwrap()));
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
            filter_records(&records, filter, current.as_ref())
                .iter()
                .map(|r| r.name.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(ListFilter::All, None), ["a", "b", "c", "x"]);
        assert_eq!(names(ListFilter::Roots, None), ["a", "x"]);
        assert_eq!(names(ListFilter::Leaves, None), ["b", "c", "x"]);
        assert_eq!(names(ListFilter::Current, Some("b")), ["b"]);
        assert!(names(ListFilter::Current, None).is_empty());
    }

    #[test]
    fn the_tree_nests_as_json_and_marks_broken_snapshots() {
        let mut records = [
            record("s1", None),
            record("s2", Some("s1")),
            record("s3", Some("s2")),
        ];
        records[1].broken = Some(crate::metadata::Broken {
            since_unix_ms: 1,
            reasons: vec!["disk vda: image /x is missing".into()],
        });
        let tree = SnapshotTree::new(&records);
        let nested = tree.nest(&|r: &SnapshotRecord| serde_json::json!({ "name": r.name }));
        assert_eq!(
            serde_json::to_value(&nested).unwrap(),
            serde_json::json!([{ "name": "s1", "children": [
                { "name": "s2", "children": [ { "name": "s3", "children": [] } ] } ] }])
        );
        assert_eq!(tree.render(None), "s1\n  s2 (broken)\n    s3\n");
    }
}
