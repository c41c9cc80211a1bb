#!/bin/busybox sh
# PID 1 of the domsnap test guest (the initramfs built by `cargo xtask setup`; source: xtask/src/init.sh).
#
# Kernel command line keys (all optional):
#   domsnap.mode=idle|dirty|fingerprint   (default idle)
#   domsnap.rate_mib=N domsnap.wss_mib=N  (dirty mode)
#   domsnap.seed=N domsnap.fp_mib=N       (fingerprint mode)
# The workload's output and input are the console (console=ttyS0). PID 1 must never exit.

/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs -o mode=0755 tmpfs /run
/bin/busybox mount -t tmpfs -o mode=1777 tmpfs /tmp
/bin/busybox --install -s /bin
export PATH=/bin
exec </dev/console >/dev/console 2>&1
# Lines the host writes to the console must not be echoed into the output.
stty -echo 2>/dev/null

# Virtio drivers in dependency order, then the ACPI power button and input events (a clean stop);
# a module that is not in the initramfs is built in or absent.
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk button evdev; do
    if [ -e "/lib/modules/$m.ko" ]; then
        insmod "/lib/modules/$m.ko" || echo "DOMSNAP INIT insmod $m failed"
    fi
done

set -f
mode=idle rate= wss= seed= fpmib=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        domsnap.mode=*) mode=${arg#*=} ;;
        domsnap.rate_mib=*) rate=${arg#*=} ;;
        domsnap.wss_mib=*) wss=${arg#*=} ;;
        domsnap.seed=*) seed=${arg#*=} ;;
        domsnap.fp_mib=*) fpmib=${arg#*=} ;;
    esac
done
set +f

set -- "$mode"
case "$mode" in
    dirty)
        [ -n "$rate" ] && set -- "$@" --rate-mib "$rate"
        [ -n "$wss" ] && set -- "$@" --wss-mib "$wss"
        ;;
    fingerprint)
        [ -n "$seed" ] && set -- "$@" --seed "$seed"
        [ -n "$fpmib" ] && set -- "$@" --mib "$fpmib"
        set -- "$@" --dir /run
        ;;
esac

# Wait (up to 5 s) for /dev/vda, but only when a virtio block device (virtio id 2) exists.
for dev in /sys/bus/virtio/devices/*; do
    if [ "$(cat "$dev/device" 2>/dev/null)" = 0x0002 ]; then
        i=0
        while [ ! -b /dev/vda ] && [ "$i" -lt 50 ]; do
            usleep 100000
            i=$((i + 1))
        done
        break
    fi
done
[ -b /dev/vda ] && set -- "$@" --disk /dev/vda

echo "DOMSNAP INIT exec guest-workload $*"
/bin/guest-workload "$@"
echo "DOMSNAP WORKLOAD-EXIT status=$?"
while :; do
    sleep 3600
done
