//! Validation of snapshot names and image paths, and relative backing paths.

use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};

/// Longest snapshot name accepted.
pub const MAX_NAME_LEN: usize = 128;

/// Accepts names of 1 to 128 characters from `[A-Za-z0-9._:+@-]`, starting with a letter or
/// digit and not made of digits only (QEMU looks snapshots up by id first, and ids are numbers).
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    let refuse = |reason: &str| {
        Err(Error::InvalidArgument {
            what: "snapshot name",
            value: name.into(),
            reason: reason.into(),
        })
    };
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return refuse("must be 1 to 128 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._:+@-".contains(&b))
    {
        return refuse("only letters, digits and . _ : + @ - are allowed");
    }
    if !name.as_bytes()[0].is_ascii_alphanumeric() {
        return refuse("must start with a letter or digit");
    }
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return refuse("must not be all digits (it would be mistaken for a snapshot id)");
    }
    Ok(())
}

/// Checks an image path given by the caller: absolute, no `.`/`..` components (so it cannot
/// escape the folder it names), a plain file name, and an existing parent folder.
pub fn validate_image_path(path: &Path, what: &'static str) -> Result<()> {
    let refuse = |reason: &str| {
        Err(Error::InvalidArgument {
            what,
            value: path.display().to_string(),
            reason: reason.into(),
        })
    };
    if !path.is_absolute() {
        return refuse("must be an absolute path");
    }
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
    {
        return refuse("must not contain . or .. components");
    }
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return refuse("must end in a UTF-8 file name");
    };
    if name.chars().any(char::is_control) || name.starts_with('.') {
        return refuse("file name must not start with a dot or contain control characters");
    }
    if !path.parent().is_some_and(Path::is_dir) {
        return refuse("its folder does not exist");
    }
    Ok(())
}

/// Whether two paths name the same file (after resolving symlinks and `..`).
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// The path of `target` relative to the folder `from` (both absolute and normalised), as QEMU
/// resolves a relative backing file name against the overlay's folder.
pub fn relative_to(target: &Path, from: &Path) -> PathBuf {
    let target: Vec<Component<'_>> = target.components().collect();
    let from: Vec<Component<'_>> = from.components().collect();
    let common = target.iter().zip(&from).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..from.len() {
        out.push("..");
    }
    for c in &target[common..] {
        out.push(c);
    }
    out
}

/// The overlay an external snapshot named `snapshot` of `image` gets when the caller names no
/// path: beside the image, `STEM.SNAPSHOT.qcow2`.
pub fn snapshot_overlay_path(image: &Path, snapshot: &str) -> PathBuf {
    image.with_file_name(format!("{}.{snapshot}.qcow2", file_stem(image)))
}

/// The fresh overlay a revert to an external snapshot starts the disk on: beside the snapshot's
/// overlay, stamped with the revert's time (`STEM.revert-STAMP.qcow2`), so reverting to the same
/// snapshot twice never reuses a file.
pub fn revert_overlay_path(overlay: &Path, stamp: u64) -> PathBuf {
    overlay.with_file_name(format!("{}.revert-{stamp}.qcow2", file_stem(overlay)))
}

fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_names() {
        for ok in ["s1", "before-upgrade", "2024.01.01_x", "a:b@c+d"] {
            validate_snapshot_name(ok).unwrap();
        }
        for bad in ["", "12", "-x", ".hidden", "a b", "a/b", "é", &"x".repeat(129)] {
            assert!(validate_snapshot_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn image_paths() {
        let dir = tempfile::tempdir().unwrap();
        validate_image_path(&dir.path().join("o.qcow2"), "overlay").unwrap();
        for bad in ["rel.qcow2", "/nonexistent-dir/o.qcow2"] {
            assert!(validate_image_path(Path::new(bad), "overlay").is_err());
        }
        assert!(validate_image_path(&dir.path().join("../o.qcow2"), "overlay").is_err());
        assert!(validate_image_path(&dir.path().join(".o.qcow2"), "overlay").is_err());
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_to(Path::new("/a/b/base.qcow2"), Path::new("/a/b")),
            Path::new("base.qcow2")
        );
        assert_eq!(
            relative_to(Path::new("/a/base.qcow2"), Path::new("/a/b/c")),
            Path::new("../../base.qcow2")
        );
        assert_eq!(
            relative_to(Path::new("/x/y/base"), Path::new("/a")),
            Path::new("../x/y/base")
        );
    }

    #[test]
    fn overlay_names_sit_beside_their_image() {
        assert_eq!(
            snapshot_overlay_path(Path::new("/vm/vdb.qcow2"), "s1"),
            Path::new("/vm/vdb.s1.qcow2")
        );
        assert_eq!(
            revert_overlay_path(Path::new("/vm/vdb.s1.qcow2"), 42),
            Path::new("/vm/vdb.s1.revert-42.qcow2")
        );
    }
}
