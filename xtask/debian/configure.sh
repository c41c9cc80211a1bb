#!/bin/sh
# Runs inside the debootstrapped tree (chroot, as root) after domsnap's files were copied in: enables
# our services, quietens what would write to the disk or wait for a network, keeps only the kernel
# modules a QEMU q35/virtio machine needs, and removes caches and documentation.
# Arguments: the kernel modules to keep (their dependencies are kept too).
set -eu

kver=$(ls /lib/modules)
[ "$(echo "$kver" | wc -w)" = 1 ] || { echo "configure: expected one kernel in /lib/modules, found: $kver" >&2; exit 1; }

echo domsnap-debian >/etc/hostname
printf '127.0.0.1 localhost\n127.0.1.1 domsnap-debian\n::1 localhost ip6-localhost ip6-loopback\n' >/etc/hosts
# QEMU user networking's DNS (the host's resolver must not leak into the image).
echo 'nameserver 10.0.2.3' >/etc/resolv.conf

systemctl enable systemd-networkd.service dscounter.service dscounter-http.service
# No logins on the consoles (the serial console carries the guest's output; the guest agent runs
# commands), no periodic jobs (apt, scrubbing, trimming: they would change the disk on their own),
# no waiting for the network.
systemctl mask serial-getty@ttyS0.service getty@tty1.service getty-static.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer systemd-networkd-wait-online.service
systemctl set-default multi-user.target

# Kernel modules: the requested ones and their dependencies.
keep=$(mktemp)
for m in "$@"; do
    modprobe -S "$kver" --show-depends "$m" >>"$keep" || { echo "configure: no module $m" >&2; exit 1; }
done
awk '$1 == "insmod" { print $2 }' "$keep" | sort -u >"$keep.files"
find "/lib/modules/$kver/kernel" -type f -name '*.ko*' | sort | comm -23 - "$keep.files" | xargs -r rm -f
find "/lib/modules/$kver/kernel" -depth -type d -empty -delete
depmod "$kver"
# The initramfs (built during the install with initramfs.conf's MODULES=list) must find the root disk.
for m in virtio_pci virtio_blk ext4; do
    lsinitramfs "/boot/initrd.img-$kver" | grep -q "/$m\.ko" || { echo "configure: $m is not in the initramfs" >&2; exit 1; }
done
echo "configure: kept $(wc -l <"$keep.files") kernel modules"
rm -f "$keep" "$keep.files"

# Caches, logs of the build, documentation.
apt-get clean
rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/cache/debconf/*-old /var/lib/dpkg/*-old
find /usr/share/doc -type f ! -name copyright -delete
find /usr/share/doc -depth -mindepth 1 -type d -empty -delete
rm -rf /usr/share/man/* /usr/share/info/* /usr/share/lintian /usr/share/linda
find /usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
find /var/log -type f -delete
rm -rf /tmp/* /var/tmp/* /root/.bash_history
rm -f /etc/dpkg/dpkg.cfg.d/domsnap-unsafe-io
