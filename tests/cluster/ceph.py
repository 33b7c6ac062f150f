"""A real single-node Ceph RADOS Gateway (S3 API) on 127.0.0.1, for tests.

What it starts: one ``ceph-mon``, one ``ceph-osd`` (memstore, so the data lives
in the OSD's memory) and one ``radosgw`` (beast frontend), all Debian's Ceph
16.2 (Pacific), all in the foreground as child processes of the test run, all
bound to 127.0.0.1 only, with no cephx auth and no mgr.  Everything the cluster
writes (config, monmap, mon/osd/rgw data, run dir, admin sockets, logs) is in a
private directory made under ``workdir``; every command gets ``-c CONF`` and
``CEPH_CONF=CONF``, so nothing reads or writes ``/etc/ceph``.  The fsid and
ports are new each time, so several clusters can run side by side.

It takes about 25 s to install the packages (once per machine, see
``ensure_ceph_installed``), about 2 s to start, about 125 MB of memory idle
(plus what is stored: memstore keeps objects in the OSD's memory) and about
0.4 s to stop.  ``stop()`` ends every daemon by its PID (SIGTERM, then SIGKILL
after a bounded wait) and removes the directory.  The daemons are also
started with PR_SET_PDEATHSIG=SIGKILL, so they die with the process that
started them even if it is killed outright (start them from the main thread:
the signal follows the *thread* that forked them).

S3 requests are signed with botocore's ``S3SigV4Auth`` and sent with
``urllib.request`` (botocore is a test dependency; boto3 is not needed).  RGW
takes path-style addressing (``http://127.0.0.1:PORT/bucket/key``) and checks
SigV4 signatures with whatever region the client signed for: ``us-east-1``
(``region`` below) works, and so do ``default`` and any other name.  Other
RGW 16.2 behaviour a client may meet (tests/test_ceph_harness.py checks it):

- a bucket's LocationConstraint is the zonegroup's name, ``default``, or none;
  ``us-east-1`` is refused (400 InvalidLocationConstraint);
- ``x-amz-content-sha256: UNSIGNED-PAYLOAD`` works for PUT and UploadPart, so a
  body can be streamed from a file without hashing it first;
- multipart: any part but the last must be at least 5 MiB, which is checked at
  CompleteMultipartUpload (400 EntityTooSmall), not at UploadPart; the object's
  ETag is ``"MD5(part MD5s)-N"``, but the CompleteMultipartUpload answer has an
  empty ``<ETag>`` (HEAD and listings have it);
- ranged GET: 206 with Content-Range for ``bytes=a-b``, ``a-`` and ``-n``; 416
  past the end.

Wiring it as a session fixture, in ``tests/conftest.py``::

    from cluster.ceph import ceph_rgw_session

    @pytest.fixture(scope="session")
    def ceph_rgw(tmp_path_factory):
        yield from ceph_rgw_session(tmp_path_factory.mktemp("ceph"))

A test that asks for ``ceph_rgw`` gets a started ``CephRGW`` (``endpoint``,
``access_key``, ``secret_key``, ``region``, ``request()``, ``create_bucket()``),
or is skipped with the reason when Ceph cannot be installed (no root, no
apt-get, no network) or botocore is missing.  ``WSFILES_REQUIRE_CEPH=1`` makes
that a failure instead of a skip; ``WSFILES_KEEP_CEPH_DIR=1`` keeps the cluster
directory (logs in ``log/``) when a start fails.  Give the tests that use it a
``pytest.mark.timeout`` large enough for the install and start: the session
fixture's setup counts toward the first of them (pytest.ini's 120 s is enough
for the start alone, and usually for an install, but a slow mirror could
exceed it).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cluster import free_port

APT_PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")
TOOLS = ("ceph", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "monmaptool")
INSTALL_TIMEOUT = 420.0
COMMAND_TIMEOUT = 30.0
MON_TIMEOUT = 30.0
OSD_TIMEOUT = 60.0
RGW_TIMEOUT = 90.0
STOP_TIMEOUT = 10.0
FSID_RACE_TRIES = 5
# Daemons and radosgw-admin: take all config from the file, fetch none from the
# mon.  Fetching it is where the "wrong fsid" race starts (see CephRGW.ceph).  A
# command-line flag only: "no mon config" in ceph.conf is not an option.  The
# ceph CLI (librados from Python) fetches the config whatever the flag says.
NO_MON_CONFIG = "--no-mon-config"
SIGV4_REGION = "us-east-1"


class CephUnavailable(RuntimeError):
    """Ceph is not installed and cannot be (no root, no apt-get, no network...)."""


class CephError(RuntimeError):
    """The cluster did not start, or a command against it failed."""


# -- installing ------------------------------------------------------------------


def _missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _apt(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "-o", "DPkg::Lock::Timeout=120", *args]
    try:
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CephUnavailable(f"{' '.join(argv)} took more than {timeout:.0f} s") from exc


def _has_candidate(package: str) -> bool:
    """True when apt's package lists know ``package`` (so no update is needed)."""
    result = subprocess.run(
        ["apt-cache", "policy", package], capture_output=True, text=True, check=False
    )
    return "Candidate:" in result.stdout and "Candidate: (none)" not in result.stdout


def ensure_ceph_installed(timeout: float = INSTALL_TIMEOUT) -> None:
    """Install Debian's radosgw, ceph-mon and ceph-osd if they are missing.

    Runs ``apt-get update`` first when the package lists do not know them, and
    once more if the install fails on stale lists.  Returns None; raises
    ``CephUnavailable`` with apt's last lines when Ceph cannot be installed.
    """
    if not _missing_tools():
        return
    if shutil.which("apt-get") is None:
        raise CephUnavailable(f"Ceph is not installed ({_missing_tools()}) and there is no apt-get")
    if os.geteuid() != 0:
        raise CephUnavailable("Ceph is not installed and installing it needs root")
    deadline = time.monotonic() + timeout
    install = ("install", "-y", "-q", "--no-install-recommends", *APT_PACKAGES)
    updated = False
    if not all(_has_candidate(package) for package in APT_PACKAGES):
        _apt("update", "-q", timeout=deadline - time.monotonic())
        updated = True
    result = _apt(*install, timeout=deadline - time.monotonic())
    if result.returncode != 0 and not updated:
        _apt("update", "-q", timeout=deadline - time.monotonic())
        result = _apt(*install, timeout=deadline - time.monotonic())
    if result.returncode != 0 or _missing_tools():
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise CephUnavailable(
            f"apt-get could not install {' '.join(APT_PACKAGES)} "
            f"(exit {result.returncode}; missing {_missing_tools()}):\n{tail}"
        )


# -- helpers ---------------------------------------------------------------------


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGKILL when the thread that forked it ends."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


class _UnsignedPayloadAuth:
    """Built lazily: an ``S3SigV4Auth`` that sends ``UNSIGNED-PAYLOAD``."""

    cls: Any = None

    @classmethod
    def get(cls) -> Any:
        if cls.cls is None:
            from botocore.auth import S3SigV4Auth

            class UnsignedPayloadS3SigV4Auth(S3SigV4Auth):
                def _should_sha256_sign_payload(self, request: Any) -> bool:
                    return False

            cls.cls = UnsignedPayloadS3SigV4Auth
        return cls.cls


# -- the cluster -----------------------------------------------------------------


CONF_TEMPLATE = """\
[global]
fsid = {fsid}
mon host = v1:127.0.0.1:{mon_port}
mon initial members = a
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr2 = false
ms bind ipv6 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
keyring = /dev/null
run dir = {dir}/run
admin socket = {admin_socket}
pid file =
log file = {dir}/log/$name.log
log to stderr = false
err to stderr = true
mon cluster log file = {dir}/log/cluster.log
crash dir = {dir}/crash
mon data = {dir}/mon/$cluster-$id
osd data = {dir}/osd/$cluster-$id
osd objectstore = memstore
memstore device bytes = 1073741824
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
osd op num shards = 1
osd op num threads per shard = 2
# The OSD would put itself in the CRUSH map with mon commands as it starts; with
# no auth those can go out before it has the mon's monmap, with a zero fsid, and
# fail with "wrong fsid" (EPERM), which ends the OSD (1 start in ~10 here).  The
# harness adds it to the CRUSH map itself (see CephRGW.ceph for the race).
osd crush update on start = false
osd class update on start = false
mon allow pool delete = true
mon warn on pool no redundancy = false
mon warn on insecure global id reclaim allowed = false
mon data avail warn = 1
mon data avail crit = 0
# Propose map changes at once instead of batching them for 1 s: each pool RGW
# creates is a map change, so this takes RGW's first start from ~9 s to ~1 s.
paxos propose interval = 0.01
paxos min wait = 0.01

[client]
admin socket =

[client.rgw.a]
admin socket = {rgw_admin_socket}
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw data = {dir}/rgw
rgw thread pool size = 32
rgw enable usage log = false
rgw dynamic resharding = false
"""


class CephRGW:
    """A single-node Ceph cluster with an S3 gateway on 127.0.0.1.

    ``CephRGW().start(workdir)`` returns the started gateway; ``stop()`` (or
    leaving ``with CephRGW().start(workdir) as rgw:``) ends it.
    """

    def __init__(self) -> None:
        self.dir: Path | None = None
        self.conf: Path | None = None
        self.fsid = str(uuid.uuid4())
        self.endpoint = ""
        self.region = SIGV4_REGION
        self.access_key = "TEST" + secrets.token_hex(8).upper()
        self.secret_key = secrets.token_urlsafe(30)
        self.user = "test"
        self.processes: dict[str, subprocess.Popen] = {}
        self.timings: dict[str, float] = {}
        self.fsid_race_retries = 0
        self.killed: list[str] = []  # daemons that needed SIGKILL
        self._env: dict[str, str] = {}

    # -- lifecycle --

    def start(self, workdir: str | os.PathLike) -> CephRGW:
        """Make, start and wait for the cluster in a new directory under ``workdir``."""
        began = time.monotonic()
        self.dir = Path(tempfile.mkdtemp(prefix="ceph-", dir=workdir))
        try:
            self._write_config()
            self._start_mon()
            self.timings["mon"] = time.monotonic() - began
            self._start_osd()
            self.timings["osd"] = time.monotonic() - began
            self._start_rgw()
            self.timings["rgw"] = time.monotonic() - began
            self._create_user()
            self.timings["start"] = time.monotonic() - began
        except BaseException:
            self.stop(keep_dir=os.environ.get("WSFILES_KEEP_CEPH_DIR") == "1")
            raise
        return self

    def stop(self, keep_dir: bool = False) -> None:
        """SIGTERM every daemon by PID; SIGKILL those still running after a bounded
        wait; then remove the cluster directory.  Safe to call more than once."""
        began = time.monotonic()
        # One at a time, clients first: the gateway, then the OSD (which tells the
        # mon it is going down, and waits up to 5 s for a mon that is already
        # gone), then the mon.  About 0.5 s in all.
        for name in ("rgw", "osd", "mon"):
            proc = self.processes.get(name)
            if proc is None:
                continue
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.killed.append(name)
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        self.processes.clear()
        if self.dir is not None and not keep_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.timings["stop"] = time.monotonic() - began

    def __enter__(self) -> CephRGW:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rss(self) -> dict[str, int]:
        """Resident memory of each running daemon, in bytes."""
        return {name: _rss_bytes(proc.pid) for name, proc in self.processes.items()}

    # -- steps --

    def _write_config(self) -> None:
        assert self.dir is not None
        for sub in ("run", "log", "mon", "osd/ceph-0", "rgw"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.mon_port = free_port()
        self.rgw_port = free_port()
        while self.rgw_port == self.mon_port:
            self.rgw_port = free_port()
        # A UNIX socket path has to fit in 108 bytes: without one if it would not.
        run = self.dir / "run"
        fits = len(str(run / "client.rgw.a.asok")) < 100
        self.conf = self.dir / "ceph.conf"
        self.conf.write_text(
            CONF_TEMPLATE.format(
                fsid=self.fsid,
                mon_port=self.mon_port,
                rgw_port=self.rgw_port,
                dir=self.dir,
                admin_socket=f"{run}/$name.asok" if fits else "",
                rgw_admin_socket=f"{run}/$name.asok" if fits else "",
            )
        )
        self._env = {**os.environ, "CEPH_CONF": str(self.conf)}
        self._env.pop("CEPH_ARGS", None)
        self.endpoint = f"http://127.0.0.1:{self.rgw_port}"

    def _run(self, *argv: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run a Ceph tool against this cluster; its stdout, or CephError."""
        full = [argv[0], "-c", str(self.conf), *argv[1:]]
        try:
            result = subprocess.run(
                full,
                env=self._env,
                cwd=self.dir,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{' '.join(full)} took more than {timeout:.0f} s") from exc
        if result.returncode != 0:
            raise CephError(
                f"{' '.join(full)} exited {result.returncode}:\n{result.stdout}{result.stderr}"
            )
        return result.stdout

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """``ceph ARGS`` against this cluster (bounded: the CLI's own connect timeout
        and a process timeout).

        Retried (at most ``FSID_RACE_TRIES`` times) only when the CLI's very first
        mon request, ``get_command_descriptions``, was refused: then ARGS never
        reached the mon.  That refusal is a race in Ceph 16's client with no auth:
        it fetches the config from the mon, rebuilds its monmap without the fsid,
        and a request sent before the mon's monmap arrives has a zero fsid and gets
        "wrong fsid" (EPERM).  It hit 1 to 2 ``ceph`` runs in 100 here.
        """
        for attempt in range(FSID_RACE_TRIES):
            try:
                return self._run("ceph", "--connect-timeout", "5", *args, timeout=timeout)
            except CephError as exc:
                if "problem getting command descriptions" not in str(exc):
                    raise
                if attempt == FSID_RACE_TRIES - 1:
                    raise
                self.fsid_race_retries += 1
        raise AssertionError("unreachable")

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen:
        assert self.dir is not None
        with open(self.dir / "log" / f"{name}.out", "wb") as out:
            proc = subprocess.Popen(
                [argv[0], "-c", str(self.conf), *argv[1:]],
                env=self._env,
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.processes[name] = proc
        return proc

    def _wait_for(self, what: str, check: Any, timeout: float, daemon: str) -> None:
        """Poll ``check()`` (an external daemon's readiness) until it is true, the
        daemon exits, or ``timeout`` seconds pass."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        last_error: Exception | None = None
        while True:
            proc = self.processes[daemon]
            if proc.poll() is not None:
                raise CephError(f"{daemon} exited {proc.returncode} before {what}\n{self._logs()}")
            try:
                if check():
                    return
            except (CephError, OSError, ValueError) as exc:
                last_error = exc
            if time.monotonic() > deadline:
                raise CephError(
                    f"no {what} after {timeout:.0f} s (last error: {last_error})\n{self._logs()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def _logs(self) -> str:
        assert self.dir is not None
        parts = []
        for path in sorted((self.dir / "log").iterdir()):
            if path.name == "cluster.log":
                continue
            tail = _tail(path, 12)
            if tail:
                parts.append(f"--- {path.name}\n{tail}")
        return "\n".join(parts)

    def _port_open(self, port: int) -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(1)
            return sock.connect_ex(("127.0.0.1", port)) == 0

    def _start_mon(self) -> None:
        assert self.dir is not None
        monmap = self.dir / "monmap"
        # --addv with a v1-only address: plain --add would register a v2 address too,
        # which nothing listens on (ms bind msgr2 = false), and clients would hang on it.
        self._run(
            "monmaptool", "--create", "--clobber", "--fsid", self.fsid,
            "--addv", "a", f"[v1:127.0.0.1:{self.mon_port}]", str(monmap),
        )  # fmt: skip
        self._run(
            "ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "--keyring", "/dev/null"
        )
        self._spawn("mon", "ceph-mon", "-f", "-i", "a")

        def quorum() -> bool:
            if not self._port_open(self.mon_port):
                return False
            status = json.loads(self.ceph("quorum_status", "--format", "json", timeout=10))
            return "a" in status.get("quorum_names", [])

        self._wait_for("monitor quorum", quorum, MON_TIMEOUT, "mon")

    def _start_osd(self) -> None:
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "create", osd_uuid).strip()
        if osd_id != "0":
            raise CephError(f"expected osd id 0, got {osd_id!r}")
        self.ceph("osd", "crush", "add", "osd.0", "1.0", "host=localhost", "root=default")
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", osd_uuid)
        self._spawn("osd", "ceph-osd", "-f", "-i", "0", NO_MON_CONFIG)

        def osd_up() -> bool:
            return json.loads(self.ceph("osd", "stat", "--format", "json"))["num_up_osds"] == 1

        self._wait_for("OSD up", osd_up, OSD_TIMEOUT, "osd")

    def _start_rgw(self) -> None:
        # RGW creates its pools (.rgw.root, default.rgw.*) itself as it starts.
        self._spawn("rgw", "radosgw", "-f", "-n", "client.rgw.a", NO_MON_CONFIG)

        def answering() -> bool:
            try:
                with urllib.request.urlopen(self.endpoint + "/", timeout=5) as response:
                    return response.status == 200
            except urllib.error.HTTPError as exc:
                return exc.code < 500
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                return False

        self._wait_for("S3 gateway answering", answering, RGW_TIMEOUT, "rgw")

    def _create_user(self) -> None:
        self._run(
            "radosgw-admin", "-n", "client.admin", NO_MON_CONFIG, "user", "create",
            f"--uid={self.user}", f"--display-name={self.user}",
            f"--access-key={self.access_key}", f"--secret-key={self.secret_key}",
        )  # fmt: skip

    # -- S3 --

    def url(self, bucket: str = "", key: str = "", query: dict[str, str] | None = None) -> str:
        """Path-style URL: ``ENDPOINT/bucket/key?query`` (key is percent-encoded)."""
        path = "/"
        if bucket:
            path += bucket
            if key:
                path += "/" + urllib.parse.quote(key, safe="/~")
        if query:
            pairs = sorted(query.items())
            path += "?" + urllib.parse.urlencode(pairs, quote_via=urllib.parse.quote)
        return self.endpoint + path

    def request(
        self,
        method: str,
        bucket: str = "",
        key: str = "",
        *,
        query: dict[str, str] | None = None,
        body: Any = b"",
        headers: dict[str, str] | None = None,
        unsigned_payload: bool = False,
        region: str | None = None,
        timeout: float = 30.0,
    ) -> Response:
        """One S3 request, signed with botocore's S3SigV4Auth, sent with urllib.

        ``body`` is bytes, or a binary file with ``Content-Length`` in ``headers``
        and ``unsigned_payload=True`` (``x-amz-content-sha256: UNSIGNED-PAYLOAD``),
        which streams it without hashing it first.  HTTP errors are returned as
        responses, not raised.
        """
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        url = self.url(bucket, key, query)
        all_headers = dict(headers or {})
        request = AWSRequest(method=method, url=url, data=body, headers=all_headers)
        auth_class = _UnsignedPayloadAuth.get() if unsigned_payload else S3SigV4Auth
        credentials = Credentials(self.access_key, self.secret_key)
        auth = auth_class(credentials, "s3", region or self.region)
        auth.add_auth(request)
        data = body if body not in (b"", None) else None
        if data is None and method in ("PUT", "POST"):
            data = b""
        sent = urllib.request.Request(
            url, data=data, method=method, headers=dict(request.headers.items())
        )
        try:
            with urllib.request.urlopen(sent, timeout=timeout) as response:
                return Response(response.status, dict(response.headers.items()), response.read())
        except urllib.error.HTTPError as exc:
            with exc:
                return Response(exc.code, dict(exc.headers.items()), exc.read())

    def create_bucket(self, name: str) -> None:
        """PUT /name (path-style); CephError unless RGW answers 200."""
        response = self.request("PUT", name)
        if response.status != 200:
            raise CephError(f"create bucket {name}: {response.status} {response.body!r}")


def ceph_rgw_session(workdir: str | os.PathLike | None = None) -> Iterator[CephRGW]:
    """A fixture body: install if needed (or skip), start, yield, stop.

    Skips the test (``pytest.skip``) when Ceph cannot be installed or botocore
    is missing, unless ``WSFILES_REQUIRE_CEPH=1``; a cluster that is installed
    but fails to start is an error, never a skip.
    """
    import pytest

    required = os.environ.get("WSFILES_REQUIRE_CEPH") == "1"
    try:
        import botocore  # noqa: F401
    except ImportError:
        if required:
            raise
        pytest.skip("botocore (a test dependency, for SigV4 signing) is not installed")
    try:
        ensure_ceph_installed()
    except CephUnavailable as exc:
        if required:
            raise
        pytest.skip(f"Ceph RGW is not available: {exc}")
    rgw = CephRGW()
    with rgw.start(workdir or tempfile.gettempdir()):
        yield rgw
