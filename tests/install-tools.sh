#!/bin/sh
# Installs, with apt-get, the Debian package of each tool the tests use that
# is missing here, and nothing else. A working node/npm (NodeSource's nodejs
# bundles npm, and Debian's npm package conflicts with it) is never touched;
# on a bare Debian 12 this installs Debian's nodejs 18 and npm. apt's own
# messages stay visible so a failure explains itself.
set -eu

missing=""
need() {  # need TOOL PACKAGE
    command -v "$1" >/dev/null 2>&1 || missing="$missing $2"
}
need chromium chromium
need node nodejs
if ! command -v npm >/dev/null 2>&1; then
    # NodeSource's nodejs bundles npm and conflicts with Debian's npm package.
    if dpkg-query -W -f='${Version}' nodejs 2>/dev/null | grep -q nodesource; then
        echo "NodeSource's nodejs is installed but npm is missing: reinstall nodejs (it bundles npm)" >&2
        exit 1
    fi
    missing="$missing npm"
fi
need nginx nginx
need radosgw radosgw
need ceph-mon ceph-mon
need ceph-osd ceph-osd
need haproxy haproxy
need redis-server redis-server
need wget wget
need curl curl
need rsync rsync  # bench/sync.py's baseline (rsync --daemon)

[ -z "$missing" ] && exit 0
echo "installing Debian packages:$missing" >&2
if [ "$(id -u)" != 0 ]; then
    echo "not root: run as root, or install these packages yourself:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086  # one word per package
apt-get install -y -qq --no-install-recommends $missing
