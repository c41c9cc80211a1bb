//! A writer for the `newc` cpio format (what the Linux kernel unpacks as an initramfs).
//!
//! Each entry is a 110-byte ASCII header (`070701` then 13 eight-digit hex fields: ino, mode, uid, gid,
//! nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize, check), the NUL-terminated
//! name padded to a multiple of 4 bytes (counting from the header's start), then the data padded the same
//! way. The archive ends with an entry named `TRAILER!!!`. Owners are root, times are 0, so the same
//! inputs give the same bytes.

use std::io::{self, Write};

/// File-type bits of `mode`.
pub const S_IFDIR: u32 = 0o040000;
/// Regular file.
pub const S_IFREG: u32 = 0o100000;
/// Character device.
pub const S_IFCHR: u32 = 0o020000;
/// Symbolic link.
pub const S_IFLNK: u32 = 0o120000;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";

/// Streams a newc archive into `W`.
#[derive(Debug)]
pub struct Writer<W: Write> {
    out: W,
    offset: u64,
    next_ino: u32,
}

impl<W: Write> Writer<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Writer<W> {
        Writer {
            out,
            offset: 0,
            next_ino: 1,
        }
    }

    /// Adds a directory (`name` without a leading `/`, e.g. `dev`).
    pub fn dir(&mut self, name: &str, perm: u32) -> io::Result<()> {
        self.entry(name, S_IFDIR | perm, 2, (0, 0), &[])
    }

    /// Adds a regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, S_IFREG | perm, 1, (0, 0), data)
    }

    /// Adds a character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> io::Result<()> {
        self.entry(name, S_IFCHR | perm, 1, (major, minor), &[])
    }

    /// Adds a symbolic link pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// Writes the trailer and returns the output and the archive's size in bytes.
    pub fn finish(mut self) -> io::Result<(W, u64)> {
        self.header(TRAILER, 0, 0, 1, (0, 0), 0)?;
        self.out.flush()?;
        Ok((self.out, self.offset))
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, rdev: (u32, u32), data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        if name.is_empty() || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad cpio name {name:?}"),
            ));
        }
        let size = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{name}: file too large")))?;
        let ino = self.next_ino;
        self.next_ino += 1;
        self.header(name, ino, mode, nlink, rdev, size)?;
        self.write(data)?;
        self.pad()
    }

    fn header(
        &mut self,
        name: &str,
        ino: u32,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        size: u32,
    ) -> io::Result<()> {
        let namesize = name.len() + 1;
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}\
             {devmajor:08x}{devminor:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
            uid = 0,
            gid = 0,
            mtime = 0,
            devmajor = 0,
            devminor = 0,
            rmaj = rdev.0,
            rmin = rdev.1,
            check = 0,
        );
        debug_assert_eq!(header.len(), 110);
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.offset += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let pad = (4 - (self.offset % 4) as usize) % 4;
        self.write(&[0u8; 3][..pad])
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One parsed entry: (name, mode, rdev major, rdev minor, data).
    pub(crate) type Entry = (String, u32, u32, u32, Vec<u8>);

    fn field(h: &[u8], i: usize) -> u32 {
        let s = std::str::from_utf8(&h[6 + 8 * i..14 + 8 * i]).unwrap();
        u32::from_str_radix(s, 16).unwrap()
    }

    /// A strict newc reader, for the tests.
    pub(crate) fn parse(archive: &[u8]) -> Vec<Entry> {
        let mut entries = Vec::new();
        let mut off = 0usize;
        loop {
            assert_eq!(off % 4, 0, "entry not 4-aligned");
            let h = &archive[off..off + 110];
            assert_eq!(&h[..6], MAGIC.as_bytes());
            let (mode, size, rmaj, rmin, namesize) =
                (field(h, 1), field(h, 6), field(h, 9), field(h, 10), field(h, 11));
            let name_start = off + 110;
            let name = &archive[name_start..name_start + namesize as usize];
            assert_eq!(name.last(), Some(&0));
            let name = String::from_utf8(name[..name.len() - 1].to_vec()).unwrap();
            let data_start = (name_start + namesize as usize).next_multiple_of(4);
            let data = archive[data_start..data_start + size as usize].to_vec();
            off = (data_start + size as usize).next_multiple_of(4);
            if name == TRAILER {
                assert_eq!(off, archive.len(), "bytes after the trailer");
                return entries;
            }
            entries.push((name, mode, rmaj, rmin, data));
        }
    }

    #[test]
    fn round_trip() {
        let mut w = Writer::new(Vec::new());
        w.dir("dev", 0o755).unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("a", 0o644, b"").unwrap();
        w.file("odd-name", 0o644, b"12345").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        let (bytes, size) = w.finish().unwrap();
        assert_eq!(usize::try_from(size).unwrap(), bytes.len());
        assert_eq!(bytes.len() % 4, 0);
        let entries = parse(&bytes);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["dev", "dev/console", "init", "a", "odd-name", "bin/sh"]);
        assert_eq!(entries[0].1, S_IFDIR | 0o755);
        assert_eq!(
            (entries[1].1, entries[1].2, entries[1].3),
            (S_IFCHR | 0o600, 5, 1)
        );
        assert_eq!(entries[2].4, b"#!/bin/sh\n");
        assert_eq!(entries[4].4, b"12345");
        assert_eq!(
            (entries[5].1, entries[5].4.as_slice()),
            (S_IFLNK | 0o777, &b"busybox"[..])
        );
    }

    #[test]
    fn deterministic_and_rejects_bad_names() {
        let build = || {
            let mut w = Writer::new(Vec::new());
            w.file("x", 0o644, b"data").unwrap();
            w.finish().unwrap().0
        };
        assert_eq!(build(), build());
        let mut w = Writer::new(Vec::new());
        assert!(w.file("/", 0o644, b"").is_err());
        assert!(w.file("a\0b", 0o644, b"").is_err());
    }
}
