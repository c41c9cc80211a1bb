#!/bin/sh
# dscounter: the Debian test guest's counter. Counts once a second in this shell's memory (persisted
# nowhere: a memory revert brings it back), prints `DSCOUNTER <n>` on stdout (the unit sends it to
# ttyS0) and keeps the value in /run/dscounter/counter (tmpfs, i.e. RAM), which busybox httpd serves.
dir=/run/dscounter
mkdir -p "$dir"
ln -sf counter "$dir/index.html"
n=0
while :; do
    n=$((n + 1))
    printf '%s\n' "$n" >"$dir/.counter.new" && mv -f "$dir/.counter.new" "$dir/counter"
    printf 'DSCOUNTER %s\n' "$n"
    sleep 1
done
