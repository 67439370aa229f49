#!/usr/bin/env bash
# One room process on its own, measured the way docs/benchmarks.md reports it:
#   1. RSS per idle authenticated connection and the connect rate, with
#      19,000 devices (crates/room/examples/room_rss.rs);
#   2. broadcast fan-out: 200 messages of 64 B to 5,000 subscribers through
#      the room's Broadcast RPC (crates/room/examples/room_fanout.rs).
# The rest of the cluster is `pushgrid dev` (SQLite). Every process started
# here is stopped by its pid at the end. Run from the repository root after
#   cargo build --release -p pushgrid -p pushgrid-room --bins --examples
# Usage: loadtest/room-bench.sh [connections (19000)] [room binary (target/release/room)]
set -euo pipefail
cd "$(dirname "$0")/.."
connections=${1:-19000}
room_bin=${2:-target/release/room}
bin=target/release
work=$(mktemp -d /tmp/pushgrid-room-bench.XXXXXX)
ulimit -n 20000
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# Waits for "PUSHGRID_BOUND <role> <name> <addr>" in file $1 and prints addr.
bound() {
    for _ in $(seq 1 600); do
        line=$(grep -m1 "^PUSHGRID_BOUND $2 $3 " "$1" || true)
        if [ -n "$line" ]; then echo "${line##* }"; return 0; fi
        sleep 0.1
    done
    echo "no '$2 $3' in $1" >&2
    return 1
}

"$bin/pushgrid" dev --data-dir "$work/data" --dispatcher-listen 127.0.0.1:0 \
    --center-listen 127.0.0.1:0 --room-listen 127.0.0.1:0 --heartbeat-secs 600 \
    >"$work/dev.out" 2>"$work/dev.log" &
pids+=($!)
keeper=$(bound "$work/dev.out" keeper grpc)
bound "$work/dev.out" dev ready >/dev/null

start_room() { # name, extra settings...
    local name=$1; shift
    "$room_bin" --set "keeper=$keeper" --set listen=127.0.0.1:0 --set admin_listen=127.0.0.1:0 \
        --set "credentials_dir=$work/data/credentials" --set tcp_listen=127.0.0.1:0 --set heartbeat_secs=600 --set "node_id=bench-$name" "$@" \
        >"$work/$name.out" 2>"$work/$name.log" &
    pids+=($!)
    room_pid=$!
    room_tcp=$(bound "$work/$name.out" room tcp)
    room_grpc=$(bound "$work/$name.out" room grpc)
    bound "$work/$name.out" room ready >/dev/null
}

echo "== RSS per idle connection, $connections devices (room $room_bin)"
start_room rss
"$bin/examples/room_rss" --addr "$room_tcp" --pid "$room_pid" --connections "$connections" \
    --app demo --secret demo-secret --settle-secs 5
kill "$room_pid"

echo "== fan-out: 5,000 subscribers x 200 messages of 64 B"
start_room fanout --set outbound_queue=1024 --set outbound_queue_bytes=4194304
"$bin/examples/room_fanout" --addr "$room_tcp" --grpc "$room_grpc" --credentials "$work/data/credentials" --subscribers 5000 \
    --messages 200 --payload 64 --app demo --secret demo-secret
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); logs in $work"
