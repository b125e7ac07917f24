#!/usr/bin/env bash
# One-shot setup of deploy/compose.yaml (the `setup` service; also runnable on a host, see the environment below):
# the demo PKI, each node's Ed25519 key (created on first use) and each node's configuration, naming the two other
# nodes as peers with their keys, and the storage locations each node's datasets may be registered from (the demo's
# own data, controller aphp; gw-it's S3 bucket too). Idempotent: keys and certificates are kept when they exist.
#
# Environment (defaults are the compose network's):
#   FED          shared directory (volume) for certificates, configurations and data   /fed
#   DEPLOY       this repository's deploy/ directory                                  /deploy
#   PASSERELLE   the binary                                                           passerelle
#   PEER_URLS    how nodes reach each other     "gw-fr=grpc+tls://gw-fr:50051 gw-de=... gw-it=..."
#   ADVERTISE    where clients reach each node  "gw-fr=grpc+tls://localhost:50061 gw-de=...:50062 gw-it=...:50063"
#   S3_ENDPOINT  the S3 emulator gw-it reads its part from                            http://s3:5000
set -euo pipefail

FED="${FED:-/fed}"
DEPLOY="${DEPLOY:-/deploy}"
PASSERELLE="${PASSERELLE:-passerelle}"
PEER_URLS="${PEER_URLS:-gw-fr=grpc+tls://gw-fr:50051 gw-de=grpc+tls://gw-de:50051 gw-it=grpc+tls://gw-it:50051}"
ADVERTISE="${ADVERTISE:-gw-fr=grpc+tls://localhost:50061 gw-de=grpc+tls://localhost:50062 gw-it=grpc+tls://localhost:50063}"
S3_ENDPOINT="${S3_ENDPOINT:-http://s3:5000}"

NODES=(gw-fr gw-de gw-it)
declare -A STATE=([gw-fr]=FR [gw-de]=DE [gw-it]=IT)
declare -A PEER ADV KEYX
for kv in $PEER_URLS; do PEER[${kv%%=*}]=${kv#*=}; done
for kv in $ADVERTISE; do ADV[${kv%%=*}]=${kv#*=}; done
for n in "${NODES[@]}"; do
  [ -n "${PEER[$n]:-}" ] && [ -n "${ADV[$n]:-}" ] || { echo "setup: PEER_URLS and ADVERTISE must name $n" >&2; exit 2; }
done

CERTS="$FED/certs"
if [ ! -f "$CERTS/ca-bundle.pem" ] || [ ! -f "$CERTS/anchors.toml" ]; then
  bash "$DEPLOY/certs/gen.sh" "$CERTS" >/dev/null
  echo "setup: demo PKI written to $CERTS"
fi

for n in "${NODES[@]}"; do
  mkdir -p "$FED/$n/data"
  printf 'node_id = "%s"\n' "$n" >"$FED/$n/passerelle.toml"
  json="$("$PASSERELLE" --data-dir "$FED/$n/data" --json keys --config "$FED/$n/passerelle.toml")"
  KEYX[$n]="$(printf '%s' "$json" | sed -n 's/.*"x" *: *"\([A-Za-z0-9_-]*\)".*/\1/p')"
  [ -n "${KEYX[$n]}" ] || { echo "setup: no key in \`passerelle keys\` output for $n: $json" >&2; exit 1; }
done

for n in "${NODES[@]}"; do
  {
    echo "# written by deploy/compose/setup.sh"
    echo "node_id = \"$n\""
    echo "data_dir = \"$FED/$n/data\""
    echo
    echo "[tls]"
    echo "cert = \"$CERTS/$n.crt\""
    echo "key = \"$CERTS/$n.key\""
    echo "client_ca = \"$CERTS/ca-bundle.pem\""
    echo "require_client_cert = false"
    echo "allow_bearer = true"
    cat "$CERTS/anchors.toml"
    echo
    echo "[federation]"
    echo "advertise_flight_url = \"${ADV[$n]}\""
    echo
    echo "# Where aphp's datasets may be registered from: the demo's own data."
    echo "[locations.demo]"
    echo "url = \"file://$FED/$n/data/demo/\""
    echo "controllers = [\"aphp\"]"
    if [ "$n" = gw-it ]; then
      echo
      echo "# and gw-it's part, in the S3 bucket eu-lake, read through the store lake."
      echo "[locations.eu-lake]"
      echo "url = \"s3://eu-lake/\""
      echo "controllers = [\"aphp\"]"
      echo "store = \"lake\""
      echo
      echo "# gw-it keeps its part in an S3-compatible object store (the emulator of the compose file)."
      echo "[stores.lake]"
      echo "kind = \"s3\""
      echo "endpoint = \"$S3_ENDPOINT\""
      echo "region = \"eu-south-1\""
      echo "access_key_id = \"demo\""
      echo "secret_access_key = \"demo\""
      echo "allow_http = true"
    fi
    for p in "${NODES[@]}"; do
      [ "$p" != "$n" ] || continue
      echo
      echo "[peers.$p]"
      echo "member_state = \"${STATE[$p]}\""
      echo "flight_url = \"${PEER[$p]}\""
      echo "key = \"${KEYX[$p]}\""
      echo "ca = \"$CERTS/ca-bundle.pem\""
    done
  } >"$FED/$n/passerelle.toml"
  echo "setup: $n configured (key ${KEYX[$n]})"
done

# The nodes run as the image's unprivileged user.
if [ "$(id -u)" -eq 0 ] && id passerelle >/dev/null 2>&1; then
  chown -R passerelle "$FED"
fi
