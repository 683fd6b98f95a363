#!/usr/bin/env bash
# Boot the memcheck guest standalone under QEMU (TCG) for a while, then judge
# its serial log. Exit 0 only if at least one "memcheck gen=N bad=0" line
# appeared and no generation reported bad words.
#
#   guest/run-standalone.sh [-t SECONDS] [-m anon|shm|hugetlb] [-M pc|q35]
#                           [-k vmlinux|vmlinuz] [--mib N] [--ram SIZE]
#                           [--gens G] [--inject PAGES]
#                           [-o SERIAL_LOG] [-d OUTDIR] [--no-build]
#
#   -t   how long QEMU runs (default 30)
#   -m   guest RAM: anonymous (default), a shared file in /dev/shm, or a file
#        on hugetlbfs (2 MiB pages; the script reserves and gives back the
#        huge pages it needs, mounting /dev/hugepages if nothing is mounted)
#   -M   machine type (default pc)
#   -k   vmlinux = PVH boot of the uncompressed kernel (default, fastest),
#        vmlinuz = the Debian bzImage as shipped
#   --gens    memcheck.gens=G: the guest powers off after G generations
#   --inject  self-test (needs -m shm or hugetlb): 1 s after the first
#             generation, zero PAGES buffer pages in the RAM file from the
#             host (corrupt-ram.py); pass only if exactly PAGES*512 bad words
#             are reported
#   -d   where build.sh put (or puts) its outputs (default target/guest)
# Prints the QEMU command line, the time to the first generation line and the
# time per generation.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(dirname "$HERE")
SECS=30 MEM=anon MACHINE=pc KERNEL=vmlinux MIB=48 RAM=256M
OUT=$ROOT/target/guest LOG= BUILD=1 GENS=0 INJECT=0

usage() { sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
while [ $# -gt 0 ]; do
    case $1 in
        -t) SECS=$2; shift 2 ;;
        -m) MEM=$2; shift 2 ;;
        -M) MACHINE=$2; shift 2 ;;
        -k) KERNEL=$2; shift 2 ;;
        --mib) MIB=$2; shift 2 ;;
        --ram) RAM=$2; shift 2 ;;
        --gens) GENS=$2; shift 2 ;;
        --inject) INJECT=$2; shift 2 ;;
        -o) LOG=$2; shift 2 ;;
        -d) OUT=$2; shift 2 ;;
        --no-build) BUILD=0; shift ;;
        -h|--help) usage ;;
        *) echo "unknown argument: $1" >&2; usage ;;
    esac
done
case $MEM in anon|shm|hugetlb) ;; *) echo "-m must be anon, shm or hugetlb" >&2; exit 2 ;; esac
case $KERNEL in vmlinux|vmlinuz) ;; *) echo "-k must be vmlinux or vmlinuz" >&2; exit 2 ;; esac
if [ "$INJECT" -gt 0 ] && [ "$MEM" = anon ]; then echo "--inject needs -m shm or -m hugetlb" >&2; exit 2; fi

if [ "$BUILD" = 1 ]; then
    "$HERE/build.sh" "$OUT" >/dev/null
fi
OUT=$(cd "$OUT" && pwd)
LOG=${LOG:-$OUT/serial-$MEM-$MACHINE.log}
command -v qemu-system-x86_64 >/dev/null ||
    { echo "qemu-system-x86_64 missing: apt-get install -y --no-install-recommends qemu-system-x86" >&2; exit 1; }

ram_mib=$(numfmt --from=iec "${RAM}" | awk '{ print int($1 / 1048576) }')
memfile= added_hugepages=0 mounted_hugetlbfs= made_dir= qemu_pid=
cleanup() {
    if [ -n "$qemu_pid" ]; then kill "$qemu_pid" 2>/dev/null || true; wait "$qemu_pid" 2>/dev/null || true; fi
    [ -n "$memfile" ] && rm -f "$memfile"
    if [ "$added_hugepages" -gt 0 ]; then
        now=$(cat /proc/sys/vm/nr_hugepages)
        echo $((now > added_hugepages ? now - added_hugepages : 0)) > /proc/sys/vm/nr_hugepages
    fi
    if [ -n "$mounted_hugetlbfs" ]; then umount "$mounted_hugetlbfs" 2>/dev/null || true; fi
    if [ -n "$made_dir" ]; then rmdir "$made_dir" 2>/dev/null || true; fi
}
trap cleanup EXIT

memargs=(-machine "$MACHINE")
case $MEM in
    shm)
        memfile=/dev/shm/memcheck-guest-$$.ram
        memargs=(-object "memory-backend-file,id=mem0,size=$RAM,mem-path=$memfile,share=on"
                 -machine "$MACHINE,memory-backend=mem0") ;;
    hugetlb)
        hdir=$(awk '$3 == "hugetlbfs" { print $2; exit }' /proc/mounts)
        if [ -z "$hdir" ]; then
            hdir=/dev/hugepages
            [ -d "$hdir" ] || { mkdir -p "$hdir"; made_dir=$hdir; }
            mount -t hugetlbfs none "$hdir"
            mounted_hugetlbfs=$hdir
        fi
        need=$(( (ram_mib + 1) / 2 ))
        free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
        if [ "$free" -lt "$need" ]; then
            added_hugepages=$((need - free))
            echo $(( $(cat /proc/sys/vm/nr_hugepages) + added_hugepages )) > /proc/sys/vm/nr_hugepages
            free=$(awk '/^HugePages_Free:/ { print $2 }' /proc/meminfo)
            [ "$free" -ge "$need" ] || { echo "could only get $free of $need huge pages" >&2; exit 1; }
        fi
        memfile=$hdir/memcheck-guest-$$.ram
        memargs=(-object "memory-backend-file,id=mem0,size=$RAM,mem-path=$memfile,share=on"
                 -machine "$MACHINE,memory-backend=mem0") ;;
esac

cmd=(qemu-system-x86_64 -accel tcg "${memargs[@]}" -m "$RAM" -smp 1
     -nodefaults -no-user-config -display none -monitor none -no-reboot
     -serial "file:$LOG"
     -kernel "$OUT/$KERNEL" -initrd "$OUT/initramfs.cpio.gz"
     -append "console=ttyS0 quiet panic=-1 nokaslr memcheck.mib=$MIB memcheck.gens=$GENS")
echo "+ ${cmd[*]}" >&2

: > "$LOG"
start=$(date +%s%N)
"${cmd[@]}" </dev/null &
qemu_pid=$!
first_ms= injected=0 exited=0
deadline=$((start + SECS * 1000000000))
while [ "$(date +%s%N)" -lt "$deadline" ]; do
    if ! kill -0 "$qemu_pid" 2>/dev/null; then
        exited=1
        [ "$GENS" -gt 0 ] || echo "QEMU exited early" >&2
        break
    fi
    now=$(date +%s%N)
    if [ -z "$first_ms" ] && grep -q '^memcheck gen=' "$LOG"; then
        first_ms=$(( (now - start) / 1000000 ))
        first_gen=$(grep -m1 '^memcheck gen=' "$LOG" | sed 's/.*gen=\([0-9]*\).*/\1/')
    fi
    if [ "$INJECT" -gt 0 ] && [ "$injected" = 0 ] && [ -n "$first_ms" ] &&
       [ $(( (now - start) / 1000000 - first_ms )) -ge 1000 ]; then
        python3 "$HERE/corrupt-ram.py" "$memfile" "$INJECT" >&2
        injected=1
    fi
    sleep 0.1
done
end=$(date +%s%N)
kill "$qemu_pid" 2>/dev/null || true
wait "$qemu_pid" 2>/dev/null || true
qemu_pid=

tr -d '\r' < "$LOG" > "$LOG.tmp" && mv "$LOG.tmp" "$LOG"
gens=$(grep -c '^memcheck gen=[0-9]* bad=' "$LOG" || true)
badsum=$(grep '^memcheck gen=[0-9]* bad=' "$LOG" | sed 's/.* bad=//' | awk '{ s += $1 } END { print s + 0 }')
good=$(grep -c '^memcheck gen=[0-9]* bad=0$' "$LOG" || true)
badgens=$(grep '^memcheck gen=[0-9]* bad=' "$LOG" | grep -vc ' bad=0$' || true)
badwords=$(grep -c '^memcheck bad word' "$LOG" || true)

echo "serial log: $LOG"
if [ -n "$first_ms" ]; then
    last_gen=$(grep '^memcheck gen=' "$LOG" | tail -n1 | sed 's/.*gen=\([0-9]*\).*/\1/')
    run_ms=$(( (end - start) / 1000000 - first_ms ))
    per_gen=$(awk -v ms="$run_ms" -v n=$((last_gen - first_gen)) 'BEGIN { if (n > 0) printf "%.1f", ms / n; else print "?" }')
    echo "first gen line after ${first_ms} ms (polled every 100 ms); $gens generations in $(( (end - start) / 1000000 )) ms; ~${per_gen} ms per generation of $MIB MiB"
fi
if [ "$GENS" -gt 0 ] && ! grep -q "^memcheck done gens=$GENS " "$LOG"; then
    echo "FAIL: no 'memcheck done gens=$GENS' line (guest did not finish in $SECS s)" >&2
    exit 1
fi
if [ "$INJECT" -gt 0 ]; then
    if [ "$injected" = 1 ] && [ "$badsum" -eq $((INJECT * 512)) ]; then
        grep -m 3 '^memcheck bad word' "$LOG"
        echo "PASS: injected $INJECT zeroed pages, guest reported exactly $badsum bad words"
        exit 0
    fi
    echo "FAIL: injected=$injected, expected $((INJECT * 512)) bad words, guest reported $badsum" >&2
    exit 1
fi
if [ "$good" -eq 0 ] || [ "$badgens" -ne 0 ] || [ "$badwords" -ne 0 ]; then
    echo "FAIL: $good clean generations, $badgens generations with bad words, $badwords bad-word lines" >&2
    grep -m 20 -E 'bad word|bad=[1-9]|memcheck error|Kernel panic' "$LOG" >&2 || tail -n 20 "$LOG" >&2
    exit 1
fi
echo "PASS: $good generations, all bad=0"
