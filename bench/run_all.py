"""Every performance benchmark of issue 8 in one go, and one table of the results.

Run from the repository root (wsfiles must be installed)::

    python bench/run_all.py                       # everything, default sizes (about 4 min here)
    python bench/run_all.py --only throughput connections
    python bench/run_all.py --markdown results.md # also write the table as Markdown

It runs each benchmark below as a subprocess, one after the other (they would
skew each other's figures if run together), with its output shown as it comes
and kept in ``--logs`` (a temporary folder unless given).  Each benchmark
prints its targets as ``RESULT {json}`` lines (bench/_common.py's
``print_result``); this script collects them into one table: target, figure
(a ratio against a baseline measured in the same run where the target is
one), goal, PASS/FAIL.  A benchmark that fails, times out or is missing shows
as such in the table.

Each benchmark has a time budget (see BENCHMARKS; 51 minutes in all at
worst, SIGTERM then SIGKILL past it); a run of all of them but sync took under 4
minutes on the 2-core machine the figures in docs/performance.md come from.
The exit status is 0 when every benchmark ran to completion (whatever the
targets say), 1 otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import RESULT_PREFIX, header, run_script

BENCH = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Benchmark:
    name: str
    argv: tuple[str, ...]
    #: Seconds it may take before it is stopped and counted as failed.
    budget: float
    what: str


BENCHMARKS = (
    Benchmark(
        "throughput",
        ("throughput.py", "--runs", "3"),
        600,
        "1 GiB up/down vs Node ws, websockets, tus, FTP and the disk/loopback limits; CPU; RSS",
    ),
    Benchmark(
        "concurrency",
        ("concurrency.py",),
        360,
        "16 clients moving 1 GiB at once (RSS); 1,000 clients save + get",
    ),
    Benchmark(
        "connections",
        ("connections.py",),
        180,
        "10,000 idle authenticated connections (RSS, list on each); list round trips",
    ),
    Benchmark(
        "folders",
        ("folders.py",),
        180,
        "list of a 10,000-entry folder and a 10,000-file tree (1.2, paged) vs a flat list",
    ),
    Benchmark(
        "sync",
        ("sync.py",),
        1500,
        "wsfiles sync --once vs rsync -a --fsync to rsync --daemon: 10,000 x 4 KiB, 10 x 100 MiB",
    ),
    Benchmark(
        "browser",
        ("browser.py",),
        240,
        "1 GiB up/down through the web page in headless Chromium; page memory",
    ),
)


@dataclass
class Outcome:
    benchmark: Benchmark
    status: str = "not run"
    seconds: float = 0.0
    results: list[dict[str, object]] = field(default_factory=list)


def run(benchmark: Benchmark, log_path: Path) -> Outcome:
    """Run one benchmark, echoing and logging its output, collecting its RESULT lines."""
    outcome = Outcome(benchmark)
    script = BENCH / benchmark.argv[0]
    if not script.exists():
        outcome.status = "missing"
        return outcome
    argv = [sys.executable, str(script), *benchmark.argv[1:]]
    print(f"\n=== {benchmark.name}: {' '.join(argv[1:])} (budget {benchmark.budget:g} s)")
    start = time.monotonic()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            start_new_session=True,
        )
        deadline = start + benchmark.budget
        timer = _Watchdog(process, deadline)
        assert process.stdout is not None
        try:
            for line in process.stdout:
                log.write(line)
                if line.startswith(RESULT_PREFIX):
                    outcome.results.append(json.loads(line[len(RESULT_PREFIX) :]))
                else:
                    print(f"  {line}", end="", flush=True)
            process.wait()
        except BaseException:  # Ctrl-C or SIGTERM here: the benchmark cleans up too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            process.wait(60)
            raise
        finally:
            timer.cancel()
    outcome.seconds = time.monotonic() - start
    if timer.fired:
        outcome.status = f"stopped after {benchmark.budget:g} s"
    elif process.returncode == 0:
        outcome.status = "ok"
    else:
        outcome.status = f"exit {process.returncode}"
    return outcome


class _Watchdog:
    """Stops a benchmark's process group at its deadline (SIGTERM, then SIGKILL)."""

    def __init__(self, process: subprocess.Popen[str], deadline: float) -> None:
        import threading

        self.fired = False
        self._process = process
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(deadline,), daemon=True)
        self._thread.start()

    def _watch(self, deadline: float) -> None:
        if self._stop.wait(max(0.0, deadline - time.monotonic())):
            return
        self.fired = True
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(self._process.pid, sig)
            except ProcessLookupError:
                return
            if self._stop.wait(grace):
                return

    def cancel(self) -> None:
        self._stop.set()
        self._thread.join(30)


def table(outcomes: list[Outcome]) -> list[str]:
    """The results as Markdown table rows."""
    rows = [
        "| benchmark | target | figure | goal | result |",
        "|---|---|---|---|---|",
    ]
    for outcome in outcomes:
        name = outcome.benchmark.name
        if not outcome.results or outcome.status != "ok":
            rows.append(f"| {name} | (benchmark {outcome.status}) | | | FAIL |")
        for result in outcome.results:
            ok = result.get("ok")
            shown = "-" if ok is None else ("PASS" if ok else "FAIL")
            rows.append(
                f"| {name} | {result['target']} | {result['figure']} | {result['goal']} | {shown} |"
            )
    return rows


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = [b.name for b in BENCHMARKS]
    parser.add_argument("--only", nargs="+", choices=names, help="run only these")
    parser.add_argument("--logs", type=Path, help="keep each benchmark's output here")
    parser.add_argument("--markdown", type=Path, help="also write the table to this file")
    args = parser.parse_args(argv)
    header()
    chosen = [b for b in BENCHMARKS if not args.only or b.name in args.only]
    with tempfile.TemporaryDirectory(prefix="wsfiles-run-all-") as temp:
        logs = args.logs or Path(temp)
        logs.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        outcomes = [run(b, logs / f"{b.name}.log") for b in chosen]
        total = time.monotonic() - started
    rows = table(outcomes)
    print()
    print("\n".join(rows))
    print()
    for outcome in outcomes:
        print(f"{outcome.benchmark.name}: {outcome.status} in {outcome.seconds:.0f} s")
    print(f"all benchmarks: {total:.0f} s ({total / 60:.1f} min)")
    if args.markdown:
        args.markdown.write_text("\n".join(rows) + "\n")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    run_script(main)
