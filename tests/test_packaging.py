"""The plugin and console script are visible the way users run them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import BIN

REPO = Path(__file__).resolve().parent.parent


def test_twistd_lists_the_plugin_from_another_directory(tmp_path):
    # From the repo root the plugin is importable via cwd even when the
    # install is broken; from elsewhere only a real install finds it.
    result = subprocess.run(
        [str(BIN / "twistd"), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "wsfiles" in result.stdout


def test_console_script_and_module_show_usage(tmp_path):
    for argv in ([str(BIN / "wsfiles"), "--help"], [sys.executable, "-m", "wsfiles", "--help"]):
        result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "user" in result.stdout


def test_wheel_ships_plugin_and_package_but_not_tests(tmp_path):
    # Built from a copy: setuptools leaves build/ beside the sources it builds.
    source = tmp_path / "source"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".git", "node_modules", "build", "*.egg-info", "__pycache__"),
    )
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert built.returncode == 0, f"pip wheel failed:\n{built.stderr}"
    (wheel,) = tmp_path.glob("wsfiles-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "twisted/plugins/wsfiles_plugin.py" in names
    assert "wsfiles/tap.py" in names
    assert "wsfiles/storage/local.py" in names and "wsfiles/storage/s3.py" in names
    assert not any(n.startswith("tests/") for n in names)
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names

    # A plain (non-editable) install of that wheel shows the plugin in twistd.
    # ``python -S`` skips site-packages' .pth files, so the editable install
    # of this checkout that the test command made cannot stand in for it.
    target = tmp_path / "installed"
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", target, wheel],
        timeout=120,
        capture_output=True,
        text=True,
    )
    assert installed.returncode == 0, f"pip install --target failed:\n{installed.stderr}"
    dependencies = [p for p in sys.path if p.endswith("-packages")]
    twistd_help = (
        "import sys, wsfiles; print(wsfiles.__file__);"
        " from twisted.scripts.twistd import run; sys.argv = ['twistd', '--help']; run()"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", twistd_help],
        cwd=tmp_path,
        env={"PYTHONPATH": os.pathsep.join([str(target), *dependencies]), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(str(target / "wsfiles"))  # the installed copy ran
    assert "wsfiles" in result.stdout.split("Commands:")[1]


def test_autobahn_native_masker_is_in_use():
    # Without NVX, unmasking uploads falls to about 13 MB/s.
    from autobahn.websocket.xormasker import USES_NVX

    assert USES_NVX


def test_ci_runs_the_test_command_from_the_readme():
    readme = (REPO / "README.md").read_text().splitlines()
    commands = [line.strip() for line in readme[:12] if line.startswith("    ")]
    assert len(commands) == 2, "the README opens with two commands: run, and test"
    ci = (REPO / ".ci" / "run").read_text()
    assert commands[1] in ci
    # ... inside a virtual environment of its own, made before the command.
    assert ci.index("-m venv") < ci.index("activate") < ci.index(commands[1])
