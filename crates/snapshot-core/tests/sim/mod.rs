//! The simulated hypervisor and disks the orchestrator's tests run against: mockall mocks over
//! shared state, and the real on-disk store.

#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses its part of the simulation"
)]

pub use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

pub use disk::MockDiskSnapshots;
pub use snapshot_core::{
    Activity, CaptureSignals, CreateOptions, DiskKind, DiskRequest, DiskTarget, DomainState, DriverResult,
    Error, FsStore, Hypervisor, IncomingRam, IncomingStart, Intent, LiveMethod, LiveOptions, MemoryAccess,
    MemoryLoad, MemoryMode, MemoryRead, MockHypervisor, Name, Operation, Orchestrator, Quiet,
    RecoveryOutcome, RevertOptions, SavedMemory, SnapshotStore, Standby, Step, StreamMode, StreamedSave,
};

pub const RAM: u64 = 4 << 20;

/// A lazy revert that leaves the domain paused.
pub const PAUSED: RevertOptions = RevertOptions {
    paused: true,
    eager: false,
};
/// An eager revert (memory copied into fresh RAM).
pub const EAGER: RevertOptions = RevertOptions {
    paused: false,
    eager: true,
};

/// The simulated domain and its disks.
#[derive(Debug, Clone)]
pub struct Sim {
    pub state: DomainState,
    pub disks: Vec<DiskTarget>,
    /// (image, snapshot name) pairs.
    pub internal: BTreeSet<(PathBuf, String)>,
    /// The internal snapshots applied by reverts, (image, snapshot name).
    pub applied: Vec<(PathBuf, String)>,
    /// The call that fails, e.g. "pause".
    pub fail: Option<&'static str>,
    /// Whether the hypervisor shares guest RAM (the toolstack can copy it).
    pub shared_ram: bool,
    /// Whether the hypervisor streams memory with its own dirty tracking.
    pub streams: bool,
    /// The hypervisor cannot map memory images: it falls back to fresh RAM.
    pub cannot_map: bool,
    /// The guest's filesystems are frozen.
    pub frozen: bool,
    /// The domain has no guest agent channel.
    pub no_agent: bool,
    /// The hypervisor can start a revert's new process beside the running one.
    pub standby_capable: bool,
    /// The standby process, with what its RAM got.
    pub standby: Option<IncomingStart>,
    /// How long the hypervisor takes to answer a pause (the vCPUs stop at once, as QEMU's do
    /// before it flushes the disks).
    pub pause_takes: Duration,
    pub calls: Vec<&'static str>,
}

pub type Shared = Arc<Mutex<Sim>>;

pub fn call(sim: &Shared, name: &'static str) -> DriverResult<()> {
    let mut sim = sim.lock().unwrap();
    sim.calls.push(name);
    if sim.fail == Some(name) {
        return Err(format!("injected failure in {name}").into());
    }
    Ok(())
}

pub fn disk_mock(sim: &Shared) -> MockDiskSnapshots {
    let mut disks = MockDiskSnapshots::new();
    let s = sim.clone();
    disks
        .expect_prepare_snapshots()
        .returning(move |_, _| call(&s, "prepare_snapshots").map_err(disk_error));
    let s = sim.clone();
    disks.expect_create_internal().returning(move |images, name| {
        call(&s, "create_internal").map_err(disk_error)?;
        let mut sim = s.lock().unwrap();
        for image in images {
            sim.internal.insert((image.clone(), name.to_owned()));
        }
        Ok(())
    });
    let s = sim.clone();
    disks.expect_delete_internal().returning(move |images, name| {
        call(&s, "delete_internal").map_err(disk_error)?;
        let mut sim = s.lock().unwrap();
        for image in images {
            sim.internal.remove(&(image.clone(), name.to_owned()));
        }
        Ok(())
    });
    let s = sim.clone();
    disks.expect_apply_internal().returning(move |images, name| {
        call(&s, "apply_internal").map_err(disk_error)?;
        let mut sim = s.lock().unwrap();
        sim.applied
            .extend(images.iter().map(|image| (image.clone(), name.to_owned())));
        Ok(())
    });
    let s = sim.clone();
    disks.expect_list_internal().returning(move |image| {
        let sim = s.lock().unwrap();
        Ok(sim
            .internal
            .iter()
            .filter(|(i, _)| i == image)
            .map(|(_, name)| disk::InternalSnapshot {
                id: "1".into(),
                name: name.clone(),
                date_sec: 0,
                date_nsec: 0,
                vm_clock_nsec: 0,
                disk_size: None,
                vm_state_size: 0,
            })
            .collect())
    });
    let s = sim.clone();
    disks.expect_create_external().returning(move |snapshots| {
        call(&s, "create_external").map_err(disk_error)?;
        // Real overlay files: the orchestrator's tidy-up reads their backing files.
        disk::offline::create_external(snapshots)?;
        let mut sim = s.lock().unwrap();
        for snapshot in snapshots {
            for disk in sim.disks.iter_mut().filter(|d| d.image == snapshot.disk) {
                disk.image = snapshot.overlay.clone();
            }
        }
        Ok(())
    });
    let s = sim.clone();
    // All or nothing, as the live backend's one transaction.
    disks
        .expect_create_snapshots()
        .returning(move |internal, external| {
            if !internal.is_empty() {
                call(&s, "create_internal").map_err(disk_error)?;
            }
            if !external.is_empty() {
                call(&s, "create_external").map_err(disk_error)?;
                disk::offline::create_external(external)?;
            }
            let mut sim = s.lock().unwrap();
            for snapshot in internal {
                sim.internal
                    .insert((snapshot.disk.clone(), snapshot.name.clone()));
            }
            for snapshot in external {
                for disk in sim.disks.iter_mut().filter(|d| d.image == snapshot.disk) {
                    disk.image = snapshot.overlay.clone();
                }
            }
            Ok(())
        });
    let s = sim.clone();
    disks.expect_revert_external().returning(move |revert| {
        call(&s, "revert_external").map_err(disk_error)?;
        disk::offline::create_external(std::slice::from_ref(revert))
    });
    let s = sim.clone();
    disks.expect_delete_external().returning(move |_, image, _| {
        call(&s, "delete_external").map_err(disk_error)?;
        // Committing the active overlay: the domain writes to its parent again.
        let parent = disk::offline::backing_file(image)?.expect("overlays have a parent");
        let mut sim = s.lock().unwrap();
        for disk in sim.disks.iter_mut().filter(|d| d.image == image) {
            disk.image = parent.clone();
        }
        Ok(parent)
    });
    disks.expect_backing_chain().returning(|_| Ok(Vec::new()));
    // The tidy-up reads backing files through the backend only: these are the real overlays'.
    disks.expect_backing_file().returning(disk::offline::backing_file);
    disks
}

pub fn disk_error(e: snapshot_core::DriverError) -> disk::Error {
    disk::Error::NotSupported {
        operation: "simulated",
        backend: "simulated",
        reason: e.to_string(),
    }
}

pub fn hypervisor(sim: &Shared) -> MockHypervisor {
    let mut h = MockHypervisor::new();
    let s = sim.clone();
    h.expect_state().returning(move |_| Ok(s.lock().unwrap().state));
    h.expect_config()
        .returning(|_| Ok(serde_json::json!({"memory_mib": 4})));
    let s = sim.clone();
    h.expect_disks()
        .returning(move |_| Ok(s.lock().unwrap().disks.clone()));
    let s = sim.clone();
    h.expect_pause().returning(move |_| {
        call(&s, "pause")?;
        s.lock().unwrap().state = DomainState::Paused;
        Ok(())
    });
    let s = sim.clone();
    h.expect_resume().returning(move |_| {
        call(&s, "resume")?;
        s.lock().unwrap().state = DomainState::Running;
        Ok(())
    });
    let s = sim.clone();
    h.expect_freeze_filesystems().returning(move |_| {
        // A freeze that fails may still happen in the guest (a timed-out agent): simulate that.
        s.lock().unwrap().frozen = true;
        call(&s, "freeze")?;
        Ok(2)
    });
    let s = sim.clone();
    h.expect_has_guest_agent()
        .returning(move |_| Ok(!s.lock().unwrap().no_agent));
    let s = sim.clone();
    h.expect_thaw_filesystems().returning(move |_| {
        call(&s, "thaw")?;
        let mut sim = s.lock().unwrap();
        let thawed = if sim.frozen { 2 } else { 0 };
        sim.frozen = false;
        Ok(thawed)
    });
    let s = sim.clone();
    h.expect_guest_memory().returning(move |_| {
        call(&s, "guest_memory")?;
        Ok(memory::GuestMemory::anonymous(RAM)?)
    });
    let s = sim.clone();
    h.expect_save_device_state().returning(move |_, path| {
        call(&s, "save_device_state")?;
        std::fs::write(path, b"device state")?;
        Ok(())
    });
    let s = sim.clone();
    h.expect_disk_backend().returning(move |_| {
        call(&s, "disk_backend")?;
        Ok(Arc::new(disk_mock(&s)))
    });
    let s = sim.clone();
    h.expect_destroy().returning(move |_| {
        call(&s, "destroy")?;
        s.lock().unwrap().state = DomainState::ShutOff;
        Ok(())
    });
    let s = sim.clone();
    h.expect_define().returning(move |_, _, disks| {
        call(&s, "define")?;
        s.lock().unwrap().disks = disks.to_vec();
        Ok(())
    });
    let s = sim.clone();
    h.expect_start_incoming().returning(move |_, ram| {
        call(&s, "start_incoming")?;
        let mut sim = s.lock().unwrap();
        sim.state = DomainState::Paused;
        Ok(match ram {
            IncomingRam::Image(image) if !sim.cannot_map => {
                assert!(image.ends_with("memory.img"), "{}", image.display());
                sim.calls.push("mapped");
                IncomingStart::Mapped
            }
            IncomingRam::Image(_) => IncomingStart::Fresh {
                fallback: Some("simulated: the image is on another filesystem".into()),
            },
            IncomingRam::Fresh => IncomingStart::Fresh { fallback: None },
        })
    });
    let s = sim.clone();
    h.expect_load_device_state()
        .returning(move |_, _| call(&s, "load_device_state"));
    let s = sim.clone();
    h.expect_undefine().returning(move |_| call(&s, "undefine"));
    let s = sim.clone();
    h.expect_check_restorable()
        .returning(move |_, _, _| call(&s, "check_restorable"));
    h
}

/// The mocked hypervisor, with a background save that follows the capture handshake for real
/// (mockall's closures cannot wait for the orchestrator's `capture`).
pub struct Simulated {
    pub mock: MockHypervisor,
    pub sim: Shared,
}

#[async_trait::async_trait]
impl Hypervisor for Simulated {
    async fn state(&self, domain: &Name) -> DriverResult<DomainState> {
        self.mock.state(domain).await
    }
    async fn config(&self, domain: &Name) -> DriverResult<serde_json::Value> {
        self.mock.config(domain).await
    }
    async fn disks(&self, domain: &Name) -> DriverResult<Vec<DiskTarget>> {
        self.mock.disks(domain).await
    }
    async fn prepare_pause(&self, _domain: &Name) {
        // Best effort: an injected failure here changes nothing.
        let _ = call(&self.sim, "prepare_pause");
    }
    async fn pause(&self, domain: &Name) -> DriverResult<()> {
        let result = self.mock.pause(domain).await;
        let answer_after = self.sim.lock().unwrap().pause_takes;
        tokio::time::sleep(answer_after).await;
        result
    }
    async fn resume(&self, domain: &Name) -> DriverResult<()> {
        self.mock.resume(domain).await
    }
    async fn guest_memory(&self, domain: &Name) -> DriverResult<memory::GuestMemory> {
        self.mock.guest_memory(domain).await
    }
    async fn save_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        self.mock.save_device_state(domain, path).await
    }
    async fn freeze_filesystems(&self, domain: &Name) -> DriverResult<u64> {
        self.mock.freeze_filesystems(domain).await
    }
    async fn thaw_filesystems(&self, domain: &Name) -> DriverResult<u64> {
        self.mock.thaw_filesystems(domain).await
    }
    async fn has_guest_agent(&self, domain: &Name) -> DriverResult<bool> {
        self.mock.has_guest_agent(domain).await
    }
    async fn memory_access(&self, domain: &Name) -> DriverResult<MemoryAccess> {
        let (shared_ram, streams) = {
            let sim = self.sim.lock().unwrap();
            (sim.shared_ram, sim.streams)
        };
        let shared = match shared_ram {
            true => Some(self.mock.guest_memory(domain).await?),
            false => None,
        };
        Ok(MemoryAccess {
            ram_bytes: RAM,
            shared,
            streams,
            no_background: (!shared_ram).then(|| "its RAM is not shared".to_owned()),
        })
    }
    async fn streamed_save(
        &self,
        _domain: &Name,
        image: &Path,
        device_state: &Path,
        mode: StreamMode,
        signals: CaptureSignals,
    ) -> DriverResult<StreamedSave> {
        if mode.hypervisor_pauses() {
            call(&self.sim, "precopy")?;
            // Converged: the hypervisor stops the guest itself.
            self.sim.lock().unwrap().state = DomainState::Paused;
        }
        let _ = signals.prepared.send(());
        if signals.capture.await.is_err() {
            if mode.hypervisor_pauses() {
                // Cancelled before the switch-over: the hypervisor lets the guest run again.
                self.sim.lock().unwrap().state = DomainState::Running;
            }
            return Err("abandoned".into());
        }
        call(&self.sim, "stream_before_capture")?;
        if mode.hypervisor_pauses() {
            // Captured: the hypervisor resumes the guest it stopped.
            call(&self.sim, "hypervisor_resume")?;
            self.sim.lock().unwrap().state = DomainState::Running;
        }
        let _ = signals.captured.send(());
        call(&self.sim, "stream")?;
        // "Streams": a real image of the memory.
        let mem = memory::GuestMemory::anonymous(RAM)?;
        let sink =
            memory::ImageWriter::create(image, memory::ImageLayout::of(&mem), memory::Durability::Sync)?;
        let summary = memory::save_paused(&mem, Box::new(sink))?;
        std::fs::write(device_state, b"device state")?;
        Ok(StreamedSave {
            ram_bytes: RAM,
            stream_bytes: RAM,
            pages: summary.present_pages,
            zero_pages: summary.total_pages - summary.present_pages,
            stored_pages: summary.present_pages,
            device_state_bytes: 12,
            hypervisor_downtime_ms: Some(1.0),
            passes: 1,
        })
    }
    async fn disk_backend(&self, domain: &Name) -> DriverResult<Arc<dyn disk::DiskSnapshots>> {
        self.mock.disk_backend(domain).await
    }
    async fn destroy(&self, domain: &Name) -> DriverResult<()> {
        self.mock.destroy(domain).await
    }
    async fn define(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        disks: &[DiskTarget],
    ) -> DriverResult<()> {
        self.mock.define(domain, config, disks).await
    }
    async fn start_incoming<'a>(&self, domain: &Name, ram: IncomingRam<'a>) -> DriverResult<IncomingStart> {
        self.mock.start_incoming(domain, ram).await
    }
    async fn start_standby<'a>(
        &self,
        _domain: &Name,
        _config: &serde_json::Value,
        disks: &[DiskTarget],
        ram: IncomingRam<'a>,
    ) -> DriverResult<Standby> {
        call(&self.sim, "start_standby")?;
        let mut sim = self.sim.lock().unwrap();
        if !sim.standby_capable {
            return Ok(Standby::Unavailable {
                reason: "simulated: two processes cannot share its network card".into(),
            });
        }
        assert_ne!(
            sim.state,
            DomainState::ShutOff,
            "a standby beside a stopped domain"
        );
        // The standby opens its disks at start: the revert's overlays must exist.
        for disk in disks {
            assert!(
                disk.image.exists(),
                "{} missing at the standby's start",
                disk.image.display()
            );
        }
        let started = match ram {
            IncomingRam::Image(_) if !sim.cannot_map => IncomingStart::Mapped,
            IncomingRam::Image(_) => IncomingStart::Fresh {
                fallback: Some("simulated: the image is on another filesystem".into()),
            },
            IncomingRam::Fresh => IncomingStart::Fresh { fallback: None },
        };
        sim.standby = Some(started.clone());
        Ok(Standby::Started(started))
    }
    async fn load_standby_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        call(&self.sim, "load_standby_device_state")?;
        if self.sim.lock().unwrap().standby.is_none() {
            return Err(format!("{domain}: no standby").into());
        }
        if !path.is_file() {
            return Err(format!("{} is missing", path.display()).into());
        }
        Ok(())
    }
    async fn promote_standby(&self, domain: &Name) -> DriverResult<()> {
        call(&self.sim, "promote_standby")?;
        let mut sim = self.sim.lock().unwrap();
        if sim.state != DomainState::ShutOff || sim.standby.take().is_none() {
            return Err(format!("{domain}: no standby, or the old process still runs").into());
        }
        sim.state = DomainState::Paused;
        Ok(())
    }
    async fn standby_guest_memory(&self, _domain: &Name) -> DriverResult<memory::GuestMemory> {
        call(&self.sim, "standby_guest_memory")?;
        Ok(memory::GuestMemory::anonymous(RAM)?)
    }
    async fn discard_standby(&self, _domain: &Name) -> DriverResult<()> {
        call(&self.sim, "discard_standby")?;
        self.sim.lock().unwrap().standby = None;
        Ok(())
    }
    async fn undefine(&self, domain: &Name) -> DriverResult<()> {
        self.mock.undefine(domain).await
    }
    async fn load_device_state(&self, domain: &Name, path: &Path) -> DriverResult<()> {
        self.mock.load_device_state(domain, path).await
    }
    async fn check_restorable(
        &self,
        domain: &Name,
        config: &serde_json::Value,
        with_memory: bool,
    ) -> DriverResult<()> {
        self.mock.check_restorable(domain, config, with_memory).await
    }
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub sim: Shared,
    pub store: Arc<FsStore>,
    pub orchestrator: Orchestrator,
    pub domain: Name,
}

pub fn fixture(state: DomainState) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let disks = ["vda", "vdb"]
        .iter()
        .map(|id| {
            // Raw images: the overlays made on them are real qcow2 files.
            let image = dir.path().join(format!("{id}.qcow2"));
            std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
            DiskTarget {
                target: (*id).into(),
                image,
                format: snapshot_core::ImageFormat::Qcow2,
            }
        })
        .collect();
    let sim = Arc::new(Mutex::new(Sim {
        state,
        disks,
        internal: BTreeSet::new(),
        applied: Vec::new(),
        fail: None,
        shared_ram: true,
        streams: false,
        cannot_map: false,
        frozen: false,
        no_agent: false,
        standby_capable: false,
        standby: None,
        pause_takes: Duration::ZERO,
        calls: Vec::new(),
    }));
    let store = Arc::new(FsStore::new(dir.path().join("state")));
    let simulated = Simulated {
        mock: hypervisor(&sim),
        sim: sim.clone(),
    };
    let orchestrator = Orchestrator::new(Arc::new(simulated), store.clone(), Arc::new(Quiet));
    Fixture {
        dir,
        sim,
        store,
        orchestrator,
        domain: name("dom"),
    }
}

pub fn name(text: &str) -> Name {
    Name::new(text).unwrap()
}

pub fn mixed_disks() -> Vec<DiskRequest> {
    vec![DiskRequest {
        target: "vdb".into(),
        kind: DiskKind::External {
            path: None,
            format: None,
        },
    }]
}

/// Flips a byte of the file at `offset` (from the end if negative).
pub fn damage(path: &Path, offset: i64) {
    let mut bytes = std::fs::read(path).unwrap();
    let at = if offset < 0 {
        bytes.len() - usize::try_from(-offset).unwrap()
    } else {
        usize::try_from(offset).unwrap()
    };
    bytes[at] ^= 0x55;
    std::fs::write(path, bytes).unwrap();
}

impl Fixture {
    /// Replaces `snapshot`'s memory image with one whose page 1 holds data, its first byte
    /// damaged: the metadata is intact, the page's checksum is not.
    pub fn damage_a_page(&self, snapshot: &str) {
        let image = self.store.files(&self.domain, &name(snapshot)).memory_image;
        std::fs::remove_file(&image).unwrap();
        let mem = memory::GuestMemory::anonymous(RAM).unwrap();
        mem.write(4096, b"guest data").unwrap();
        let layout = memory::ImageLayout::of(&mem);
        let sink = memory::ImageWriter::create(&image, layout, memory::Durability::NoSync).unwrap();
        memory::save_paused(&mem, Box::new(sink)).unwrap();
        damage(&image, 2 * 4096);
    }

    pub fn fail_at(&self, call: &'static str) {
        let mut sim = self.sim.lock().unwrap();
        sim.fail = Some(call);
        sim.calls.clear();
    }

    /// A copy of the simulation's state (no lock held across awaits).
    pub fn sim(&self) -> Sim {
        self.sim.lock().unwrap().clone()
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.sim.lock().unwrap().calls.clone()
    }

    /// Files in the test folder other than the disk images and the store's fixed files.
    pub fn stray_files(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let mut stack = vec![self.dir.path().to_owned()];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else {
                    let name = path.file_name().unwrap().to_string_lossy().into_owned();
                    if !["vda.qcow2", "vdb.qcow2", "lock", "current"].contains(&name.as_str()) {
                        found.push(path);
                    }
                }
            }
        }
        found
    }

    pub async fn create(
        &self,
        snapshot: &str,
        live: bool,
    ) -> snapshot_core::Result<snapshot_core::CreateReport> {
        let options = CreateOptions {
            memory: if live {
                MemoryMode::Live(LiveOptions::default())
            } else {
                MemoryMode::Paused
            },
            disks: mixed_disks(),
            description: Some("test".into()),
            memory_path: None,
            quiesce: false,
        };
        self.orchestrator
            .create(&self.domain, &name(snapshot), options)
            .await
    }
}
