//! The argument structures of the C API (`libxl_domain_snapshot_args`'s shape) and their
//! reading into checked Rust values.

use std::{
    ffi::{c_char, c_int, CStr},
    path::PathBuf,
};

use snapshot_core::ListFilter;

use crate::error::CapiError;

/// One disk's part of a snapshot, `disks[]` of `domsnap_snapshot_args`. A disk the array does
/// not name gets an internal snapshot named like the snapshot.
#[allow(non_camel_case_types, reason = "the C name, as the header spells it")]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct domsnap_disk_args {
    /// The disk's id in the domain configuration (`vda`, ...). Required.
    pub device: *const c_char,
    /// The internal snapshot's name in the image; NULL: the snapshot's name. Internal snapshots
    /// only (qcow2's rules: 1 to 128 of `[A-Za-z0-9._:+@-]`, starting with a letter or digit,
    /// not all digits).
    pub name: *const c_char,
    /// false: an internal qcow2 snapshot in the image. true: a new overlay (the domain writes to
    /// it from then on; the image below is the snapshot).
    pub external: bool,
    /// The overlay's format; NULL: qcow2 (the only one supported: another one is
    /// `DOMSNAP_UNSUPPORTED`). External snapshots only.
    pub external_format: *const c_char,
    /// Where the overlay goes (it must not exist; a relative path is taken from the process's
    /// working directory); NULL: `IMAGESTEM.SNAPSHOT.qcow2` beside the image. External
    /// snapshots only.
    pub external_path: *const c_char,
    /// true: leave this disk out of the snapshot (no snapshot of it; the record says so, and a
    /// revert leaves the disk as it is then). Every other field but `device` must then be
    /// NULL/false.
    pub exclude: bool,
}

/// A snapshot's arguments, `libxl_domain_snapshot_args`'s counterpart. Zero-initialise it
/// (`domsnap_snapshot_args args = {0};`) and set what you need. Create reads every field;
/// delete and revert read only `name` (the snapshot's record knows the rest).
#[allow(non_camel_case_types, reason = "the C name, as the header spells it")]
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct domsnap_snapshot_args {
    /// The snapshot's name (`[A-Za-z0-9_.-]{1,64}`, not starting with a dot). Required.
    pub name: *const c_char,
    /// Free text stored with the snapshot; NULL: none.
    pub description: *const c_char,
    /// true: memory and device state too (a running or paused domain). false: a disk-only
    /// snapshot (of a running domain: its disks in one atomic step, the guest is not paused; a
    /// revert leaves the domain shut off). A shut-off domain always gets a disk-only snapshot.
    pub memory: bool,
    /// Where the memory image goes (relative: from the working directory; its folder must
    /// exist, the file must not, and it must not be inside a snapshot's folder); NULL: the
    /// snapshot's folder in the state directory. The device state stays in the snapshot's
    /// folder. Set with `memory = false` it is `DOMSNAP_INVALID_ARGUMENT`.
    pub memory_path: *const c_char,
    /// How many entries `disks` has (0: every disk gets an internal snapshot).
    pub num_disks: usize,
    /// The per-disk choices; NULL when `num_disks` is 0.
    pub disks: *const domsnap_disk_args,
    /// true: freeze the guest's filesystems through its guest agent (`guest_agent = true` and
    /// qemu-guest-agent in the guest) while the snapshot is taken; they are thawed on every
    /// path. Needs a running domain (`DOMSNAP_INVALID_ARGUMENT` otherwise) with an agent
    /// channel (`DOMSNAP_UNSUPPORTED` otherwise); both are refused before anything changes.
    pub quiesce: bool,
}

/// More disks than any domain has: a larger `num_disks` is a caller's mistake (garbage), not a
/// request.
const MAX_DISKS: usize = 1024;

/// One disk's choice, read from `domsnap_disk_args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskArgs {
    /// The disk's id.
    pub device: String,
    /// The internal snapshot's name, when given.
    pub name: Option<String>,
    /// Internal or external, and the overlay's path and format.
    pub kind: DiskArgsKind,
}

/// Internal, external or left out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskArgsKind {
    /// An internal snapshot.
    Internal,
    /// No snapshot of the disk.
    Excluded,
    /// An overlay.
    External {
        /// Its path (absolute).
        path: Option<PathBuf>,
        /// Its format.
        format: Option<String>,
    },
}

/// A snapshot's arguments, read from `domsnap_snapshot_args`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotArgs {
    /// The snapshot's name (not yet checked against the naming rules).
    pub name: String,
    /// Its description.
    pub description: Option<String>,
    /// Memory too.
    pub memory: bool,
    /// The memory image's path, when given.
    pub memory_path: Option<PathBuf>,
    /// The per-disk choices.
    pub disks: Vec<DiskArgs>,
    /// Freeze the filesystems for the snapshot.
    pub quiesce: bool,
}

/// A required C string argument as UTF-8 text.
///
/// # Safety
/// `text` is NULL or points to a NUL-terminated string that stays alive and unchanged during
/// the call.
pub unsafe fn required(text: *const c_char, what: &str) -> Result<String, CapiError> {
    // SAFETY: the caller's contract.
    unsafe { optional(text, what) }?.ok_or_else(|| CapiError::InvalidArgument(format!("{what} is NULL")))
}

/// An optional C string argument (NULL: `None`) as UTF-8 text.
///
/// # Safety
/// As [`required`].
pub unsafe fn optional(text: *const c_char, what: &str) -> Result<Option<String>, CapiError> {
    if text.is_null() {
        return Ok(None);
    }
    // SAFETY: not NULL, and NUL-terminated and alive by the caller's contract.
    let text = unsafe { CStr::from_ptr(text) };
    let text = text
        .to_str()
        .map_err(|e| CapiError::InvalidArgument(format!("{what} is not UTF-8: {e}")))?;
    Ok(Some(text.to_owned()))
}

/// A path argument, made absolute against the working directory.
fn absolute(path: String, what: &str) -> Result<PathBuf, CapiError> {
    let path = PathBuf::from(path);
    if path.is_absolute() {
        return Ok(path);
    }
    let cwd = std::env::current_dir().map_err(|e| {
        CapiError::InvalidArgument(format!(
            "{what} {} is relative and the working directory is unknown: {e}",
            path.display()
        ))
    })?;
    Ok(cwd.join(path))
}

/// Reads the caller's snapshot arguments.
///
/// # Safety
/// `args` is NULL or points to a `domsnap_snapshot_args` whose strings are NULL or
/// NUL-terminated, and whose `disks` is NULL or points to `num_disks` entries, all alive and
/// unchanged during the call.
pub unsafe fn read_snapshot_args(args: *const domsnap_snapshot_args) -> Result<SnapshotArgs, CapiError> {
    // SAFETY: NULL or a valid structure, by the caller's contract.
    let args = unsafe { args.as_ref() }.ok_or_else(|| CapiError::InvalidArgument("args is NULL".into()))?;
    // SAFETY: the strings are NULL or valid, by the caller's contract.
    let (name, description, memory_path) = unsafe {
        (
            required(args.name, "args->name")?,
            optional(args.description, "args->description")?,
            optional(args.memory_path, "args->memory_path")?,
        )
    };
    let entries: &[domsnap_disk_args] = match (args.num_disks, args.disks.is_null()) {
        (0, _) => &[],
        (_, true) => {
            return Err(CapiError::InvalidArgument(format!(
                "args->disks is NULL but args->num_disks is {}",
                args.num_disks
            )))
        }
        (count, false) if count > MAX_DISKS => {
            return Err(CapiError::InvalidArgument(format!(
                "args->num_disks is {count}: more than {MAX_DISKS} disks"
            )))
        }
        // SAFETY: not NULL, and `num_disks` valid entries by the caller's contract.
        (count, false) => unsafe { std::slice::from_raw_parts(args.disks, count) },
    };
    let disks = entries
        .iter()
        .enumerate()
        // SAFETY: each entry's strings are NULL or valid, by the caller's contract.
        .map(|(index, disk)| unsafe { read_disk(disk, index) })
        .collect::<Result<_, _>>()?;
    Ok(SnapshotArgs {
        name,
        description,
        memory: args.memory,
        memory_path: memory_path
            .map(|p| absolute(p, "args->memory_path"))
            .transpose()?,
        disks,
        quiesce: args.quiesce,
    })
}

/// Reads `disks[index]`.
///
/// # Safety
/// The entry's strings are NULL or NUL-terminated, alive and unchanged during the call.
unsafe fn read_disk(disk: &domsnap_disk_args, index: usize) -> Result<DiskArgs, CapiError> {
    let what = |field: &str| format!("args->disks[{index}].{field}");
    // SAFETY: the strings are NULL or valid, by the caller's contract.
    let (device, name, format, path) = unsafe {
        (
            required(disk.device, &what("device"))?,
            optional(disk.name, &what("name"))?,
            optional(disk.external_format, &what("external_format"))?,
            optional(disk.external_path, &what("external_path"))?,
        )
    };
    let kind = if disk.exclude {
        if let Some(field) = [
            ("name", &name),
            ("external_format", &format),
            ("external_path", &path),
        ]
        .iter()
        .find_map(|(field, value)| value.is_some().then_some(*field))
        .or(disk.external.then_some("external"))
        {
            return Err(CapiError::InvalidArgument(format!(
                "{} is set but disk {device} is left out (exclude = true)",
                what(field)
            )));
        }
        DiskArgsKind::Excluded
    } else if disk.external {
        if name.is_some() {
            return Err(CapiError::InvalidArgument(format!(
                "{} is set for an external snapshot of disk {device}: only internal snapshots have \
                 a name in the image",
                what("name")
            )));
        }
        DiskArgsKind::External {
            path: path.map(|p| absolute(p, &what("external_path"))).transpose()?,
            format,
        }
    } else {
        if let Some(field) = [("external_format", &format), ("external_path", &path)]
            .iter()
            .find_map(|(field, value)| value.is_some().then_some(*field))
        {
            return Err(CapiError::InvalidArgument(format!(
                "{} is set but disk {device} is not external",
                what(field)
            )));
        }
        DiskArgsKind::Internal
    };
    Ok(DiskArgs { device, name, kind })
}

/// Which snapshots `domsnap_snapshot_list_filtered` keeps (pass the value as an `int`).
#[allow(non_camel_case_types, reason = "the C name, as the header spells it")]
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum domsnap_list_filter {
    /// Every snapshot.
    DOMSNAP_LIST_ALL = 0,
    /// The snapshots without a parent.
    DOMSNAP_LIST_ROOTS = 1,
    /// The snapshots without children.
    DOMSNAP_LIST_LEAVES = 2,
    /// The current snapshot only (none if the domain has none).
    DOMSNAP_LIST_CURRENT = 3,
}

impl domsnap_list_filter {
    /// The filter a C caller passed; another value is `DOMSNAP_INVALID_ARGUMENT`.
    pub fn read(value: c_int) -> Result<ListFilter, CapiError> {
        Ok(match value {
            0 => ListFilter::All,
            1 => ListFilter::Roots,
            2 => ListFilter::Leaves,
            3 => ListFilter::Current,
            _ => {
                return Err(CapiError::InvalidArgument(format!(
                    "filter {value} is no domsnap_list_filter"
                )))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use std::ptr::null;

    use super::*;
    use snapshot_core::ErrorClass;

    fn args(name: *const c_char, disks: &[domsnap_disk_args]) -> domsnap_snapshot_args {
        domsnap_snapshot_args {
            name,
            description: null(),
            memory: true,
            memory_path: null(),
            num_disks: disks.len(),
            disks: if disks.is_empty() { null() } else { disks.as_ptr() },
            quiesce: false,
        }
    }

    fn disk(device: &CStr, external: bool) -> domsnap_disk_args {
        domsnap_disk_args {
            device: device.as_ptr(),
            name: null(),
            external,
            external_format: null(),
            external_path: null(),
            exclude: false,
        }
    }

    fn read(args: &domsnap_snapshot_args) -> Result<SnapshotArgs, CapiError> {
        // SAFETY: every pointer in `args` is NULL or points to a live C string or array.
        unsafe { read_snapshot_args(args) }
    }

    #[test]
    fn arguments_are_read_with_relative_paths_made_absolute() {
        let mut external = disk(c"vdb", true);
        external.external_path = c"o.qcow2".as_ptr();
        let disks = [disk(c"vda", false), external];
        let read = read(&args(c"s1".as_ptr(), &disks)).unwrap();
        assert_eq!(read.name, "s1");
        assert_eq!(read.disks[0].kind, DiskArgsKind::Internal);
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            read.disks[1].kind,
            DiskArgsKind::External {
                path: Some(cwd.join("o.qcow2")),
                format: None
            }
        );
    }

    #[test]
    fn unusable_arguments_are_invalid_and_say_which() {
        let class = |result: Result<SnapshotArgs, CapiError>| {
            let error = result.unwrap_err();
            (error.class(), error.message())
        };
        // SAFETY: NULL is allowed.
        let null_args = unsafe { read_snapshot_args(null()) };
        assert_eq!(class(null_args).1, "args is NULL");
        assert_eq!(class(read(&args(null(), &[]))).1, "args->name is NULL");
        let bad = [0xffu8, 0];
        let (code, message) = class(read(&args(bad.as_ptr().cast(), &[])));
        assert_eq!(code, ErrorClass::InvalidArgument);
        assert!(message.starts_with("args->name is not UTF-8"), "{message}");
        let mut no_array = args(c"s".as_ptr(), &[]);
        no_array.num_disks = 2;
        assert!(class(read(&no_array)).1.contains("args->disks is NULL"));
        let mut internal_with_path = disk(c"vda", false);
        internal_with_path.external_path = c"/x".as_ptr();
        let message = class(read(&args(c"s".as_ptr(), &[internal_with_path]))).1;
        assert_eq!(
            message,
            "args->disks[0].external_path is set but disk vda is not external"
        );
        let mut external_with_name = disk(c"vdb", true);
        external_with_name.name = c"n".as_ptr();
        let message = class(read(&args(c"s".as_ptr(), &[external_with_name]))).1;
        assert!(
            message.starts_with("args->disks[0].name is set for an external"),
            "{message}"
        );
        let mut excluded_with_name = disk(c"vdb", false);
        excluded_with_name.exclude = true;
        excluded_with_name.name = c"n".as_ptr();
        let message = class(read(&args(c"s".as_ptr(), &[excluded_with_name]))).1;
        assert_eq!(
            message,
            "args->disks[0].name is set but disk vdb is left out (exclude = true)"
        );
        let mut excluded = disk(c"vdb", false);
        excluded.exclude = true;
        let read_back = read(&args(c"s".as_ptr(), &[excluded])).unwrap();
        assert_eq!(read_back.disks[0].kind, DiskArgsKind::Excluded);
    }
}
