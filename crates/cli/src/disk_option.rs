//! `--disk ID=...`: one disk's part of a snapshot, as the command line spells it.

use std::path::PathBuf;

use anyhow::Result;
use snapshot_core::{DiskKind, DiskRequest};

use crate::contract::BadArgument;

/// What `--disk` accepts, for its help and its errors.
pub const FORMS: &str = "ID=internal[:NAME]|external[:PATH[:FORMAT]]|no";

/// Parses `ID=internal[:NAME]`, `ID=external[:PATH[:FORMAT]]` or `ID=no`.
pub fn parse_disk(text: &str) -> Result<DiskRequest> {
    let bad = |why: &str| BadArgument(format!("--disk {text:?}: {why}"));
    let (target, kind) = text
        .split_once('=')
        .ok_or_else(|| bad(&format!("expected {FORMS}")))?;
    if target.is_empty() {
        return Err(bad("the disk id is empty").into());
    }
    let kind = match kind.split_once(':').unwrap_or((kind, "")) {
        ("internal", "") if !kind.ends_with(':') => DiskKind::Internal { name: None },
        ("internal", name) if !name.is_empty() && !name.contains(':') => DiskKind::Internal {
            name: Some(name.to_owned()),
        },
        ("no", "") if kind == "no" => DiskKind::Excluded,
        ("external", rest) => external(rest)?,
        _ => {
            return Err(bad(&format!(
                "the kind must be internal[:NAME], external[:PATH[:FORMAT]] or no ({FORMS})"
            ))
            .into())
        }
    };
    Ok(DiskRequest {
        target: target.to_owned(),
        kind,
    })
}

/// `PATH[:FORMAT]` of an external snapshot; a relative path is taken from the working folder.
fn external(rest: &str) -> Result<DiskKind> {
    let (path, format) = rest.split_once(':').unwrap_or((rest, ""));
    let path = match path {
        "" => None,
        path => Some(std::path::absolute(PathBuf::from(path))?),
    };
    Ok(DiskKind::External {
        path,
        format: (!format.is_empty()).then(|| format.to_owned()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_options_parse_and_bad_ones_are_explained() {
        let kind = |text: &str| parse_disk(text).unwrap().kind;
        assert_eq!(kind("vda=internal"), DiskKind::Internal { name: None });
        assert_eq!(
            kind("vda=internal:before-upgrade"),
            DiskKind::Internal {
                name: Some("before-upgrade".into())
            }
        );
        assert_eq!(kind("vdb=no"), DiskKind::Excluded);
        assert_eq!(
            kind("vdb=external:/a/b.qcow2:qcow2"),
            DiskKind::External {
                path: Some("/a/b.qcow2".into()),
                format: Some("qcow2".into())
            }
        );
        assert_eq!(
            kind("vdb=external"),
            DiskKind::External {
                path: None,
                format: None
            }
        );
        for bad in [
            "vda",
            "vda=copy",
            "=internal",
            "vda=internal:",
            "vda=internal:a:b",
            "vda=no:x",
            "vda=none",
        ] {
            let error = parse_disk(bad).unwrap_err().to_string();
            assert!(error.contains(bad), "{bad}: {error}");
        }
    }
}
