#!/bin/sh
# Install pve-reconcile's system layout for one service; safe to run again (it keeps an edited config).
#
#   deploy/install.sh [--root DIR] executor|planner [--config FILE] [--tls-ca FILE] [--tls-cert FILE]
#                     [--tls-key FILE] [--token FILE|-] [--desired FILE] [--trust-store FILE]
#
# It makes the system user and group pve-reconcile (systemd-sysusers), /etc/pve-reconcile and its
# tls/ (root:pve-reconcile 0750), installs each FILE given where the unit and the config expect it
# (readable files root:pve-reconcile 0640; the token and the TLS key root:root 0600, which systemd
# hands to the service as credentials; files already there get the same), the config template when
# there is no config yet, the unit, the README its Documentation= names, and the commands on PATH.
# TLS is optional (the shipped configs: plaintext on loopback, one node): with the service's key in
# tls/ (--tls-key, now or earlier) it adds the unit's drop-in that hands the key over, else removes it.
# The package itself comes first: python3 -m venv /opt/pve-reconcile && /opt/pve-reconcile/bin/pip install .
# --root DIR installs into DIR instead of / (the tests do); `systemctl daemon-reload` runs only for /.
# Exit: 0 installed; 1 something the service needs is missing (named); 2 usage error.
set -eu

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
USER_NAME=pve-reconcile
ROOT=/
ROLE=
CONFIG='' TLS_CA='' TLS_CERT='' TLS_KEY='' TOKEN='' DESIRED='' TRUST=''

usage() {  # exit status: 0 asked for (on standard output), 2 after a usage error
    if [ "$1" = 0 ]; then sed -n '2,17s/^# \{0,1\}//p' "$0"; exit 0; fi
    sed -n '2,17s/^# \{0,1\}//p' "$0" >&2
    exit 2
}

fail() {  # status, message
    echo "install.sh: $2" >&2
    exit "$1"
}

while [ $# -gt 0 ]; do
    case $1 in
        executor|planner) ROLE=$1; shift; continue ;;
        -h|--help) usage 0 ;;
        --root|--config|--tls-ca|--tls-cert|--tls-key|--token|--desired|--trust-store)
            [ $# -ge 2 ] || fail 2 "$1 needs a value"
            case $1 in
                --root) ROOT=$2 ;;
                --config) CONFIG=$2 ;;
                --tls-ca) TLS_CA=$2 ;;
                --tls-cert) TLS_CERT=$2 ;;
                --tls-key) TLS_KEY=$2 ;;
                --token) TOKEN=$2 ;;
                --desired) DESIRED=$2 ;;
                --trust-store) TRUST=$2 ;;
            esac
            shift 2 ;;
        *) echo "install.sh: unknown argument: $1" >&2; usage 2 ;;
    esac
done
[ -n "$ROLE" ] || { echo "install.sh: say which service: executor or planner" >&2; usage 2; }
if [ "$ROLE" = planner ]; then
    for given in "$TOKEN" "$DESIRED" "$TRUST"; do
        [ -z "$given" ] || fail 2 "--token, --desired and --trust-store are the executor's, not the planner's"
    done
fi
for given in "$CONFIG" "$TLS_CA" "$TLS_CERT" "$TLS_KEY" "$DESIRED" "$TRUST" "$TOKEN"; do
    [ -z "$given" ] || [ "$given" = - ] || [ -r "$given" ] || fail 2 "cannot read $given"
done
[ "$(id -u)" = 0 ] || fail 2 "run it as root (it creates a system user and root-owned files)"
ROOT=${ROOT%/}
ETC=$ROOT/etc/pve-reconcile

command=$ROOT/opt/pve-reconcile/bin/pve-$ROLE
[ -x "$command" ] || fail 1 "$command is missing: install the package first:
  python3 -m venv /opt/pve-reconcile && /opt/pve-reconcile/bin/pip install $REPO"
command -v systemd-sysusers >/dev/null || fail 1 "systemd-sysusers is missing (the units need systemd)"

# The user and group (kept if they exist: a group made earlier with groupadd is taken over).
install -d -m 0755 "$ROOT/etc/sysusers.d"
install -m 0644 "$HERE/sysusers.d/pve-reconcile.conf" "$ROOT/etc/sysusers.d/pve-reconcile.conf"
systemd-sysusers --root="$ROOT/" pve-reconcile.conf
gid=$(awk -F: -v name="$USER_NAME" '$1 == name { print $3 }' "$ROOT/etc/group")
[ -n "$gid" ] || fail 1 "systemd-sysusers made no group $USER_NAME in $ROOT/etc/group"

install -d -m 0750 -o 0 -g "$gid" "$ETC" "$ETC/tls"

readable() {  # source, destination: the service reads it through its group
    [ -z "$1" ] || install -m 0640 -o 0 -g "$gid" "$1" "$2"
}
secret() {  # source ("-": standard input), destination: root only; systemd hands it over
    [ -z "$1" ] || { if [ "$1" = - ]; then install -m 0600 -o 0 -g 0 /dev/stdin "$2"
                     else install -m 0600 -o 0 -g 0 "$1" "$2"; fi; }
}

readable "$CONFIG" "$ETC/$ROLE.toml"
[ -e "$ETC/$ROLE.toml" ] || readable "$HERE/$ROLE.toml" "$ETC/$ROLE.toml"  # the template: edit it
readable "$TLS_CA" "$ETC/tls/ca.pem"
readable "$TLS_CERT" "$ETC/tls/$ROLE.pem"
secret "$TLS_KEY" "$ETC/tls/$ROLE.key"
secret "$TOKEN" "$ETC/pve-token"
readable "$DESIRED" "$ETC/desired.yaml"
readable "$TRUST" "$ETC/trust.toml"
# Files already there (an earlier install, or put there by hand) get the same owners and modes: a key
# left group-readable would be readable by every operator who joins the group for the API socket.
for name in "$ROLE.toml" desired.yaml trust.toml tls/ca.pem "tls/$ROLE.pem"; do
    [ ! -f "$ETC/$name" ] || { chown "0:$gid" "$ETC/$name" && chmod 0640 "$ETC/$name"; }
done
for name in pve-token "tls/$ROLE.key"; do
    [ ! -f "$ETC/$name" ] || { chown 0:0 "$ETC/$name" && chmod 0600 "$ETC/$name"; }
done

unit=pve-reconcile-$ROLE.service
install -d -m 0755 "$ROOT/etc/systemd/system" "$ROOT/usr/local/share/doc/pve-reconcile" "$ROOT/usr/local/bin"
install -m 0644 "$HERE/systemd/$unit" "$ROOT/etc/systemd/system/$unit"
# TLS: a drop-in hands the key over (LoadCredential=) when there is one; without it, no drop-in: systemd
# fails a unit whose credential file is missing, and the plaintext one-node setup has no key.
case $ROLE in
    executor) dropin=planner-mtls.conf cert_setting=planner_client_cert ;;
    planner) dropin=tls-key.conf cert_setting=tls_cert ;;
esac
if [ -f "$ETC/tls/$ROLE.key" ]; then
    install -d -m 0755 "$ROOT/etc/systemd/system/$unit.d"
    install -m 0644 "$HERE/systemd/$unit.d/$dropin" "$ROOT/etc/systemd/system/$unit.d/$dropin"
else
    rm -f "$ROOT/etc/systemd/system/$unit.d/$dropin"
    rmdir "$ROOT/etc/systemd/system/$unit.d" 2>/dev/null || true
fi
install -m 0644 "$REPO/README.md" "$ROOT/usr/local/share/doc/pve-reconcile/README.md"
for name in pve-executor pve-planner pve-healthcheck; do
    [ ! -e "$ROOT/opt/pve-reconcile/bin/$name" ] || ln -sfn "/opt/pve-reconcile/bin/$name" "$ROOT/usr/local/bin/$name"
done

# What systemd will read for the service (LoadCredential=): missing, the unit does not start.
missing=$(cat "$ROOT/etc/systemd/system/$unit" "$ROOT/etc/systemd/system/$unit.d/"*.conf 2>/dev/null \
    | sed -n 's/^LoadCredential=[^:]*://p' | while read -r source; do
    [ -f "$ROOT$source" ] || printf ' %s' "$source"
done)
# TLS needs the config's certificate and the key together (the service refuses one without the other).
if grep -Eq "^[[:space:]]*${cert_setting}[[:space:]]*=" "$ETC/$ROLE.toml"; then
    [ -f "$ETC/tls/$ROLE.key" ] || missing="$missing /etc/pve-reconcile/tls/$ROLE.key ($ROLE.toml names $cert_setting)"
elif [ -f "$ETC/tls/$ROLE.key" ]; then
    missing="$missing $cert_setting in /etc/pve-reconcile/$ROLE.toml (the key in tls/$ROLE.key goes with it)"
fi
if [ "$ROOT" = "" ] && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
fi
[ -z "$missing" ] || fail 1 "installed, but the service will not start without:$missing
  (the token: --token FILE or - for standard input; the TLS key: --tls-key FILE; TLS settings: $ROLE.toml)"
echo "install.sh: installed $unit; start it with: systemctl enable --now $unit"
