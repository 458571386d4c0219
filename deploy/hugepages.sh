#!/usr/bin/env bash
# hugepages.sh: reserve hugepages and mount hugetlbfs for hotplane. Idempotent.
#
#   hugepages.sh --pages N [--size 2M|1G] [--mount DIR] [--exact] [--dry-run]
#   hugepages.sh --status [--size 2M|1G]
#
# --pages N   make sure at least N pages of the given size are reserved (with --exact,
#             exactly N: also shrinks). Then mount hugetlbfs at DIR (default
#             /dev/hugepages) if no hugetlbfs of that page size is mounted there.
# --status    print the reservation and the hugetlbfs mounts; any user may run it.
# --dry-run   say what would be done, change nothing.
# Exit status: 0 done (or nothing to do), 1 failed (message says why), 2 usage error.
set -euo pipefail

PROG=${0##*/}
PAGES=""
SIZE="2M"
MOUNT_DIR="/dev/hugepages"
EXACT=0
DRY=0
STATUS=0

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

die() { echo "$PROG: error: $*" >&2; exit 1; }
bad_usage() { echo "$PROG: $*" >&2; echo "run '$PROG --help' for usage" >&2; exit 2; }
say() { echo "$PROG: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --pages) [ $# -ge 2 ] || bad_usage "--pages needs a number"; PAGES=$2; shift 2 ;;
        --pages=*) PAGES=${1#*=}; shift ;;
        --size) [ $# -ge 2 ] || bad_usage "--size needs 2M or 1G"; SIZE=$2; shift 2 ;;
        --size=*) SIZE=${1#*=}; shift ;;
        --mount) [ $# -ge 2 ] || bad_usage "--mount needs a directory"; MOUNT_DIR=$2; shift 2 ;;
        --mount=*) MOUNT_DIR=${1#*=}; shift ;;
        --exact) EXACT=1; shift ;;
        --dry-run|-n) DRY=1; shift ;;
        --status) STATUS=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) bad_usage "unknown argument '$1'" ;;
    esac
done

case "$SIZE" in
    2M|2m|2048k|2048kB) KB=2048; SIZE=2M ;;
    1G|1g|1048576k|1048576kB) KB=1048576; SIZE=1G ;;
    *) bad_usage "unsupported --size '$SIZE' (use 2M or 1G)" ;;
esac

SYSDIR=/sys/kernel/mm/hugepages/hugepages-${KB}kB
[ -d /sys/kernel/mm/hugepages ] || die "this kernel has no hugepage support (/sys/kernel/mm/hugepages missing; CONFIG_HUGETLBFS)"
[ -d "$SYSDIR" ] || die "the kernel does not offer ${SIZE} hugepages (no $SYSDIR); available: $(ls /sys/kernel/mm/hugepages | tr '\n' ' ')"

read_val() { cat "$SYSDIR/$1" 2>/dev/null || echo "?"; }

# hugetlbfs mounts: "DIR pagesize" lines (pagesize in kB; the default size when no option).
default_kb() { awk '/^Hugepagesize:/ {print $2}' /proc/meminfo; }
hugetlbfs_mounts() {
    local def; def=$(default_kb)
    awk -v def="$def" '$3 == "hugetlbfs" {
        ps = def
        n = split($4, opts, ",")
        for (i = 1; i <= n; i++) if (opts[i] ~ /^pagesize=/) {
            v = substr(opts[i], 10)
            if (v ~ /[Mm]$/) ps = substr(v, 1, length(v) - 1) * 1024
            else if (v ~ /[Gg]$/) ps = substr(v, 1, length(v) - 1) * 1048576
            else if (v ~ /[Kk]$/) ps = substr(v, 1, length(v) - 1) + 0
            else ps = v / 1024
        }
        gsub(/\\040/, " ", $2)
        print $2, ps
    }' /proc/mounts
}

status() {
    echo "hugepages ${SIZE}: total $(read_val nr_hugepages), free $(read_val free_hugepages), reserved $(read_val resv_hugepages), surplus $(read_val surplus_hugepages)"
    local found=0 dir ps
    while read -r dir ps; do
        [ -n "$dir" ] || continue
        found=1
        echo "hugetlbfs mounted at $dir (page size ${ps} kB)"
    done < <(hugetlbfs_mounts)
    [ "$found" = 1 ] || echo "hugetlbfs: not mounted"
}

if [ "$STATUS" = 1 ]; then
    status
    exit 0
fi

[ -n "$PAGES" ] || bad_usage "nothing to do: give --pages N or --status"
case "$PAGES" in
    ''|*[!0-9]*) bad_usage "--pages wants a non-negative integer, not '$PAGES'" ;;
esac
PAGES=$((10#$PAGES))

CUR=$(read_val nr_hugepages)
[ "$CUR" != "?" ] || die "cannot read $SYSDIR/nr_hugepages"

if [ "$DRY" = 0 ] && [ "$(id -u)" != 0 ]; then
    die "changing hugepages needs root (run with sudo); '$PROG --status' works as any user"
fi

# 1. The reservation.
if [ "$CUR" -ge "$PAGES" ] && { [ "$EXACT" = 0 ] || [ "$CUR" = "$PAGES" ]; }; then
    say "${SIZE} hugepages: already $CUR reserved (wanted ${PAGES}), unchanged"
elif [ "$DRY" = 1 ]; then
    say "would set ${SIZE} hugepages from $CUR to $PAGES"
else
    # Compacting first helps the kernel find contiguous memory.
    if [ "$PAGES" -gt "$CUR" ] && [ -w /proc/sys/vm/compact_memory ]; then
        echo 1 > /proc/sys/vm/compact_memory 2>/dev/null || true
    fi
    echo "$PAGES" > "$SYSDIR/nr_hugepages" 2>/dev/null || die "cannot write $SYSDIR/nr_hugepages (read-only /sys in a container?)"
    GOT=$(read_val nr_hugepages)
    if [ "$GOT" -lt "$PAGES" ]; then
        die "asked for $PAGES ${SIZE} hugepages, the kernel gave $GOT (memory too fragmented or too small: reserve them at boot with 'hugepagesz=${SIZE} hugepages=$PAGES' on the kernel command line)"
    fi
    say "${SIZE} hugepages: $CUR -> $GOT reserved"
fi

# 2. The mount.
MOUNTED=""
while read -r dir ps; do
    if [ "$dir" = "$MOUNT_DIR" ]; then MOUNTED=$ps; fi
done < <(hugetlbfs_mounts)
if [ -n "$MOUNTED" ]; then
    if [ "$MOUNTED" != "$KB" ]; then
        die "$MOUNT_DIR is a hugetlbfs of ${MOUNTED} kB pages, not ${SIZE}; use --mount with another directory"
    fi
    say "hugetlbfs already mounted at $MOUNT_DIR"
elif [ "$DRY" = 1 ]; then
    say "would mount hugetlbfs (pagesize=${SIZE}) at $MOUNT_DIR"
else
    if mountpoint -q "$MOUNT_DIR" 2>/dev/null; then
        die "$MOUNT_DIR is already a mount point of another file system; use --mount with another directory"
    fi
    mkdir -p "$MOUNT_DIR" || die "cannot create $MOUNT_DIR"
    mount -t hugetlbfs -o "pagesize=${SIZE}" nodev "$MOUNT_DIR" || die "mounting hugetlbfs at $MOUNT_DIR failed"
    say "mounted hugetlbfs (pagesize=${SIZE}) at $MOUNT_DIR"
fi
exit 0
