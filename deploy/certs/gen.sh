#!/usr/bin/env bash
# Demo PKI for Passerelle's TLS and mutual TLS: `bash deploy/certs/gen.sh [OUTDIR]` (default deploy/certs/out,
# git-ignored). Needs only the `openssl` command (1.1.1 or 3.x). Idempotent: every run makes new keys and
# certificates and replaces the previous set in OUTDIR (files are written to a scratch directory first and moved
# into place only when all of them exist, so a failed run leaves the old set intact).
#
#   ca-FR.crt ca-DE.crt ca-IT.crt   one root CA per member state (EC P-256, 3650 days, CA:true, keyCertSign+cRLSign)
#   ca-EU.crt                       and one for EU-level bodies (the auditor)
#   ca-bundle.pem                   the four roots: the trust anchors for `[tls] client_ca` and for clients.
#   anchors.toml                    `[tls.anchors]`: each root's member state by SHA-256 fingerprint, to append
#                                   after a `[tls]` section. A gateway accepts a client certificate only if its
#                                   chain ends at the anchor bound to the principal's own member state.
#   gw-fr gw-de gw-it .crt/.key     gateway certificates (FR, DE, IT CA): CN=gw-xx, O=passerelle, C=XX,
#                                   SAN localhost, gw-xx, 127.0.0.1; serverAuth and clientAuth (gateways also call
#                                   each other); 825 days
#   trainer-de auditor-eu steward-fr .crt/.key
#                                   client certificates of the `serve --demo` principals (CN = principal name,
#                                   O = organisation, C = member state), clientAuth, 825 days:
#                                   trainer-de/dkfz/DE (DE CA), auditor-eu/eu-audit/EU (EU CA), steward-fr/aphp/FR (FR CA)
#
# Every .crt holds the leaf certificate only (no chain): the CAs are roots, which a peer must already trust through
# ca-bundle.pem. Keys are PKCS#8 PEM, mode 600. CA keys (ca-XX.key) are kept so that tests can issue more
# certificates; in a real deployment they never leave the member state's authority.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:-$HERE/out}"
CA_DAYS=3650
LEAF_DAYS=825
STATES=(FR DE IT)
AUTHORITIES=(FR DE IT EU)

command -v openssl >/dev/null 2>&1 || { echo "gen.sh: the openssl command is required" >&2; exit 1; }
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
WORK="$(mktemp -d "$OUT/.gen.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
umask 077
start=$(date +%s%N)

# One configuration for every `openssl req` (so the machine's openssl.cnf and its default extensions play no part);
# each certificate's extensions come from a file of its own.
cat >"$WORK/req.cnf" <<'CNF'
[req]
distinguished_name = dn
prompt = no
string_mask = utf8only
utf8 = yes
[dn]
CN = placeholder
CNF

run() {  # run CMD...: run quietly; on failure show what the command printed and stop
  if ! "$@" >"$WORK/cmd.log" 2>&1; then
    echo "gen.sh: failed: $*" >&2
    cat "$WORK/cmd.log" >&2
    exit 1
  fi
}

newkey() {  # newkey FILE: an EC P-256 private key
  run openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -pkeyopt ec_param_enc:named_curve -out "$1"
}

serial() {  # a random positive 127-bit serial number, as 0x-prefixed hex
  local hex
  hex="$(openssl rand -hex 16)"
  printf '0x%x%s' $((0x${hex:0:1} & 7)) "${hex:1}"
}

# ca STATE: a self-signed root CA for a member state.
ca() {
  local cc=$1
  newkey "$WORK/ca-$cc.key"
  cat >"$WORK/ca-$cc.ext" <<EXT
basicConstraints = critical, CA:true
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EXT
  run openssl req -new -config "$WORK/req.cnf" -key "$WORK/ca-$cc.key" \
    -subj "/C=$cc/O=passerelle demo/CN=Passerelle demo root CA $cc" -out "$WORK/ca-$cc.csr"
  run openssl x509 -req -sha256 -in "$WORK/ca-$cc.csr" -signkey "$WORK/ca-$cc.key" -days "$CA_DAYS" \
    -set_serial "$(serial)" -extfile "$WORK/ca-$cc.ext" -out "$WORK/ca-$cc.crt"
}

# leaf NAME STATE_OF_CA SUBJECT EKU [SAN]: a certificate signed by the CA of STATE_OF_CA.
leaf() {
  local name=$1 cc=$2 subj=$3 eku=$4 san=${5:-}
  newkey "$WORK/$name.key"
  {
    echo "basicConstraints = critical, CA:false"
    echo "keyUsage = critical, digitalSignature"
    echo "extendedKeyUsage = $eku"
    echo "subjectKeyIdentifier = hash"
    echo "authorityKeyIdentifier = keyid"
    [ -z "$san" ] || echo "subjectAltName = $san"
  } >"$WORK/$name.ext"
  run openssl req -new -config "$WORK/req.cnf" -key "$WORK/$name.key" -subj "$subj" -out "$WORK/$name.csr"
  run openssl x509 -req -sha256 -in "$WORK/$name.csr" -CA "$WORK/ca-$cc.crt" -CAkey "$WORK/ca-$cc.key" \
    -set_serial "$(serial)" -days "$LEAF_DAYS" -extfile "$WORK/$name.ext" -out "$WORK/$name.crt"
  run openssl verify -CAfile "$WORK/ca-$cc.crt" "$WORK/$name.crt"
}

for cc in "${AUTHORITIES[@]}"; do
  ca "$cc"
done
cat "$WORK/ca-FR.crt" "$WORK/ca-DE.crt" "$WORK/ca-IT.crt" "$WORK/ca-EU.crt" >"$WORK/ca-bundle.pem"
{
  echo "[tls.anchors]  # the member state each trust anchor of ca-bundle.pem vouches for (gen.sh)"
  for cc in "${AUTHORITIES[@]}"; do
    fp="$(openssl x509 -in "$WORK/ca-$cc.crt" -noout -fingerprint -sha256)"
    echo "$cc = \"${fp#*=}\""
  done
} >"$WORK/anchors.toml"

for cc in "${STATES[@]}"; do
  gw="gw-$(echo "$cc" | tr 'A-Z' 'a-z')"
  leaf "$gw" "$cc" "/C=$cc/O=passerelle/CN=$gw" "serverAuth, clientAuth" "DNS:localhost, DNS:$gw, IP:127.0.0.1"
done
leaf trainer-de DE "/C=DE/O=dkfz/CN=trainer-de" clientAuth
leaf auditor-eu EU "/C=EU/O=eu-audit/CN=auditor-eu" clientAuth
leaf steward-fr FR "/C=FR/O=aphp/CN=steward-fr" clientAuth

NAMES=(ca-FR ca-DE ca-IT ca-EU gw-fr gw-de gw-it trainer-de auditor-eu steward-fr)
chmod 600 "$WORK"/*.key
chmod 644 "$WORK"/*.crt "$WORK/ca-bundle.pem"
for n in "${NAMES[@]}"; do
  mv -f "$WORK/$n.key" "$OUT/$n.key"
  mv -f "$WORK/$n.crt" "$OUT/$n.crt"
done
mv -f "$WORK/ca-bundle.pem" "$OUT/ca-bundle.pem"
chmod 644 "$WORK/anchors.toml"
mv -f "$WORK/anchors.toml" "$OUT/anchors.toml"

elapsed_ms=$((($(date +%s%N) - start) / 1000000))
echo "gen.sh: demo PKI in $OUT (${elapsed_ms} ms)"
for n in "${NAMES[@]}"; do
  # subject=..., issuer=..., notAfter=... in one call
  openssl x509 -in "$OUT/$n.crt" -noout -subject -issuer -enddate -nameopt RFC2253 |
    awk -v f="$n.crt" -F= '{ sub(/^[^=]*=/, ""); v[NR] = $0 }
      END { sub(/,O=passerelle demo,C=..$/, "", v[2]); sub(/^CN=/, "", v[2]);
            printf "  %-15s %-45s issuer: %s, until %s\n", f, v[1], v[2], v[3] }'
done
echo "  ca-bundle.pem   ca-FR.crt + ca-DE.crt + ca-IT.crt + ca-EU.crt (the trust anchors); *.key: PKCS#8, mode 600"
echo "  anchors.toml    [tls.anchors] binding each anchor to its member state (append after [tls])"
