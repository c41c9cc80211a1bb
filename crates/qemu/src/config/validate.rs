//! The checks of [`DomainConfig::validate`]: each returns the reason a value is refused.

use std::collections::HashSet;

use super::{
    devices::{check_hostfwd, check_mac, valid_ifname, valid_type_name},
    DiskConfig, DomainConfig, Firmware, NicConfig, NicType, MAX_VCPUS, MEMORY_MIB_RANGE, NVRAM_DISK_ID,
};

type Check = Result<(), String>;

/// Every check of a configuration, first failure first.
pub(super) fn check(config: &DomainConfig) -> Check {
    check_sizes(config)?;
    check_boot(config)?;
    check_machine(config)?;
    if let Some(user) = &config.run_as {
        if !valid_user_name(user) {
            return Err(format!(
                "run_as = {user:?}: a user name is 1 to 32 letters, digits, '_', '-' or '.', \
                 not starting with '-'"
            ));
        }
    }
    check_disks(&config.disks)?;
    check_nics(&config.nics)
}

fn check_sizes(config: &DomainConfig) -> Check {
    if !MEMORY_MIB_RANGE.contains(&config.memory_mib) {
        return Err(format!(
            "memory_mib = {} is outside {}..={}",
            config.memory_mib,
            MEMORY_MIB_RANGE.start(),
            MEMORY_MIB_RANGE.end()
        ));
    }
    if !(1..=MAX_VCPUS).contains(&config.vcpus) {
        return Err(format!("vcpus = {} is outside 1..={MAX_VCPUS}", config.vcpus));
    }
    Ok(())
}

fn check_boot(config: &DomainConfig) -> Check {
    if config.kernel.is_none() && config.disks.is_empty() {
        return Err("nothing to boot: give a kernel or at least one disk".into());
    }
    if config.kernel.is_none() && (config.initrd.is_some() || config.cmdline.is_some()) {
        return Err("initrd and cmdline need a kernel".into());
    }
    if config.nvram.is_some() && config.firmware == Firmware::Bios {
        return Err("nvram is the NVRAM image of firmware = \"uefi\"; BIOS has none".into());
    }
    let mut orders = HashSet::new();
    for disk in &config.disks {
        if let Some(order) = disk.boot {
            if !orders.insert(order) {
                return Err(format!("boot = {order} is given to two disks"));
            }
        }
    }
    Ok(())
}

/// The machine: QEMU's `q35` or `pc` families (the driver's RAM layout and memory backend
/// assume a PC), as an alias or a versioned type.
fn check_machine(config: &DomainConfig) -> Check {
    if let Some(machine) = &config.machine {
        let pc = ["q35", "pc"].contains(&machine.as_str())
            || machine.starts_with("pc-q35-")
            || machine.starts_with("pc-i440fx-");
        if !pc || !valid_type_name(machine) {
            return Err(format!(
                "machine = {machine:?}: use q35 (the default), pc, or a versioned type of theirs \
                 such as pc-q35-10.0 or pc-i440fx-10.0"
            ));
        }
    }
    if let Some(cpu) = &config.cpu {
        if !valid_type_name(cpu) {
            return Err(format!(
                "cpu = {cpu:?}: name one QEMU CPU model (letters, digits, '-', '_', '.'), e.g. max or host"
            ));
        }
    }
    Ok(())
}

fn check_disks(disks: &[DiskConfig]) -> Check {
    let mut seen = HashSet::new();
    for disk in disks {
        if !valid_disk_id(&disk.id) {
            return Err(format!(
                "disk id {:?}: use a letter then up to 15 letters, digits, '_' or '-'",
                disk.id
            ));
        }
        if disk.id == NVRAM_DISK_ID {
            return Err(format!(
                "disk id {NVRAM_DISK_ID:?} is reserved for a UEFI domain's NVRAM; choose another"
            ));
        }
        if !seen.insert(disk.id.as_str()) {
            return Err(format!("disk id {:?} is used twice", disk.id));
        }
    }
    Ok(())
}

fn check_nics(nics: &[NicConfig]) -> Check {
    let mut macs = HashSet::new();
    for (index, nic) in nics.iter().enumerate() {
        let which = format!("nics[{index}] (type {:?})", nic.kind);
        check_nic(nic).map_err(|reason| format!("{which}: {reason}"))?;
        if let Some(mac) = &nic.mac {
            if !macs.insert(mac.to_ascii_lowercase()) {
                return Err(format!("{which}: mac {mac} is used by another NIC"));
            }
        }
    }
    Ok(())
}

fn check_nic(nic: &NicConfig) -> Check {
    if let Some(mac) = &nic.mac {
        check_mac(mac)?;
    }
    if let Some(model) = &nic.model {
        if !valid_type_name(model) {
            return Err(format!("model = {model:?} is not a QEMU device name"));
        }
    }
    let (needs, name) = match nic.kind {
        NicType::User => (None, None),
        NicType::Tap => (Some("ifname"), nic.ifname.as_deref()),
        NicType::Bridge => (Some("br"), nic.br.as_deref()),
    };
    if nic.kind != NicType::User && !nic.hostfwd.is_empty() {
        return Err("hostfwd is for type = \"user\" only".into());
    }
    if nic.kind != NicType::Tap && nic.ifname.is_some() {
        return Err("ifname is for type = \"tap\" only".into());
    }
    if nic.kind != NicType::Bridge && nic.br.is_some() {
        return Err("br is for type = \"bridge\" only".into());
    }
    if let Some(key) = needs {
        match name {
            None => return Err(format!("{key} is required: the host interface to use")),
            Some(name) if !valid_ifname(name) => {
                return Err(format!(
                    "{key} = {name:?}: an interface name is 1 to 15 letters, digits, '_', '-' or '.'"
                ))
            }
            Some(_) => {}
        }
    }
    nic.hostfwd.iter().try_for_each(|rule| check_hostfwd(rule))
}

/// A portable user name (POSIX portable file name characters, as `useradd` accepts them); it
/// goes into QEMU's `-run-with user=`, so no comma.
fn valid_user_name(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= 32
        && !user.starts_with('-')
        && user
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Disk ids become QEMU ids and node names (`disk-ID`, at most 31 characters, starting with a letter).
fn valid_disk_id(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && id.len() <= 16
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}
