"""`pip install ARGS` into a venv, done by uv where it can: the Makefile's set-up (`make demo`, `make test`).

    python tools/install.py VENV_PYTHON PIP_ARGS...

uv downloads and unpacks in parallel: on this project's 2-core machines it built .venv from nothing in
34 s, bytecode included, where pip took 59 s (docs/benchmarks.md, section 8). It is pinned (UV) and installed
with pip next to the python running this script, then reads the same sources pip would:

* pip's configuration (`pip config list`: its files and PIP_* variables) becomes uv's flags, since uv
  reads neither. A setting with no uv flag below, or any failure of uv, means pip does the install
  instead, with one line saying why: the environment comes out the same, only slower.
* `--index-strategy unsafe-best-match`: pip's choice, the best version across every index (uv's
  default takes the first index that has the package at all).
* `--compile-bytecode`, as pip does: where PYTHONDONTWRITEBYTECODE is set, nothing caches what an
  import compiles, and every process would compile its imports again.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

UV = "uv==0.13.9"
# pip's multi-valued settings (whitespace-separated in pip's configuration) and uv's flag for each value.
LIST_FLAGS = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
              "constraint": "--constraint", "trusted-host": "--allow-insecure-host"}  # fmt: skip
# pip's settings that do not change what is installed (config-file: PIP_CONFIG_FILE, whose settings the
# listing holds already).
IGNORED = {"disable-pip-version-check", "no-cache-dir", "cache-dir", "progress-bar", "root-user-action", "retries",
           "no-color", "quiet", "verbose", "no-input", "config-file"}  # fmt: skip
# The sections of pip's configuration that `pip install` reads, weakest first: [install] overrides [global]
# in pip's files, and PIP_* variables (":env:") override both.
SECTION_RANK = {"global": 0, "install": 1, ":env:": 2}


def pip_settings(python: str) -> dict[str, str]:
    """The configuration `pip install` would run with in ``python``'s environment, ``{key: value}`` (`pip
    config list` has merged pip's files already; sections override by SECTION_RANK)."""
    listed = subprocess.run([python, "-m", "pip", "config", "list"], capture_output=True, text=True, check=True)
    ranked = []
    for line in listed.stdout.splitlines():
        scoped_key, _, quoted = line.partition("=")
        section, _, key = scoped_key.rpartition(".")
        if section in SECTION_RANK:
            ranked.append((SECTION_RANK[section], key, (shlex.split(quoted) or [""])[0]))
    return {key: value for _, key, value in sorted(ranked, key=lambda setting: setting[0])}


def uv_command(uv: Path, target: str, settings: dict[str, str], pip_args: list[str]) -> tuple[list[str], dict]:
    """uv's command and environment for ``pip install pip_args`` under ``settings``; ValueError names a
    setting uv is not told here."""
    command = [str(uv), "pip", "install", "--python", target, "--index-strategy", "unsafe-best-match",
               "--compile-bytecode"]  # fmt: skip
    env = dict(os.environ)
    for key, value in settings.items():
        if key in LIST_FLAGS:
            command += [arg for item in value.split() for arg in (LIST_FLAGS[key], item)]
        elif key == "no-index" and value.lower() in ("1", "true", "yes", "on"):
            command.append("--no-index")
        elif key == "cert":
            env["SSL_CERT_FILE"] = value
        elif key in ("timeout", "default-timeout"):
            env["UV_HTTP_TIMEOUT"] = value
        elif key not in IGNORED:
            raise ValueError(f"pip's setting {key}={value!r}")
    return command + pip_args, env


def main(target: str, pip_args: list[str]) -> int:
    uv = Path(sys.executable).parent / "uv"
    try:
        if not uv.is_file():
            # -qq: errors only. pip warns once per configured index that lacks uv ("Location
            # 'file:///.../simple/uv/' is ignored"), which is not a fault of the set-up: the first lines
            # a newcomer's `make demo` printed. A failure still prints its error, then the line below.
            subprocess.run([sys.executable, "-m", "pip", "install", "-qq", UV], check=True)
        command, env = uv_command(uv, target, pip_settings(target), pip_args)
    except subprocess.CalledProcessError as error:
        why = f"`{' '.join(map(str, error.cmd))}` failed"
    except ValueError as error:
        why = str(error)
    else:
        try:
            if subprocess.run(command, env=env).returncode == 0:
                return 0
            why = "uv failed (above)"
        except OSError as error:  # a uv binary this machine cannot run (another architecture, noexec mount)
            why = f"{uv} could not run ({error.strerror})"
    print(f"tools/install.py: {why}: installing with pip instead", file=sys.stderr)
    return subprocess.run([target, "-m", "pip", "install", *pip_args]).returncode


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.split("\n\n")[1])
    sys.exit(main(sys.argv[1], sys.argv[2:]))
