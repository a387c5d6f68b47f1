#!/bin/sh
# Install (or upgrade) meter-gateway on a Debian/Ubuntu edge box as a systemd service.
#
#   sudo sh deploy/install.sh                              # from a checkout: pip installs this source tree
#   sudo sh install.sh --wheel meter_gateway-0.1.0-py3-none-any.whl [--constraints constraints.txt]
#
# What it does, every step safe to repeat (an upgrade is the same command):
#   - system user and group `meter-gateway`, member of `dialout` (RS-485 adapters are group dialout)
#   - a virtualenv in /opt/meter-gateway (--prefix) with the package and its dependencies, and a
#     link /usr/local/bin/meter-gateway to its console script
#   - /etc/meter-gateway          root:meter-gateway 0750  config; the service reads, never writes
#     /etc/meter-gateway/gateway.toml   root:meter-gateway 0640  written from an example only if absent
#     /etc/meter-gateway/secrets  root:meter-gateway 0750  password files, each root:meter-gateway 0640
#   - /var/lib/meter-gateway      meter-gateway:meter-gateway 0750  outbox, commands, audit log
#   - /etc/systemd/system/meter-gateway.service with ExecStart pointing into the virtualenv; enabled,
#     not started: edit gateway.toml first, then `systemctl start meter-gateway`.
# An existing gateway.toml, secrets and state are never replaced; their owners and modes are set as
# above on every run, so a box set up by hand (e.g. /etc/meter-gateway left root-only) is repaired.
#
# Options:
#   --wheel FILE        install this wheel instead of the checkout around this script
#   --source DIR        install this source tree (default: the checkout this script is in)
#   --constraints FILE  pip constraints pinning every dependency to the versions the release was
#                       tested with (default: constraints.txt of the source tree, or beside this
#                       script); without one pip takes the newest versions pyproject allows
#   --prefix DIR        virtualenv location (default /opt/meter-gateway)
#   --python PY         interpreter for the virtualenv (default python3; needs >= 3.11)
#   --use-python PY     no virtualenv: PY already imports meter_gateway (one you manage yourself);
#                       PREFIX/bin/meter-gateway becomes a launcher running it
#   --example NAME      example written as gateway.toml when there is none: rs485 (default) or
#                       tcp-concentrator (see `meter-gateway example-config`)
#   --root DIR          install into DIR as if it were / (an image being built, or a test): DIR must
#                       hold etc/passwd and etc/group; systemctl is not run, the unit is enabled by
#                       its WantedBy= link. The virtualenv's scripts name DIR/PREFIX, so a --root
#                       install runs from the host; use --use-python for an image's own Python.
# pip reads its usual environment (PIP_INDEX_URL, PIP_FIND_LINKS, ...) for mirrors or offline use.
set -eu

USER_NAME=meter-gateway
PREFIX=/opt/meter-gateway
PYTHON=python3
USE_PYTHON=
WHEEL=
SOURCE=
CONSTRAINTS=
EXAMPLE=rs485
ROOT=

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

while [ $# -gt 0 ]; do
    case "$1" in
        --wheel) [ $# -ge 2 ] || die "--wheel needs a file"; WHEEL=$2; shift 2 ;;
        --constraints) [ $# -ge 2 ] || die "--constraints needs a file"; CONSTRAINTS=$2; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a directory"; SOURCE=$2; shift 2 ;;
        --prefix) [ $# -ge 2 ] || die "--prefix needs a directory"; PREFIX=$2; shift 2 ;;
        --python) [ $# -ge 2 ] || die "--python needs an interpreter"; PYTHON=$2; shift 2 ;;
        --use-python) [ $# -ge 2 ] || die "--use-python needs an interpreter"; USE_PYTHON=$2; shift 2 ;;
        --example) [ $# -ge 2 ] || die "--example needs a name"; EXAMPLE=$2; shift 2 ;;
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -eu/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option $1 (see --help)" ;;
    esac
done

[ "$(id -u)" = 0 ] || die "run as root (sudo sh $0 ...): it creates a system user and chowns files"
case "$PREFIX" in /*) ;; *) die "--prefix must be an absolute path, got $PREFIX" ;; esac
case "$EXAMPLE" in rs485|tcp-concentrator) ;; *) die "--example must be rs485 or tcp-concentrator" ;; esac
if [ -n "$ROOT" ]; then
    ROOT=$(cd "$ROOT" && pwd) || die "--root $ROOT is not a directory"
    [ -f "$ROOT/etc/passwd" ] && [ -f "$ROOT/etc/group" ] || die "--root $ROOT has no etc/passwd and etc/group"
fi
if [ -n "$WHEEL" ]; then
    [ -f "$WHEEL" ] || die "no such wheel: $WHEEL"
    WHEEL=$(cd "$(dirname "$WHEEL")" && pwd)/$(basename "$WHEEL")
elif [ -z "$USE_PYTHON" ]; then
    # default: the checkout this script lives in (deploy/ is one level below its root)
    [ -n "$SOURCE" ] || SOURCE=$(cd "$(dirname "$0")/.." && pwd)
    [ -f "$SOURCE/pyproject.toml" ] || die "$SOURCE is not a meter-gateway source tree; give --wheel FILE"
fi
if [ -z "$CONSTRAINTS" ]; then
    # the tested set: the source tree's, or one shipped beside this script with a wheel
    for c in "${SOURCE:+$SOURCE/constraints.txt}" "$(dirname "$0")/constraints.txt" "$(dirname "$0")/../constraints.txt"; do
        if [ -n "$c" ] && [ -f "$c" ]; then CONSTRAINTS=$c; break; fi
    done
fi
if [ -n "$CONSTRAINTS" ]; then
    [ -f "$CONSTRAINTS" ] || die "no such constraints file: $CONSTRAINTS"
    CONSTRAINTS=$(cd "$(dirname "$CONSTRAINTS")" && pwd)/$(basename "$CONSTRAINTS")
fi

ETC=$ROOT/etc/meter-gateway
STATE=$ROOT/var/lib/meter-gateway
UNIT_DIR=$ROOT/etc/systemd/system
VENV=$ROOT$PREFIX
MG=$VENV/bin/meter-gateway

# -- the service user -------------------------------------------------------------------------------
# useradd/usermod --root edit DIR's own passwd and group files, so an image gets its user too.
ROOT_OPT=
[ -z "$ROOT" ] || ROOT_OPT="--root $ROOT"
if ! grep -q "^dialout:" "$ROOT/etc/group"; then
    # shellcheck disable=SC2086
    groupadd $ROOT_OPT --system dialout
fi
if grep -q "^$USER_NAME:" "$ROOT/etc/passwd"; then
    # shellcheck disable=SC2086
    usermod $ROOT_OPT --append --groups dialout "$USER_NAME"
else
    # shellcheck disable=SC2086
    useradd $ROOT_OPT --system --user-group --groups dialout --home-dir /var/lib/meter-gateway \
        --no-create-home --shell /usr/sbin/nologin --comment "meter-gateway daemon" "$USER_NAME" 2>&1 |
        grep -v "missing or non-executable shell" >&2 || true
    grep -q "^$USER_NAME:" "$ROOT/etc/passwd" || die "could not create the user $USER_NAME"
    say "created system user $USER_NAME (groups: $USER_NAME, dialout)"
fi
# chown by number, looked up in the target's files: the host's names may differ from an image's
UID_MG=$(awk -F: -v u="$USER_NAME" '$1 == u { print $3 }' "$ROOT/etc/passwd")
GID_MG=$(awk -F: -v g="$USER_NAME" '$1 == g { print $3 }' "$ROOT/etc/group")
[ -n "$UID_MG" ] && [ -n "$GID_MG" ] || die "user or group $USER_NAME missing from $ROOT/etc"

# -- the software -----------------------------------------------------------------------------------
if [ -n "$USE_PYTHON" ]; then
    "$USE_PYTHON" -c 'import meter_gateway.gateway.cli.main' 2>/dev/null ||
        die "$USE_PYTHON cannot import meter_gateway; install it there first"
    mkdir -p "$VENV/bin"
    # a launcher where the unit's ExecStart expects the console script
    printf '#!/bin/sh\nexec "%s" -m meter_gateway.gateway.cli.main "$@"\n' "$USE_PYTHON" >"$MG"
    chmod 0755 "$MG"
else
    "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null ||
        die "$PYTHON is missing or older than 3.11 (give --python)"
    if ! "$VENV/bin/python" -c '' 2>/dev/null; then
        # absent, or its base interpreter went away in an OS upgrade: (re)create it; config and
        # state live elsewhere and are not touched
        "$PYTHON" -m venv --clear "$VENV" ||
            die "cannot create a virtualenv with $PYTHON (on Debian: apt-get install python3-venv)"
    fi
    say "installing ${WHEEL:-$SOURCE} into $VENV${CONSTRAINTS:+ (pinned by $CONSTRAINTS)}"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
        ${CONSTRAINTS:+-c "$CONSTRAINTS"} "${WHEEL:-$SOURCE}" ||
        die "pip install failed (network? PIP_INDEX_URL/PIP_FIND_LINKS point pip at a mirror)"
fi
"$MG" --version >/dev/null || die "$MG does not run"
mkdir -p "$ROOT/usr/local/bin"
ln -sfn "$PREFIX/bin/meter-gateway" "$ROOT/usr/local/bin/meter-gateway"

# -- config, secrets, state -------------------------------------------------------------------------
install -d -m 0750 -o 0 -g "$GID_MG" "$ETC" "$ETC/secrets"
chown 0:"$GID_MG" "$ETC" "$ETC/secrets"  # install -d leaves an existing directory's owner alone
chmod 0750 "$ETC" "$ETC/secrets"
if [ -e "$ETC/gateway.toml" ]; then
    say "keeping $ETC/gateway.toml"
else
    tmp=$ETC/.gateway.toml.new
    "$MG" example-config "$EXAMPLE" >"$tmp"
    mv "$tmp" "$ETC/gateway.toml"
    say "wrote $ETC/gateway.toml from the $EXAMPLE example: edit it before starting the service"
fi
# the service user must read config and secrets, and nobody else
for f in "$ETC/gateway.toml" "$ETC/environment" "$ETC"/secrets/*; do
    [ -f "$f" ] || continue
    chown 0:"$GID_MG" "$f"
    chmod 0640 "$f"
done
install -d -m 0750 -o "$UID_MG" -g "$GID_MG" "$STATE"
chown "$UID_MG:$GID_MG" "$STATE"
chmod 0750 "$STATE"

# -- the unit ---------------------------------------------------------------------------------------
# The shipped unit is the template: only ExecStart changes, to the console script installed above.
mkdir -p "$UNIT_DIR/multi-user.target.wants"
"$MG" example-config systemd |
    sed "s|^ExecStart=.*|ExecStart=$PREFIX/bin/meter-gateway run -c /etc/meter-gateway/gateway.toml|" \
        >"$UNIT_DIR/.meter-gateway.service.new"
chmod 0644 "$UNIT_DIR/.meter-gateway.service.new"
mv "$UNIT_DIR/.meter-gateway.service.new" "$UNIT_DIR/meter-gateway.service"

if [ -z "$ROOT" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl daemon-reload
    systemctl enable meter-gateway.service
    running=$(systemctl is-active meter-gateway.service || true)
    [ "$running" != active ] || say "the service is running the old version: systemctl restart meter-gateway"
else
    # what `systemctl enable` does for WantedBy=multi-user.target, for a root without a running systemd
    ln -sfn /etc/systemd/system/meter-gateway.service "$UNIT_DIR/multi-user.target.wants/meter-gateway.service"
fi

say "installed $("$MG" --version) in $PREFIX; service enabled, not started. Next:"
say "  edit /etc/meter-gateway/gateway.toml (secrets: /etc/meter-gateway/secrets, root:$USER_NAME 0640)"
say "  meter-gateway check-config /etc/meter-gateway/gateway.toml && systemctl start meter-gateway"
