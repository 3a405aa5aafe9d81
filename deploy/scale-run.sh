#!/usr/bin/env bash
# The scale run: CLIENTS WebSocket clients held by GATEWAYS wsgate processes
# sharing one port (--reuse-port), fed by one origin, measured by LOADS load
# processes (examples/load). Run by hand, not in CI:
#
#   cargo build --release --bin wsgate --example load
#   deploy/scale-run.sh                          # 100 000 clients, 1 msg/s, 128 B
#   CLIENTS=20000 RATE=10 deploy/scale-run.sh    # smaller or faster
#
# Each process stays under the per-process open-file limit (20 000 on the
# machines this was written on): the clients are split over LOADS processes
# and the kernel spreads them over GATEWAYS processes. Prints each load
# process's summary line, one line for the clients together (deliveries/s,
# the worst p99, gaps) and one for the gateways together (clients held,
# CPU, RSS per client, origin connections, frames dropped).
#
# Every process it starts is stopped by its PID when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."

CLIENTS=${CLIENTS:-100000}
GATEWAYS=${GATEWAYS:-6}
LOADS=${LOADS:-6}
RATE=${RATE:-1}
SIZE=${SIZE:-128}
SECONDS_MEASURED=${SECONDS_MEASURED:-30}
WARMUP=${WARMUP:-20}
CONNECT_TIMEOUT=${CONNECT_TIMEOUT:-240}
PORT=${PORT:-9300}
ORIGIN_PORT=${ORIGIN_PORT:-9301}
ADMIN_BASE=${ADMIN_BASE:-9310}
GATEWAY_FLAGS=${GATEWAY_FLAGS:-}
BIN=${BIN:-target/release/wsgate}
LOAD=${LOAD:-target/release/examples/load}
LOGS=${LOGS:-$(mktemp -d /tmp/wsgate-scale.XXXXXX)}
mkdir -p "$LOGS"

for program in "$BIN" "$LOAD"; do
    [ -x "$program" ] || {
        echo "scale-run: $program missing: cargo build --release --bin wsgate --example load" >&2
        exit 2
    }
done

pids=()
stop_all() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap stop_all EXIT

# /proc helpers: utime + stime in clock ticks, and VmRSS in KiB.
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }
metric() { # admin port, metric name with labels: the sample's value
    curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$1 == m { print $2 }'
}
metric_all() { # admin port, metric name: its samples summed over every label set
    curl -s "http://127.0.0.1:$1/metrics" | awk -v m="$2{" 'index($1, m) == 1 { s += $2 } END { printf "%.0f\n", s }'
}
sum() { awk '{ s += $1 } END { printf "%.0f\n", s }'; }

echo "scale-run: $CLIENTS clients, $GATEWAYS gateways on 127.0.0.1:$PORT, $LOADS load processes, $RATE msg/s x $SIZE B; logs in $LOGS"

# The origin: a load process in origin-only mode, outliving every client.
"$LOAD" --origin-listen "127.0.0.1:$ORIGIN_PORT" --rate "$RATE" --size "$SIZE" --warmup 0 \
    --seconds $((CONNECT_TIMEOUT + WARMUP + SECONDS_MEASURED + 60)) \
    >"$LOGS/origin.out" 2>"$LOGS/origin.err" &
pids+=($!)

gateway_pids=()
for n in $(seq 1 "$GATEWAYS"); do
    # shellcheck disable=SC2086
    "$BIN" --listen "127.0.0.1:$PORT" --reuse-port --origin "ws://127.0.0.1:$ORIGIN_PORT/" \
        --admin "127.0.0.1:$((ADMIN_BASE + n))" --log-level warn $GATEWAY_FLAGS \
        >"$LOGS/gateway-$n.out" 2>"$LOGS/gateway-$n.err" &
    pids+=($!)
    gateway_pids+=($!)
done
sleep 1
baseline=0
for pid in "${gateway_pids[@]}"; do
    baseline=$((baseline + $(rss_kib "$pid")))
done

load_pids=()
for n in $(seq 1 "$LOADS"); do
    # The first CLIENTS % LOADS processes take one more.
    clients=$((CLIENTS / LOADS + (n <= CLIENTS % LOADS ? 1 : 0)))
    "$LOAD" --url "ws://127.0.0.1:$PORT/" --clients "$clients" --threads 2 \
        --warmup "$WARMUP" --seconds "$SECONDS_MEASURED" --connect-timeout "$CONNECT_TIMEOUT" \
        >"$LOGS/load-$n.out" 2>"$LOGS/load-$n.err" &
    pids+=($!)
    load_pids+=($!)
done

# The gateways' window: the first half of the clients' windows, from when
# every load process measures (they connect at different speeds; WARMUP
# lets the last catch up before the first window opens). It ends well
# before any client closes: a closing client's unwritten frames count as
# dropped.
count_logs() { grep -l "$1" "$LOGS"/load-*.err 2>/dev/null | wc -l; }
until [ "$(count_logs 'load: measuring')" -eq "$LOADS" ]; do
    for pid in "${load_pids[@]}"; do
        kill -0 "$pid" 2>/dev/null || { echo "scale-run: a load process ended early" >&2; tail -n 3 "$LOGS"/load-*.err >&2; exit 1; }
    done
    sleep 1
done
t0=$(date +%s.%N)
cpu0=0
for pid in "${gateway_pids[@]}"; do cpu0=$((cpu0 + $(cpu_ticks "$pid"))); done
delivered0=$(for n in $(seq 1 "$GATEWAYS"); do metric $((ADMIN_BASE + n)) wsgate_frames_delivered_total; done | sum)
dropped0=$(for n in $(seq 1 "$GATEWAYS"); do metric_all $((ADMIN_BASE + n)) wsgate_frames_dropped_total; done | sum)
held=$(for n in $(seq 1 "$GATEWAYS"); do metric $((ADMIN_BASE + n)) wsgate_clients; done | sum)
spread=$(for n in $(seq 1 "$GATEWAYS"); do metric $((ADMIN_BASE + n)) wsgate_clients; done | paste -sd/)
upstreams=$(for n in $(seq 1 "$GATEWAYS"); do metric $((ADMIN_BASE + n)) 'wsgate_origin_connections{state="up"}'; done | sum)
sleep $((SECONDS_MEASURED / 2))
if [ "$(count_logs 'load: closing clients')" -gt 0 ]; then
    echo "scale-run: a load process closed its clients before the gateways' window ended; raise WARMUP" >&2
fi
t1=$(date +%s.%N)
cpu1=0
rss=0
for pid in "${gateway_pids[@]}"; do
    cpu1=$((cpu1 + $(cpu_ticks "$pid")))
    rss=$((rss + $(rss_kib "$pid")))
done
delivered1=$(for n in $(seq 1 "$GATEWAYS"); do metric $((ADMIN_BASE + n)) wsgate_frames_delivered_total; done | sum)
dropped1=$(for n in $(seq 1 "$GATEWAYS"); do metric_all $((ADMIN_BASE + n)) wsgate_frames_dropped_total; done | sum)

for pid in "${load_pids[@]}"; do wait "$pid" || true; done
cat "$LOGS"/load-*.out
# The clients together: deliveries/s, gaps, duplicates, errors, the worst p99.
awk '{
    for (i = 1; i <= NF; i++) {
        split($i, kv, "=")
        if (kv[1] == "connected") connected += kv[2]
        if (kv[1] == "gaps") gaps += kv[2]
        if (kv[1] == "dups") dups += kv[2]
        if (kv[1] == "errors") errors += kv[2]
        if (kv[1] == "p99") { v = kv[2]; sub(/ms$/, "", v); if (v + 0 > p99) p99 = v + 0 }
        if ($i ~ /^\(/) { v = $i; gsub(/[()\/s]/, "", v); rate += v }
    }
} END {
    printf "clients: %d connected, %.0f deliveries/s, worst p99 %.1fms, gaps %d, dups %d, errors %d\n", connected, rate, p99, gaps, dups, errors
}' "$LOGS"/load-*.out

awk -v t0="$t0" -v t1="$t1" -v c0="$cpu0" -v c1="$cpu1" -v hz="$(getconf CLK_TCK)" \
    -v d0="$delivered0" -v d1="$delivered1" -v held="$held" -v spread="$spread" \
    -v rss="$rss" -v base="$baseline" -v up="$upstreams" -v dropped=$((dropped1 - dropped0)) -v before="$dropped0" \
    -v gws="$GATEWAYS" 'BEGIN {
    secs = t1 - t0; cpu = (c1 - c0) / hz; d = d1 - d0
    printf "gateways: %d processes, clients held %d (%s), window %.1fs, frames delivered %.0f/s, ", gws, held, spread, secs, d / secs
    printf "CPU %.1f%% of one core (%.2fus per delivery), ", 100 * cpu / secs, (d > 0 ? 1e6 * cpu / d : 0)
    printf "RSS %.1f MiB (%.2f KiB per client over a %.1f MiB baseline), ", rss / 1024, (rss - base) / held, base / 1024
    printf "origin connections %d (%.2f%% of clients), frames dropped %d in the window (%d before it)\n", up, 100 * up / held, dropped, before
}'
