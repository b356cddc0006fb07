#!/usr/bin/env bash
# Run a command inside a virtme-ng VM booted with Debian's kernel, for the IPVS tests.
#
#   tests/vm/run_in_vm.sh                      # python -m pytest tests/vm -m vm -q
#   tests/vm/run_in_vm.sh [--] CMD [ARG...]    # any command, run in the checkout, as root
#   tests/vm/run_in_vm.sh --check              # check the host, print the kernel; no boot
#
# The guest is a copy-on-write view of this machine: vng shares / over 9p, read-only, with tmpfs
# overlays on /etc /usr /var /tmp..., and /run fresh. The checkout is shared read-write, so
# pytest caches and test output land on the host. The guest starts with a clean environment; it
# gets KPROXY_IN_VM=1 (tests/vm/conftest.py keys on it), KPROXY_VM_KERNEL_VERSION, PATH with the
# venv first, HOME=/tmp/kproxy-vm-home (/root is read-only there), and CI, PYTEST_ADDOPTS, every
# KPROXY_* variable and the names listed in KPROXY_VM_ENV from the host.
# Exit status: the command's; 2 host not ready (the message names the package); 3 ip_vs does not
# load in the guest; 124 timed out; 255 the guest died without a status (panic: rerun verbose).
#
# Settings (environment):
#   KPROXY_VM_KERNEL   kernel image path or version (default: the newest kernel in /boot that a
#                      linux-image-* package installed and whose modules include ip_vs)
#   KPROXY_VM_MEMORY   guest memory (default 2G)      KPROXY_VM_CPUS  guest CPUs (default 2)
#   KPROXY_VM_TIMEOUT  seconds for boot + command (default 1800)
#   KPROXY_VM_VENV     virtualenv holding vng, pytest and kproxy (default <checkout>/.venv)
#   KPROXY_VM_VERBOSE  1: kernel console on stderr (vng --verbose), for boot problems
#   KPROXY_VM_ENV      more variable names to pass to the guest, space separated
#   KPROXY_VM_FAST_FS  0: no page-cached read-only mounts of /usr, python and the venv
#
# Host needs (Debian 12): qemu-system-x86 linux-image-amd64 busybox-static file, and virtme-ng
# in the venv (tested with 1.42). No KVM: the guest always runs under TCG (--disable-kvm), the
# same on every CI machine. Relative paths in CMD are relative to the checkout, not the caller.
#
# Why bash and not Python: it must run before kproxy is importable, and kproxy's layer contract
# keeps subprocess out of the package (only kproxy/backends runs commands), so kproxy/testing/
# is the wrong home for a process supervisor. Everything is in functions and main runs last, so
# editing this file cannot derail a run in progress (bash reads scripts as it goes).

# SC2016: the guest script is printed with its own $expansions on purpose. SC2317: trap handlers.
# shellcheck disable=SC2016,SC2317
set -euo pipefail

readonly PROG=kproxy-vm
readonly FAST_TAG=kproxy-fastroot

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# --- host prerequisites, each failure naming what to install ---------------------------------
check_host() {
    VNG=$VENV/bin/vng
    [[ -x $VNG ]] || VNG=$(command -v vng || true)
    [[ -n $VNG && -x $VNG ]] ||
        die "vng not found in $VENV/bin or PATH: pip install 'virtme-ng>=1.42' (pip install -e '.[test]')"
    # vng starts its backend as the shell command "virtme-run ...", found through PATH only.
    PATH="$(dirname "$VNG"):$PATH"
    export PATH
    command -v virtme-run >/dev/null || die "virtme-run not found next to $VNG (broken virtme-ng install)"
    command -v "qemu-system-$(uname -m)" >/dev/null ||
        die "qemu-system-$(uname -m) not found: apt-get install qemu-system-x86"
    # Debian's kernel has 9p and virtio as modules, so vng boots through an initramfs built
    # around a busybox that must be static; it tells static from dynamic with file(1).
    command -v file >/dev/null || die "file(1) not found (vng needs it): apt-get install file"
    local busybox
    busybox=$(command -v busybox-static || command -v busybox.static || command -v busybox || true)
    if [[ -z $busybox ]] || ! file -L "$busybox" | grep -Eq 'statically linked|static-pie linked'; then
        die "no statically linked busybox (vng builds its initramfs with one):" \
            "apt-get install busybox-static (it replaces the dynamic busybox package)"
    fi
    command -v timeout >/dev/null || die "timeout(1) not found: apt-get install coreutils"
    command -v mkfifo >/dev/null || die "mkfifo(1) not found: apt-get install coreutils"
}

# --- kernel: the newest Debian kernel with IPVS and what vng and the tests need ----------------
# 9p, 9pnet_virtio and overlay carry vng's root file system; the rest is what the smoke tests use.
# (Debian's cloud flavour, for one, may lack some; it then loses to the generic one.)
readonly NEEDED_MODULES=(ip_vs 9p 9pnet_virtio overlay dummy veth sctp)

kernel_is_usable() {  # VERSION
    local dir=/lib/modules/$1 mod
    [[ -r $dir/modules.dep ]] || return 1
    for mod in "${NEEDED_MODULES[@]}"; do
        grep -q "/$mod\.ko" "$dir/modules.dep" "$dir/modules.builtin" 2>/dev/null || return 1
    done
}

is_debian_kernel() {  # IMAGE: installed by a linux-image-* package
    local owner
    owner=$(dpkg-query -S "$1" 2>/dev/null) || return 1
    [[ $owner == linux-image-* ]]
}

newest_debian_kernel() {
    local img ver
    for img in /boot/vmlinuz-*; do
        [[ -f $img && -r $img ]] || continue
        ver=${img#/boot/vmlinuz-}
        # Skips the host's own kernel unless Debian's (a cloud or CI build, often without IPVS).
        is_debian_kernel "$img" || continue
        kernel_is_usable "$ver" || continue
        printf '%s\n' "$ver"
    done | sort -V | tail -n 1
}

select_kernel() {
    local arch
    if [[ -n ${KPROXY_VM_KERNEL:-} ]]; then
        KIMG=$KPROXY_VM_KERNEL
        [[ -f $KIMG ]] || KIMG=/boot/vmlinuz-$KPROXY_VM_KERNEL
        [[ -r $KIMG ]] || die "KPROXY_VM_KERNEL=$KPROXY_VM_KERNEL: no readable kernel image $KIMG"
        KVER=$(basename "$KIMG")
        KVER=${KVER#vmlinuz-}
    else
        arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
        KVER=$(newest_debian_kernel)
        [[ -n $KVER ]] || die "no usable Debian kernel in /boot (wanted /boot/vmlinuz-VERSION from a" \
            "linux-image-* package, with ${NEEDED_MODULES[*]} in /lib/modules/VERSION/modules.dep):" \
            "apt-get install linux-image-$arch"
        KIMG=/boot/vmlinuz-$KVER
    fi
    # vng gives the guest the host's /lib/modules, so modprobe inside needs this version's tree.
    [[ -r /lib/modules/$KVER/modules.dep ]] ||
        die "no /lib/modules/$KVER/modules.dep, so no modules in the guest: reinstall the" \
            "linux-image package of $KVER (or run depmod $KVER)"
}

# --- guest script: environment, cached mounts, checks, then the command ------------------------
write_guest_script() {  # CMD [ARG...]
    # Trees the guest reads most go on a page-cached mount: system tools and libraries, the
    # Python installation the venv was made from (pyenv or setup-python put it outside /usr),
    # and the venv. Never the checkout: the guest writes there.
    local -a fast_dirs=(/usr)
    local dir name py_prefix
    py_prefix=$("$VENV/bin/python" -c 'import sys; print(sys.base_prefix)' 2>/dev/null || true)
    for dir in "$py_prefix" "$VENV"; do
        [[ -d $dir && $dir != /usr && $dir != /usr/* && $dir != "$ROOT" ]] && fast_dirs+=("$dir")
    done
    {
        printf '# generated by tests/vm/run_in_vm.sh\n'
        printf 'export KPROXY_IN_VM=1 KPROXY_VM_KERNEL_VERSION=%q\n' "$KVER"
        printf 'export HOME=/tmp/kproxy-vm-home\n'
        printf 'export VIRTUAL_ENV=%q PATH=%q:"$PATH"\n' "$VENV" "$VENV/bin"
        for name in CI PYTEST_ADDOPTS ${KPROXY_VM_ENV:-} $(compgen -e KPROXY_ || true); do
            [[ $name == KPROXY_IN_VM || $name == KPROXY_VM_KERNEL_VERSION || -z ${!name+x} ]] && continue
            printf 'export %s=%q\n' "$name" "${!name}"
        done
        printf 'mkdir -p "$HOME"\n'
        if [[ $FAST_FS == 1 ]]; then
            # vng's root is 9p without caching: every stat and open is a round trip to qemu, and
            # under TCG `import pyroute2, pytest` took 45-160 s instead of 10. A second,
            # read-only export of / mounted cache=loose serves these trees from the guest's page
            # cache; the host must not change them during the run.
            printf 'fast=/run/%s; mkdir -p "$fast"\n' "$FAST_TAG"
            printf 'if mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=524288,cache=loose,access=any %s "$fast"; then\n' \
                "$FAST_TAG"
            for dir in "${fast_dirs[@]}"; do
                printf '  mount --bind "$fast"%q %q\n' "$dir" "$dir"
            done
            printf 'else echo "%s: warning: no cached mount of /, running slowly" >&2; fi\n' "$PROG"
        fi
        printf 'cd %q || exit 2\n' "$ROOT"
        printf 'read -r up _ </proc/uptime\n'
        printf 'echo "%s: guest up after ${up}s, kernel $(uname -r)" >&2\n' "$PROG"
        # Fail once, clearly, rather than in every test.
        printf 'if ! err=$(modprobe ip_vs 2>&1); then\n'
        printf '  echo "%s: cannot load ip_vs in the guest: $err" >&2; exit 3\nfi\n' "$PROG"
        printf 'exec'
        printf ' %q' "$@"
        printf '\n'
    } >"$WORK/guest.sh"
}

# --- the VM --------------------------------------------------------------------------------------
cleanup() {
    local rc=$?
    if [[ -n ${VM_PGID:-} ]] && kill -0 -- "-$VM_PGID" 2>/dev/null; then
        kill -TERM -- "-$VM_PGID" 2>/dev/null || true
        wait "$VM_PGID" 2>/dev/null || true
    fi
    [[ -n ${WORK:-} ]] && rm -rf -- "$WORK"
    return "$rc"
}

run_vm() {
    local -a vng_args=(
        --run "$KIMG"
        --disable-kvm        # no KVM on CI; TCG is slower but the same everywhere
        --force-9p           # never start a host virtiofsd daemon, whether installed or not
        --user root
        --memory "$MEMORY"
        --cpus "$CPUS"
        --rwdir "$ROOT"      # the only host directory the guest may write
        --cwd "$ROOT"
        --exec "bash $WORK/guest.sh"  # keep it short: vng puts it on the kernel command line
    )
    # "=": argparse would take a separate value starting with "-" for an option. vng splits the
    # value on spaces into a shell command line: no quotes or spaces inside an argument.
    [[ $FAST_FS == 1 ]] && vng_args+=(
        "--qemu-opts=-virtfs local,path=/,mount_tag=$FAST_TAG,security_model=none,readonly=on,multidevs=remap")
    [[ ${KPROXY_VM_VERBOSE:-0} == 1 ]] && vng_args+=(--verbose)

    # qemu reopens /proc/self/fd/1 and /proc/self/fd/2 with O_TRUNC and separate offsets: sent
    # to a file (`make test-vm >log 2>&1`), the log would be truncated and stdout and stderr
    # would overwrite each other. FIFOs in between make them pipes, whatever the caller has.
    mkfifo "$WORK/out" "$WORK/err"

    note "kernel $KIMG, $CPUS CPUs, $MEMORY memory, timeout ${TIMEOUT}s, no KVM; booting"
    local start=$SECONDS rc=0 cat_out cat_err
    # Job control: the VM (timeout, vng, virtme-run, qemu) gets its own process group, so one
    # kill reaches all of it and a terminal's ^C reaches only this script, which then stops it.
    # stdin is /dev/null: qemu never reads or reconfigures a terminal.
    set -m
    cat <"$WORK/out" &
    cat_out=$!
    cat <"$WORK/err" >&2 &
    cat_err=$!
    timeout --kill-after=30 "$TIMEOUT" "$VNG" "${vng_args[@]}" </dev/null >"$WORK/out" 2>"$WORK/err" &
    VM_PGID=$!
    set +m
    wait "$VM_PGID" || rc=$?
    VM_PGID=
    wait "$cat_out" "$cat_err" || true

    case $rc in
        124 | 137) note "timed out after ${TIMEOUT}s (KPROXY_VM_TIMEOUT)" ;;
        255) note "the guest ended without an exit status (kernel panic, or its init failed);" \
            "rerun with KPROXY_VM_VERBOSE=1 to see the console" ;;
    esac
    note "finished in $((SECONDS - start))s with exit status $rc"
    return "$rc"
}

main() {
    ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
    VENV=${KPROXY_VM_VENV:-$ROOT/.venv}
    MEMORY=${KPROXY_VM_MEMORY:-2G}
    CPUS=${KPROXY_VM_CPUS:-2}
    TIMEOUT=${KPROXY_VM_TIMEOUT:-1800}
    FAST_FS=${KPROXY_VM_FAST_FS:-1}
    VM_PGID=
    WORK=

    check_host
    select_kernel
    if [[ ${1:-} == --check ]]; then
        printf '%s\n' "$KIMG"
        return 0
    fi
    [[ ${1:-} == -- ]] && shift
    (($# > 0)) || set -- "$VENV/bin/python" -m pytest tests/vm -m vm -q

    trap cleanup EXIT
    trap 'note interrupted; exit 130' INT
    trap 'note terminated; exit 143' TERM HUP
    WORK=$(mktemp -d /tmp/kproxy-vm.XXXXXX)  # /tmp: the guest sees the host's /tmp (overlay lower)
    write_guest_script "$@"
    run_vm
}

main "$@"
exit
