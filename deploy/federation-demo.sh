#!/usr/bin/env bash
# Three federated Passerelle nodes on this machine (local processes, no containers):
#
#   node   member state  Flight            REST              local dataset  permit dkfz / research/ai-training
#   gw-fr  FR            127.0.0.1:50061   127.0.0.1:8091    diabetes_fr    yes
#   gw-de  DE            127.0.0.1:50062   127.0.0.1:8092    diabetes_de    yes   (home node of trainer-de)
#   gw-it  IT            127.0.0.1:50063   127.0.0.1:8093    diabetes_it    no    (hides hba1c as well)
#
# Each node runs `serve --demo` (its own synthetic data: the row counts differ, so the parts differ), knows the two
# others as peers (keys learned with `passerelle keys`), and registers its part of the federated dataset
# `eu_diabetes` (a manifest with `federation = "eu_diabetes"`). The script then prints a pyarrow snippet in which
# trainer-de asks its home node gw-de for eu_diabetes and reads every node's part directly from that node.
# Ctrl-C stops the three nodes.
#
#   bash deploy/federation-demo.sh [--mtls] [--dir DIR] [--rows N] [--check]
#
#   --mtls      grpc+tls:// and https:// everywhere with the demo PKI of deploy/certs/gen.sh (made under DIR/certs):
#               nodes present their gateway certificates to each other, trainer-de its client certificate
#   --dir DIR   work directory (configs, data, logs); default: a new temporary directory. Re-running on the same
#               directory keeps the nodes' keys, data and registrations.
#   --rows N    demo rows of gw-fr (gw-de: 60 %, gw-it: 30 %); default 100000
#   --check     run the snippet once (needs pyarrow), then stop the nodes; exit code 0 if it pulled rows
#
# Environment: PASSERELLE_BIN (the binary; default target/release, then $CARGO_TARGET_DIR or
# ~/.cache/passerelle-target, release then debug), PASSERELLE_FED_FLIGHT_PORT (first Flight port, 50061),
# PASSERELLE_FED_HTTP_PORT (first REST port, 8091), PYTHON (an interpreter with pyarrow, for --check).
# Needs python3 >= 3.11 (tomllib) for its own JSON and REST calls, and the openssl command for --mtls.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

MTLS=0
CHECK=0
WORK=""
ROWS=100000
while [ $# -gt 0 ]; do
  case "$1" in
    --mtls) MTLS=1 ;;
    --check) CHECK=1 ;;
    --dir) WORK="${2:?--dir needs a directory}"; shift ;;
    --rows) ROWS="${2:?--rows needs a number}"; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "federation-demo.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
case "$ROWS" in '' | *[!0-9]*) echo "federation-demo.sh: --rows takes a number" >&2; exit 2 ;; esac

die() { echo "federation-demo.sh: $*" >&2; exit 1; }

# --- the binary -------------------------------------------------------------------------------------------------------
TARGET="${CARGO_TARGET_DIR:-$HOME/.cache/passerelle-target}"
if [ -n "${PASSERELLE_BIN:-}" ]; then
  BIN="$PASSERELLE_BIN"
else
  BIN=""
  for candidate in "$REPO/target/release/passerelle" "$TARGET/release/passerelle" "$TARGET/debug/passerelle" \
                   "$REPO/target/debug/passerelle"; do
    if [ -x "$candidate" ]; then BIN="$candidate"; break; fi
  done
  [ -n "$BIN" ] || die "no passerelle binary found: cargo build --release -p passerelle --bin passerelle, or set PASSERELLE_BIN"
fi
[ -x "$BIN" ] || die "PASSERELLE_BIN=$BIN is not an executable"
PY3="$(command -v python3 || true)"
[ -n "$PY3" ] && "$PY3" -c 'import tomllib' 2>/dev/null || die "python3 >= 3.11 is needed (tomllib)"

# --- the work directory and the nodes ---------------------------------------------------------------------------------
if [ -z "$WORK" ]; then
  WORK="$(mktemp -d "${TMPDIR:-/tmp}/passerelle-federation.XXXXXX")"
fi
mkdir -p "$WORK"
WORK="$(cd "$WORK" && pwd)"

NODES=(gw-fr gw-de gw-it)
declare -A STATE=([gw-fr]=FR [gw-de]=DE [gw-it]=IT)
declare -A DATASET=([gw-fr]=diabetes_fr [gw-de]=diabetes_de [gw-it]=diabetes_it)
declare -A NROWS=([gw-fr]=$ROWS [gw-de]=$((ROWS * 6 / 10)) [gw-it]=$((ROWS * 3 / 10)))
declare -A PERMIT=([gw-fr]=1 [gw-de]=1 [gw-it]=0)
declare -A FPORT HPORT
FLIGHT0="${PASSERELLE_FED_FLIGHT_PORT:-50061}"
HTTP0="${PASSERELLE_FED_HTTP_PORT:-8091}"
i=0
for n in "${NODES[@]}"; do
  FPORT[$n]=$((FLIGHT0 + i))
  HPORT[$n]=$((HTTP0 + i))
  i=$((i + 1))
done
if [ "$MTLS" = 1 ]; then HOST=localhost; SCHEME=grpc+tls; WEB=https; else HOST=127.0.0.1; SCHEME=grpc; WEB=http; fi
flight_url() { echo "$SCHEME://$HOST:${FPORT[$1]}"; }
rest_url() { echo "$WEB://$HOST:${HPORT[$1]}"; }
CERTS="$WORK/certs"

# Small helpers in Python (JSON, REST with TLS, TOML manifests), written once into the work directory.
FEDCTL="$WORK/fedctl.py"
cat >"$FEDCTL" <<'PY'
"""Helpers of deploy/federation-demo.sh."""
import json, socket, ssl, sys, time, tomllib, urllib.error, urllib.request
from pathlib import Path


def ctx(ca):
    return ssl.create_default_context(cafile=ca) if ca else None


def call(method, url, key=None, body=None, ca=None):
    headers = {"accept": "application/json"}
    data = None
    if key:
        headers["authorization"] = f"Bearer {key}"
    if body is not None:
        data, headers["content-type"] = json.dumps(body).encode(), "application/json"
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx(ca)) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def main(cmd, *args):
    if cmd == "port-free":  # port-free PORT...: exit 1 naming the first port in use
        for p in args:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: TIME_WAIT is no conflict
            try:
                s.bind(("127.0.0.1", int(p)))
            except OSError:
                print(p)
                return 1
            finally:
                s.close()
        return 0
    if cmd == "key-x":  # the `x` of `passerelle keys` JSON on stdin
        doc = json.load(sys.stdin)
        print(doc["keys"][0]["x"])
        return 0
    if cmd == "wait":  # wait DATA_DIR REST_URL CA PID: serve.json written and /healthz answering
        data_dir, url, ca, pid = Path(args[0]), args[1], args[2] or None, int(args[3])
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:  # gone, or a zombie waiting for the script to reap it
                if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    return 1
            except OSError:
                return 1
            if (data_dir / "serve.json").exists() and (data_dir / "demo-keys.json").exists():
                try:
                    if call("GET", url + "/healthz", ca=ca)[0] == 200:
                        return 0
                except OSError:
                    pass
            time.sleep(0.2)
        return 1
    if cmd == "register":  # register DATA_DIR REST_URL CA DATASET MEMBER_STATE PERMIT(0/1) [HIDE_COLUMN]
        data_dir, url, ca, name, state, permit = Path(args[0]), args[1], args[2] or None, args[3], args[4], args[5]
        hide = args[6] if len(args) > 6 else None
        steward = json.loads((data_dir / "demo-keys.json").read_text())["steward-fr"]["key"]
        manifest = tomllib.loads((data_dir / "demo" / "demo_patients.toml").read_text())
        manifest.update(name=name, member_state=state, federation="eu_diabetes")
        loc = manifest["location"]
        if "://" not in loc and not loc.startswith("/"):  # relative to the manifest's directory
            manifest["location"] = str((data_dir / "demo" / loc).resolve()) + ("/" if loc.endswith("/") else "")
        if hide:
            manifest["columns"][hide] = {"class": manifest["columns"][hide]["class"], "mask": "drop"}
        status, text = call("POST", url + "/api/v1/datasets", steward, manifest, ca)
        if status not in (200, 201, 409):
            print(f"registering {name}: HTTP {status} {text}", file=sys.stderr)
            return 1
        if permit == "1":
            status, text = call("POST", f"{url}/api/v1/datasets/{name}/permits", steward,
                                {"org": "DE/dkfz", "purpose": "research/ai-training"}, ca)
            if status not in (200, 201, 409):
                print(f"permit on {name}: HTTP {status} {text}", file=sys.stderr)
                return 1
        return 0
    raise SystemExit(f"fedctl: unknown command {cmd}")


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
PY
fedctl() { "$PY3" "$FEDCTL" "$@"; }

ports=()
for n in "${NODES[@]}"; do ports+=("${FPORT[$n]}" "${HPORT[$n]}"); done
if busy="$(fedctl port-free "${ports[@]}")"; then :; else
  die "port $busy is in use (another demo still running?); set PASSERELLE_FED_FLIGHT_PORT / PASSERELLE_FED_HTTP_PORT"
fi

if [ "$MTLS" = 1 ]; then
  command -v openssl >/dev/null 2>&1 || die "--mtls needs the openssl command"
  [ -f "$CERTS/ca-bundle.pem" ] && [ -f "$CERTS/anchors.toml" ] || bash "$REPO/deploy/certs/gen.sh" "$CERTS" >/dev/null
  CA="$CERTS/ca-bundle.pem"
else
  CA=""
fi

echo "federation-demo: binary $BIN"
echo "federation-demo: work directory $WORK"

# 1. Each node's key (created on first use), printed by `passerelle keys` as GET /api/v1/keys would.
declare -A KEYX
for n in "${NODES[@]}"; do
  mkdir -p "$WORK/$n/data"
  printf 'node_id = "%s"\n' "$n" >"$WORK/$n/passerelle.toml"
  KEYX[$n]="$("$BIN" --data-dir "$WORK/$n/data" --json keys --config "$WORK/$n/passerelle.toml" | fedctl key-x)" ||
    die "could not read $n's key with \`passerelle keys\`"
done

# 2. Configurations: node id, advertised Flight URL, the two other nodes as peers.
for n in "${NODES[@]}"; do
  {
    echo "# written by deploy/federation-demo.sh"
    echo "node_id = \"$n\""
    echo
    if [ "$MTLS" = 1 ]; then
      echo "[tls]"
      echo "cert = \"$CERTS/$n.crt\""
      echo "key = \"$CERTS/$n.key\""
      echo "client_ca = \"$CA\""
      echo "require_client_cert = false"
      echo "allow_bearer = true"
      cat "$CERTS/anchors.toml"
      echo
    fi
    echo "[federation]"
    echo "advertise_flight_url = \"$(flight_url "$n")\""
    for p in "${NODES[@]}"; do
      [ "$p" != "$n" ] || continue
      echo
      echo "[peers.$p]"
      echo "member_state = \"${STATE[$p]}\""
      echo "flight_url = \"$(flight_url "$p")\""
      echo "key = \"${KEYX[$p]}\""
      [ "$MTLS" = 0 ] || echo "ca = \"$CA\""
    done
  } >"$WORK/$n/passerelle.toml"
done

# 3. Start the nodes; stop them (by pid) on Ctrl-C, on error and at exit.
declare -A PID
stop_nodes() {
  local n pid t
  for n in "${NODES[@]}"; do
    pid="${PID[$n]:-}"
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null || true
  done
  for n in "${NODES[@]}"; do
    pid="${PID[$n]:-}"
    [ -n "$pid" ] || continue
    for t in $(seq 1 350); do  # the nodes give open streams up to 30 s (shutdown_grace_secs)
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "PID[$n]"
  done
}
trap 'stop_nodes' EXIT
trap 'echo; echo "federation-demo: stopping the nodes"; exit 130' INT TERM

# Each node in a session of its own (setsid): Ctrl-C reaches this script only, which stops the nodes itself.
SETSID=()
if command -v setsid >/dev/null 2>&1; then SETSID=(setsid); fi
for n in "${NODES[@]}"; do
  rm -f "$WORK/$n/data/serve.json"
  "${SETSID[@]}" "$BIN" serve --demo --demo-rows "${NROWS[$n]}" --config "$WORK/$n/passerelle.toml" --data-dir "$WORK/$n/data" \
    --flight-addr "127.0.0.1:${FPORT[$n]}" --http-addr "127.0.0.1:${HPORT[$n]}" \
    >>"$WORK/$n/serve.log" 2>&1 </dev/null &
  PID[$n]=$!
done
for n in "${NODES[@]}"; do
  if ! fedctl wait "$WORK/$n/data" "$(rest_url "$n")" "$CA" "${PID[$n]}"; then
    echo "federation-demo: $n did not start; the end of $WORK/$n/serve.log:" >&2
    tail -n 30 "$WORK/$n/serve.log" >&2
    exit 1
  fi
  echo "federation-demo: $n (${STATE[$n]}) Flight $(flight_url "$n"), REST $(rest_url "$n"), pid ${PID[$n]}"
done

# 4. Each node's part of eu_diabetes, registered by its steward; dkfz's permits on FR and DE only.
for n in "${NODES[@]}"; do
  hide=""
  [ "$n" != gw-it ] || hide=hba1c
  fedctl register "$WORK/$n/data" "$(rest_url "$n")" "$CA" "${DATASET[$n]}" "${STATE[$n]}" "${PERMIT[$n]}" $hide ||
    die "registering ${DATASET[$n]} on $n failed"
done
echo "federation-demo: eu_diabetes = diabetes_fr (gw-fr) + diabetes_de (gw-de) + diabetes_it (gw-it, no permit for dkfz)"

# 5. The client snippet.
SNIPPET="$WORK/pull_eu_diabetes.py"
{
  echo "import json, pyarrow as pa, pyarrow.flight as fl"
  echo
  echo "# Where each node serves its part (the endpoints' locations)."
  echo "NODES = {"
  for n in "${NODES[@]}"; do echo "    \"$(flight_url "$n")\": \"$n\","; done
  echo "}"
  echo "HOME = \"$(flight_url gw-de)\""
  echo "purpose = (b\"x-passerelle-purpose\", b\"research/ai-training\")"
  if [ "$MTLS" = 1 ]; then
    echo "tls = dict(tls_root_certs=open(\"$CA\", \"rb\").read(),"
    echo "           cert_chain=open(\"$CERTS/trainer-de.crt\", \"rb\").read(),"
    echo "           private_key=open(\"$CERTS/trainer-de.key\", \"rb\").read())"
    echo "connect = lambda url: fl.connect(url, **tls)  # the certificate is trainer-de's identity everywhere"
    echo "mine = []"
  else
    echo "key = json.load(open(\"$WORK/gw-de/data/demo-keys.json\"))[\"trainer-de\"][\"key\"]  # trainer-de at gw-de"
    echo "connect = fl.connect"
    echo "mine = [(b\"authorization\", f\"Bearer {key}\".encode())]"
  fi
  cat <<'PY'

# 1. Ask the home node. on_partial "skip": go on without nodes that deny or are down ("fail", the default, refuses).
cmd = {"dataset": "eu_diabetes", "on_partial": "skip"}
info = connect(HOME).get_flight_info(fl.FlightDescriptor.for_command(json.dumps(cmd)),
                                     fl.FlightCallOptions(headers=mine + [purpose]))
meta = {n["node"]: n for n in json.loads(info.app_metadata)["nodes"]}
for n in meta.values():
    print(f'{n["node"]} ({n["member_state"]}): {n["status"]}, {n["endpoints"]} endpoint(s) {n.get("reason", "")}')

# 2. Read every part from the node that holds it (the home node moves no rows).
parts = []
for ep in info.endpoints:
    url = ep.locations[0].uri.decode()
    node = meta[NODES[url]]
    if node.get("assertion"):  # a peer: the home node vouches for trainer-de, to this node only, for minutes
        headers = [purpose, (b"x-passerelle-assertion", node["assertion"].encode())]
    else:  # the home node itself: our own credentials
        headers = [purpose] + mine
    table = connect(url).do_get(ep.ticket, fl.FlightCallOptions(headers=headers)).read_all()
    print(f'{node["node"]}: {table.num_rows} rows, columns {table.column_names}')
    parts.append(table)
table = pa.concat_tables(parts, promote_options="default")
print(f"eu_diabetes: {table.num_rows} rows")
PY
} >"$SNIPPET"

echo
echo "=== trainer-de pulls eu_diabetes from its home node gw-de ($SNIPPET):"
echo
cat "$SNIPPET"
echo

if [ "$CHECK" = 1 ]; then
  PYTHON="${PYTHON:-}"
  if [ -z "$PYTHON" ]; then
    for candidate in "$HOME/.cache/passerelle-venv/bin/python" python3; do
      if "$candidate" -c 'import pyarrow.flight' 2>/dev/null; then PYTHON="$candidate"; break; fi
    done
  fi
  [ -n "$PYTHON" ] || die "--check needs a Python with pyarrow (set PYTHON)"
  echo "=== running it with $PYTHON"
  out="$("$PYTHON" "$SNIPPET")" || { echo "$out"; die "the snippet failed"; }
  echo "$out"
  echo "$out" | grep -Eq '^eu_diabetes: [1-9][0-9]* rows$' || die "the snippet pulled no rows"
  exit 0
fi

echo "Logs: $WORK/gw-*/serve.log. Ctrl-C stops the three nodes."
# Until Ctrl-C, or until a node exits on its own.
set +e
wait -n "${PID[@]}"
rc=$?
set -e
for n in "${NODES[@]}"; do
  if ! kill -0 "${PID[$n]}" 2>/dev/null; then
    echo "federation-demo: $n exited (code $rc); the end of its log:" >&2
    tail -n 30 "$WORK/$n/serve.log" >&2
  fi
done
exit 1
