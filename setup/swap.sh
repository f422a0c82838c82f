#!/usr/bin/env bash
# Temporary swap file: add, remove, status. Safe to read before running; --dry-run prints every step.
#
#   sudo setup/swap.sh add 8G              # create /swapfile-qwen-runner (8 GiB) and enable it
#   sudo setup/swap.sh remove              # disable and delete it
#   setup/swap.sh status                   # what swap is active
#   setup/swap.sh --dry-run add 8G         # print the exact commands, change nothing
#   options: --path FILE (default /swapfile-qwen-runner), --dry-run
#
# Refuses: non-root (except --dry-run and status), a size it cannot parse, an existing file at the
# path (it never overwrites), too little free disk (keeps 1 GiB spare), removing a file that is not an
# active swap file. `qwen-runner plan MODEL` prints the size to add when a stage needs it.
set -euo pipefail

readonly DEFAULT_PATH="/swapfile-qwen-runner"
readonly DISK_SPARE_BYTES=$((1024 * 1024 * 1024))   # leave this much disk free after the swap file
readonly PROG="${0##*/}"

usage() {
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
    printf '%s: error: %s\n' "$PROG" "$1" >&2
    exit "${2:-1}"
}

# "8G" / "512M" / "1T" / bytes -> bytes (binary units)
to_bytes() {
    local size="$1" number unit
    if [[ ! "$size" =~ ^([0-9]+)([KkMmGgTt]?)(i?[Bb])?$ ]]; then
        return 1
    fi
    number="${BASH_REMATCH[1]}"
    unit="${BASH_REMATCH[2]^^}"
    case "$unit" in
        "") printf '%s\n' "$number" ;;
        K) printf '%s\n' "$((number * 1024))" ;;
        M) printf '%s\n' "$((number * 1024 * 1024))" ;;
        G) printf '%s\n' "$((number * 1024 * 1024 * 1024))" ;;
        T) printf '%s\n' "$((number * 1024 * 1024 * 1024 * 1024))" ;;
    esac
}

run() {
    # Print the command exactly as it would run; run it unless --dry-run.
    printf '+'
    printf ' %q' "$@"
    printf '\n'
    if [[ "$DRY_RUN" == "0" ]]; then
        "$@"
    fi
}

need_root() {
    if [[ "$DRY_RUN" == "0" && "${EUID}" -ne 0 ]]; then
        die "must run as root to $1 swap (try: sudo $0 $*), or add --dry-run to see the steps"
    fi
}

is_active_swap() {
    # /proc/swaps lists active swap by absolute path in its first column
    awk -v p="$1" 'NR > 1 && $1 == p { found = 1 } END { exit !found }' /proc/swaps 2>/dev/null
}

cmd_status() {
    if [[ -r /proc/swaps ]]; then
        printf 'active swap (/proc/swaps):\n'
        cat /proc/swaps
    fi
    free -h 2>/dev/null || true
    if [[ -e "$SWAP_PATH" ]]; then
        printf '%s exists (%s bytes)%s\n' "$SWAP_PATH" "$(stat -c %s -- "$SWAP_PATH")" \
            "$(is_active_swap "$SWAP_PATH" && printf ', active' || printf ', not active')"
    else
        printf '%s: not present\n' "$SWAP_PATH"
    fi
}

cmd_add() {
    local size="$1" bytes dir avail
    bytes="$(to_bytes "$size")" || die "size '$size' is not understood (use e.g. 8G, 512M)" 2
    [[ "$bytes" -gt 0 ]] || die "size must be more than 0" 2
    need_root add
    if [[ -e "$SWAP_PATH" || -L "$SWAP_PATH" ]]; then
        die "$SWAP_PATH already exists; refusing to overwrite it (remove it first, or pass --path)"
    fi
    dir="$(dirname -- "$SWAP_PATH")"
    [[ -d "$dir" ]] || die "directory $dir does not exist"
    avail="$(df --output=avail -B1 -- "$dir" | tail -n 1 | tr -d ' ')"
    if [[ "$((bytes + DISK_SPARE_BYTES))" -gt "$avail" ]]; then
        die "not enough free disk in $dir: $size swap + 1 GiB spare needed, $((avail / 1024 / 1024)) MiB free"
    fi
    printf 'adding %s of swap at %s\n' "$size" "$SWAP_PATH"
    # fallocate reserves the blocks without writing them: instant even for tens of GiB.
    run fallocate -l "$bytes" -- "$SWAP_PATH"
    run chmod 600 -- "$SWAP_PATH"
    run mkswap -- "$SWAP_PATH"
    run swapon -- "$SWAP_PATH"
    printf 'done; remove it later with: sudo %s remove%s\n' "$0" \
        "$([[ "$SWAP_PATH" == "$DEFAULT_PATH" ]] || printf ' --path %q' "$SWAP_PATH")"
}

cmd_remove() {
    need_root remove
    [[ -e "$SWAP_PATH" ]] || die "$SWAP_PATH does not exist; nothing to remove"
    if ! is_active_swap "$SWAP_PATH"; then
        die "$SWAP_PATH is not an active swap file; refusing to delete it"
    fi
    run swapoff -- "$SWAP_PATH"
    run rm -f -- "$SWAP_PATH"
}

DRY_RUN=0
SWAP_PATH="$DEFAULT_PATH"
ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --path)
            [[ $# -ge 2 && -n "$2" ]] || die "--path needs a file name" 2
            SWAP_PATH="$2"
            shift
            ;;
        -h|--help) usage; exit 0 ;;
        -*) die "unknown option $1" 2 ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done
[[ "$SWAP_PATH" == /* ]] || SWAP_PATH="$(pwd)/$SWAP_PATH"

case "${ARGS[0]:-}" in
    add)
        [[ "${#ARGS[@]}" -eq 2 ]] || die "usage: $PROG [--dry-run] [--path FILE] add SIZE" 2
        cmd_add "${ARGS[1]}"
        ;;
    remove)
        [[ "${#ARGS[@]}" -eq 1 ]] || die "usage: $PROG [--dry-run] [--path FILE] remove" 2
        cmd_remove
        ;;
    status)
        cmd_status
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
