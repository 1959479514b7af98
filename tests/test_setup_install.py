"""tools/install.py, the Makefile's `pip install`: uv with pip's own configuration, pip where uv cannot.

Each install is real: a fresh venv, and a wheel the test writes, found through pip's configuration
(a find-links folder set in a pip config file), with no index reached.
"""

from __future__ import annotations

import importlib.util
import os
import stat
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("tools_install", REPO / "tools" / "install.py")
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)


def write_wheel(folder: Path, name: str = "vidray_probe", version: str = "0.1") -> Path:
    """A pure-Python wheel holding one module, ``name``, that sets ``VERSION``."""
    info = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture
def pip_config(tmp_path, monkeypatch):
    """A pip config file (PIP_CONFIG_FILE, loaded after the machine's own) with a find-links folder that
    holds the probe wheel, and no index: what the test installs comes from there and nowhere else."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    write_wheel(wheels)
    config = tmp_path / "pip.conf"
    config.write_text(f"[global]\nfind-links = {wheels}\nno-index = true\n")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(config))
    for key in [k for k in os.environ if k.startswith("PIP_") and k != "PIP_CONFIG_FILE"]:
        monkeypatch.delenv(key)  # the machine's PIP_* variables would override the file
    return wheels


def new_venv(folder: Path) -> str:
    venv.create(folder, with_pip=True)
    return str(folder / "bin" / "python")


def run_install(target: str, *pip_args: str, python: str = sys.executable) -> subprocess.CompletedProcess:
    """tools/install.py run by ``python``: uv is looked for (and installed) beside it."""
    return subprocess.run([python, str(REPO / "tools" / "install.py"), target, *pip_args],
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def probe_version(target: str) -> str:
    """``vidray_probe.VERSION`` as the venv of ``target`` imports it."""
    return subprocess.run([target, "-c", "import vidray_probe; print(vidray_probe.VERSION)"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip


def test_pip_settings_are_read_with_pip_precedence(pip_config, tmp_path, monkeypatch):
    config = Path(os.environ["PIP_CONFIG_FILE"])
    config.write_text(config.read_text() + "extra-index-url = file:///a file:///b\n[install]\nconstraint = /c.txt\n")
    monkeypatch.setenv("PIP_FIND_LINKS", "/from/env")  # a PIP_* variable overrides every file
    settings = install.pip_settings(sys.executable)
    assert settings["find-links"] == "/from/env"
    assert settings["extra-index-url"] == "file:///a file:///b" and settings["constraint"] == "/c.txt"
    command, env = install.uv_command(Path("uv"), "py", {**settings, "cert": "/ca.pem"}, ["-q", "x"])
    assert command[command.index("--find-links") + 1] == "/from/env"
    assert [command[i + 1] for i, arg in enumerate(command) if arg == "--extra-index-url"] == ["file:///a", "file:///b"]
    assert "--no-index" in command and command[-2:] == ["-q", "x"] and env["SSL_CERT_FILE"] == "/ca.pem"
    with pytest.raises(ValueError, match="pre="):
        install.uv_command(Path("uv"), "py", {"pre": "1"}, ["x"])  # would change what is installed


@pytest.mark.slow
def test_uv_installs_from_pips_configuration_with_bytecode(pip_config, tmp_path):
    target = new_venv(tmp_path / "venv")
    done = run_install(target, "-q", "vidray_probe")
    assert done.returncode == 0 and "installing with pip instead" not in done.stderr, done.stderr
    # Compiled at install: the import here writes no bytecode of its own.
    probe = subprocess.run([target, "-c", "import vidray_probe; print(vidray_probe.VERSION, vidray_probe.__cached__)"],
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    assert probe[0] == "0.1" and Path(probe[1]).is_file()


@pytest.mark.slow
def test_a_setting_uv_is_not_told_falls_back_to_pip(pip_config, tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_PRE", "1")  # pip's --pre: uv is not told it here, so pip installs
    target = new_venv(tmp_path / "venv")
    done = run_install(target, "-q", "vidray_probe")
    assert done.returncode == 0, done.stderr
    assert "tools/install.py: pip's setting pre='1': installing with pip instead\n" in done.stderr
    assert probe_version(target) == "0.1"


@pytest.mark.slow
def test_uv_is_installed_quietly_from_pips_configuration(pip_config, tmp_path, monkeypatch):
    """A venv without uv beside its python (a fresh clone's .venv): install.py installs the pinned uv with pip,
    from pip's configuration, and prints nothing of it. The configuration here also lists an index that lacks
    uv, as this machine's local indexes do, which pip warns of, once per index, at `-q`."""
    real_uv = Path(sys.executable).parent / "uv"
    assert real_uv.is_file(), "the venv running the tests has no uv: its set-up did not run tools/install.py"
    # The pinned uv, as a wheel pip can install offline: its one script hands over to the real binary.
    name, version = install.UV.split("==")
    info, script = f"{name}-{version}.dist-info", f"{name}-{version}.data/scripts/uv"
    files = {
        script: f'#!/bin/sh\nexec "{real_uv}" "$@"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(pip_config / f"{name}-{version}-py3-none-any.whl", "w") as archive:
        for path, text in files.items():
            entry = zipfile.ZipInfo(path)
            entry.external_attr = (stat.S_IFREG | (0o755 if path == script else 0o644)) << 16  # pip keeps the exec bit
            archive.writestr(entry, text)
    empty_index = tmp_path / "index"
    empty_index.mkdir()
    config = Path(os.environ["PIP_CONFIG_FILE"])
    config.write_text(config.read_text().replace("no-index = true\n", f"index-url = {empty_index.as_uri()}\n"))

    bare = tmp_path / "bare"
    python = new_venv(bare)
    target = new_venv(tmp_path / "target")
    done = run_install(target, "-q", "vidray_probe", python=python)
    assert done.returncode == 0, done.stderr
    assert (bare / "bin" / "uv").is_file()
    assert done.stderr == "" and done.stdout == "", done.stderr  # no pip warning, and no fallback to pip
    assert probe_version(target) == "0.1"


@pytest.mark.slow
def test_a_uv_that_cannot_run_falls_back_to_pip(pip_config, tmp_path):
    """A uv beside the python that the machine cannot execute (here: no exec bit, as on a noexec mount; or a
    binary of another architecture): one line naming it, then pip installs, instead of a traceback."""
    bare = tmp_path / "bare"
    python = new_venv(bare)
    (bare / "bin" / "uv").write_text("not a program\n")  # mode 0644
    target = new_venv(tmp_path / "target")
    done = run_install(target, "-q", "vidray_probe", python=python)
    assert done.returncode == 0, done.stderr
    assert done.stderr == f"tools/install.py: {bare / 'bin' / 'uv'} could not run (Permission denied): installing with pip instead\n"
    assert probe_version(target) == "0.1"
