#!/bin/bash
# Install edge-agent on a station (or into a staging root): the edge-agent user, /etc/edge-agent/
# (config from deploy/config.example.toml, never overwritten; models/), /var/lib/edge-agent/,
# a venv with the package at <prefix>/venv, and the systemd unit. Safe to run again: it updates
# the venv and the unit and keeps the config, the models, the password and the outbox.
# See docs/OPERATIONS.md.
set -euo pipefail

usage() {
    cat <<EOF
usage: deploy/install.sh [--prefix DIR] [--destdir DIR] [--python PYTHON] [--venv-from VENV]
                         [--no-venv] [--uninstall [--purge]]

  --prefix DIR      where the venv and docs go (default /opt/edge-agent)
  --destdir DIR     staging root prepended to every path (default \$DESTDIR, empty = this system);
                    a staged venv's scripts point into the staging root, so stage for tests,
                    install for real with no DESTDIR
  --python PYTHON   interpreter for the venv (default python3; 3.11 or newer)
  --venv-from VENV  reuse VENV's packages (torch...) instead of downloading them: the new venv
                    sees VENV's site-packages and gets only edge-agent itself (tests, offline)
  --no-venv         leave the venv alone (config, dirs and unit only)
  --uninstall       stop and remove the unit and <prefix>; keeps /etc/edge-agent, the state
                    in /var/lib/edge-agent and the user
  --purge           with --uninstall: remove /etc/edge-agent and /var/lib/edge-agent as well
Extra pip options (a CUDA torch index, a wheelhouse) come from PIP_* variables, e.g.
  PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cu128 deploy/install.sh
EOF
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=/opt/edge-agent
DESTDIR=${DESTDIR:-}
PYTHON=python3
VENV_FROM=
NO_VENV=0
UNINSTALL=0
PURGE=0
TORCH_PIN="torch==2.13.0"   # keep in step with pyproject.toml
SERVICE_USER=edge-agent
ETC=/etc/edge-agent
STATE=/var/lib/edge-agent
UNIT_DIR=/etc/systemd/system

while [ $# -gt 0 ]; do
    case "$1" in
        --prefix) PREFIX=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) PREFIX=${1#*=}; shift ;;
        --destdir) DESTDIR=${2:?--destdir needs a directory}; shift 2 ;;
        --destdir=*) DESTDIR=${1#*=}; shift ;;
        --python) PYTHON=${2:?--python needs an interpreter}; shift 2 ;;
        --python=*) PYTHON=${1#*=}; shift ;;
        --venv-from) VENV_FROM=${2:?--venv-from needs a venv directory}; shift 2 ;;
        --venv-from=*) VENV_FROM=${1#*=}; shift ;;
        --no-venv) NO_VENV=1; shift ;;
        --uninstall) UNINSTALL=1; shift ;;
        --purge) PURGE=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "install.sh: unknown option $1; see --help" >&2; exit 2 ;;
    esac
done

case "$PREFIX" in
    /*) ;;
    *) echo "install.sh: --prefix $PREFIX is not absolute; give e.g. /opt/edge-agent" >&2; exit 2 ;;
esac
if [ -n "$DESTDIR" ]; then
    mkdir -p "$DESTDIR"
    DESTDIR=$(cd "$DESTDIR" && pwd)
fi

# The system is changed (user, ownership, systemctl) only by root installing for real.
LIVE=0
if [ -z "$DESTDIR" ] && [ "$(id -u)" = 0 ]; then
    LIVE=1
fi
say() { echo "install.sh: $*"; }

uninstall() {
    if [ "$LIVE" = 1 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
        systemctl disable --now edge-agent.service || true
    fi
    rm -f "$DESTDIR$UNIT_DIR/edge-agent.service"
    rm -rf "$DESTDIR$PREFIX"
    say "removed $DESTDIR$UNIT_DIR/edge-agent.service and $DESTDIR$PREFIX"
    if [ "$PURGE" = 1 ]; then
        rm -rf "$DESTDIR$ETC" "$DESTDIR$STATE" "$DESTDIR/var/cache/edge-agent"
        say "purged $DESTDIR$ETC and $DESTDIR$STATE"
    else
        say "kept $DESTDIR$ETC (config, models, password) and $DESTDIR$STATE (outbox); --purge removes them"
    fi
    if [ "$LIVE" = 1 ]; then
        command -v systemctl >/dev/null && [ -d /run/systemd/system ] && systemctl daemon-reload
        say "kept the user $SERVICE_USER; remove it with: userdel $SERVICE_USER"
    fi
}

create_user() {
    if [ "$LIVE" = 0 ]; then
        say "not creating the user $SERVICE_USER (staging into DESTDIR or not root)"
        return
    fi
    if ! getent passwd "$SERVICE_USER" >/dev/null; then
        useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "edge-agent inspection daemon" "$SERVICE_USER"
        say "created the system user $SERVICE_USER"
    fi
    # The unit names both groups; systemd refuses to start a service whose group does not exist
    # (a CPU-only station may have no `render`), so create it, empty.
    for group in video render; do
        if ! getent group "$group" >/dev/null; then
            groupadd --system "$group"
            say "created the missing system group $group"
        fi
        usermod --append --groups "$group" "$SERVICE_USER"
    done
}

# mkdir + ownership/mode: owner edge-agent when live, left as the caller otherwise.
make_dir() {
    local dir=$1 mode=$2 owner=$3
    mkdir -p "$DESTDIR$dir"
    chmod "$mode" "$DESTDIR$dir"
    if [ "$LIVE" = 1 ]; then
        chown "$owner" "$DESTDIR$dir"
    fi
}

install_config() {
    make_dir "$ETC" 0750 "root:$SERVICE_USER"
    make_dir "$ETC/models" 0750 "root:$SERVICE_USER"
    local config="$DESTDIR$ETC/station.toml"
    if [ -e "$config" ]; then
        say "kept the existing $config"
    else
        install -m 0640 "$REPO/deploy/config.example.toml" "$config"
        [ "$LIVE" = 1 ] && chown "root:$SERVICE_USER" "$config"
        say "wrote $config from deploy/config.example.toml; edit it for this station"
    fi
    # LoadCredential= needs the file to exist; empty until the plant broker's password goes in.
    local password="$DESTDIR$ETC/mqtt-password"
    if [ ! -e "$password" ]; then
        install -m 0600 /dev/null "$password"
        say "created an empty $password (root only); put the station's broker password in it"
    fi
}

install_state() {
    make_dir "$STATE" 0750 "$SERVICE_USER:$SERVICE_USER"
    make_dir "$STATE/outbox" 0750 "$SERVICE_USER:$SERVICE_USER"
    make_dir "$STATE/retention" 0750 "$SERVICE_USER:$SERVICE_USER"
}

install_venv() {
    local venv="$DESTDIR$PREFIX/venv" wheels
    wheels=$(mktemp -d)
    trap 'rm -rf "$wheels"' RETURN
    if [ -n "$VENV_FROM" ]; then
        local base_python="$VENV_FROM/bin/python" base_site
        [ -x "$base_python" ] || { echo "install.sh: --venv-from $VENV_FROM has no bin/python" >&2; exit 2; }
        base_site=$("$base_python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        "$base_python" -m venv --without-pip "$venv"
        local site
        site=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
        # A path line, not the base's .pth files: its own editable install of edge_agent stays out.
        echo "$base_site" >"$site/edge-agent-base.pth"
        "$base_python" -m pip wheel --quiet --no-deps --no-build-isolation -w "$wheels" "$REPO"
        "$base_python" -m pip --python "$venv/bin/python" install --quiet --no-deps --force-reinstall \
            "$wheels"/edge_agent-*.whl
        say "venv $venv reuses the packages of $VENV_FROM"
    else
        "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
            || { echo "install.sh: $PYTHON is older than 3.11; give --python python3.11" >&2; exit 2; }
        "$PYTHON" -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip setuptools
        "$venv/bin/python" -m pip wheel --quiet --no-deps -w "$wheels" "$REPO"
        "$venv/bin/python" -m pip install --quiet "$TORCH_PIN" "$wheels"/edge_agent-*.whl
        # Same version number, new code: replace the package itself every time.
        "$venv/bin/python" -m pip install --quiet --no-deps --force-reinstall "$wheels"/edge_agent-*.whl
        say "venv $venv has edge-agent and $TORCH_PIN"
    fi
    "$venv/bin/edge-agent" --help >/dev/null
}

install_unit() {
    mkdir -p "$DESTDIR$UNIT_DIR" "$DESTDIR$PREFIX/share/doc"
    sed -e "s|/opt/edge-agent|$PREFIX|g" "$REPO/systemd/edge-agent.service" >"$DESTDIR$UNIT_DIR/edge-agent.service.tmp"
    chmod 0644 "$DESTDIR$UNIT_DIR/edge-agent.service.tmp"
    mv "$DESTDIR$UNIT_DIR/edge-agent.service.tmp" "$DESTDIR$UNIT_DIR/edge-agent.service"
    install -m 0644 "$REPO/docs/OPERATIONS.md" "$REPO/deploy/config.example.toml" "$DESTDIR$PREFIX/share/doc/"
    say "installed $DESTDIR$UNIT_DIR/edge-agent.service"
}

if [ "$UNINSTALL" = 1 ]; then
    uninstall
    exit 0
fi

create_user
install_config
install_state
if [ "$NO_VENV" = 0 ]; then
    install_venv
fi
install_unit

cat <<EOF

Next steps:
  1. edit $ETC/station.toml (station.id, source, mqtt host/username); put the model in $ETC/models/
     and the broker password in $ETC/mqtt-password
  2. $PREFIX/venv/bin/edge-agent check-config $ETC/station.toml
  3. systemctl daemon-reload
  4. systemctl enable --now edge-agent
  5. journalctl -u edge-agent -f        (systemctl status edge-agent; metrics on :9108/metrics)
EOF
if [ -n "$DESTDIR" ]; then
    echo "(staged into $DESTDIR: copy it onto the station root first)"
fi
