#!/usr/bin/env bash
# The container image's binary, checked without a container runtime: build
# it with deploy/Containerfile's own build command, put it alone in an empty
# directory with a certificate and key made here, run `wsgate --demo` over
# wss:// chrooted there, and receive demo messages from outside with a
# client that trusts only this run's CA, as a WebSocket and as an event
# stream (SSE). Prints the binary's size, what ldd says of it and the
# messages received; exits non-zero if anything fails.
#
#   sudo deploy/chroot-check.sh          # from anywhere in the repository
#
# Needs root (chroot), a Rust toolchain with a C compiler (as the image's
# builder has), and Debian's openssl, python3 and binutils, which it installs
# with apt-get where missing.
# Loopback only; it stops the gateway it started and removes its files.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "chroot-check: run as root (chroot needs it)" >&2; exit 2; }

missing=()
command -v openssl >/dev/null || missing+=(openssl)
command -v python3 >/dev/null || missing+=(python3)
command -v readelf >/dev/null || missing+=(binutils)
if [ ${#missing[@]} -gt 0 ]; then
    echo "chroot-check: installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The Containerfile's build command, word for word, run as RUN runs it.
mapfile -t builds < <(sed -n 's/^RUN \(.*cargo build .*\)$/\1/p' "$repo/deploy/Containerfile")
[ ${#builds[@]} = 1 ] || { echo "chroot-check: expected one 'RUN ... cargo build' line in the Containerfile" >&2; exit 1; }
echo "+ ${builds[0]}"
(cd "$repo" && sh -c "${builds[0]}")
binary="${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release/wsgate"

work=$(mktemp -d /tmp/wsgate-chroot-check.XXXXXX)
pid=
cleanup() {
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then kill "$pid"; wait "$pid" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# A CA for this run only, and a P-256 leaf for localhost and 127.0.0.1.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj "/CN=wsgate chroot-check CA" -keyout "$work/ca.key" -out "$work/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
    -subj "/CN=localhost" -keyout "$work/leaf.key" -out "$work/leaf.csr" 2>/dev/null
printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
    "keyUsage=digitalSignature" "extendedKeyUsage=serverAuth" > "$work/leaf.ext"
openssl x509 -req -in "$work/leaf.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 1 -extfile "$work/leaf.ext" -out "$work/leaf.pem" 2>/dev/null

# The root: the binary, the chain and the key. Nothing else.
root="$work/root"
mkdir "$root"
cp "$binary" "$root/wsgate"
cat "$work/leaf.pem" "$work/ca.pem" > "$root/chain.pem"
cp "$work/leaf.key" "$root/key.pem"
echo "root directory:"
(cd "$root" && find . -mindepth 1 | sort | sed 's/^/  /')
echo "binary: $(stat -c %s "$root/wsgate") bytes ($(du -h "$root/wsgate" | cut -f1))"
echo "ldd: $( (ldd "$root/wsgate" 2>&1 || true) | sed 's/^[[:space:]]*//')"
if readelf -lW "$root/wsgate" | grep -q INTERP || readelf -dW "$root/wsgate" | grep -q NEEDED; then
    echo "chroot-check: the binary is dynamically linked" >&2
    exit 1
fi

chroot "$root" /wsgate --demo --listen 127.0.0.1:0 \
    --tls-cert /chain.pem --tls-key /key.pem >"$work/wsgate.log" 2>&1 &
pid=$!
url=
for _ in $(seq 100); do
    url=$(grep -o 'wss://127\.0\.0\.1:[0-9]*/' "$work/wsgate.log" | head -1 || true)
    [ -n "$url" ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
[ -n "$url" ] || { echo "chroot-check: wsgate did not start:" >&2; cat "$work/wsgate.log" >&2; exit 1; }
echo "wsgate (pid $pid, chrooted) serves $url"

python3 - "$url" "$work/ca.pem" <<'PY'
"""A wss:// client from the standard library: TLS that verifies the
certificate against the given CA and the name, a hand-made WebSocket
upgrade, then five text frames. A client that trusts only the system's
roots must be refused first."""
import base64, hashlib, json, os, socket, ssl, sys

url, ca = sys.argv[1], sys.argv[2]
port = int(url.rsplit(":", 1)[1].strip("/"))

def connect(context):
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return context.wrap_socket(sock, server_hostname="localhost")

try:
    connect(ssl.create_default_context()).close()
    sys.exit("a client without this run's CA was let in")
except ssl.SSLCertVerificationError as e:
    print(f"without the CA: refused ({e.verify_message})")

trusting = ssl.create_default_context(cafile=ca)
trusting.set_alpn_protocols(["http/1.1"])
tls = connect(trusting)
print(f"with the CA: {tls.version()}, {tls.cipher()[0]}, ALPN {tls.selected_alpn_protocol()}")
key = base64.b64encode(os.urandom(16)).decode()
tls.sendall((f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\nUpgrade: websocket\r\n"
             f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
             "Sec-WebSocket-Version: 13\r\n\r\n").encode())
buf = b""
while b"\r\n\r\n" not in buf:
    chunk = tls.recv(4096)
    if not chunk:
        sys.exit(f"closed during the upgrade: {buf!r}")
    buf += chunk
head, buf = buf.split(b"\r\n\r\n", 1)
status, *fields = head.decode().split("\r\n")
headers = {n.strip().lower(): v.strip() for n, v in (f.split(":", 1) for f in fields)}
accept = base64.b64encode(hashlib.sha1(
    (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
if not status.startswith("HTTP/1.1 101") or headers.get("sec-websocket-accept") != accept:
    sys.exit(f"not upgraded: {head!r}")

def need(n):
    global buf
    while len(buf) < n:
        chunk = tls.recv(4096)
        if not chunk:
            sys.exit("closed mid-frame")
        buf += chunk
    out, buf = buf[:n], buf[n:]
    return out

seqs = []
while len(seqs) < 5:
    b0, b1 = need(2)
    length = b1 & 0x7F
    if length == 126:
        length = int.from_bytes(need(2), "big")
    elif length == 127:
        length = int.from_bytes(need(8), "big")
    payload = need(length)
    if b0 & 0x0F != 1:
        continue
    print(f"  received {payload.decode()}")
    seqs.append(json.loads(payload)["seq"])
if seqs != list(range(seqs[0], seqs[0] + 5)):
    sys.exit(f"not consecutive: {seqs}")
tls.close()
print(f"received 5 demo messages over wss://, seq {seqs[0]}..{seqs[-1]}")

# The same route as Server-Sent Events, over the same TLS listener.
tls = connect(trusting)
tls.sendall(f"GET / HTTP/1.1\r\nHost: localhost:{port}\r\nAccept: text/event-stream\r\n\r\n".encode())
text = ""
while text.count("\ndata: ") < 3:
    chunk = tls.recv(4096)
    if not chunk:
        sys.exit(f"the event stream ended: {text!r}")
    text += chunk.decode()
if not text.startswith("HTTP/1.1 200") or "text/event-stream" not in text.split("\r\n\r\n")[0]:
    sys.exit(f"not an event stream: {text!r}")
events = [l for l in text.splitlines() if l.startswith("data: ")]
print(f"received {len(events)} demo events over https:// (SSE), first {events[0]}")
tls.close()
PY

kill "$pid"
status=0
wait "$pid" || status=$?
pid=
echo "wsgate stopped by SIGTERM, exit status $status"
[ "$status" = 0 ] || { cat "$work/wsgate.log" >&2; exit 1; }
echo "chroot-check: ok"
