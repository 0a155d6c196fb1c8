"""The CLIs' re-execution under glibc malloc settings (dtpf_jax/malloc.py)."""

import os
import subprocess
import sys

import pytest

from dtpf_jax import malloc

PY = "/usr/bin/python3"


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([PY, "-m", "dtpf_jax.fuse", "--vis", "a"], "dtpf_jax.fuse"),
        ([PY, "-m", "dtpf_jax.fuse"], "dtpf_jax.fuse"),
        ([PY, "-u", "-X", "importtime", "-m", "dtpf_jax.train", "--config", "c"], "dtpf_jax.train"),
        ([PY, "-m", "dtpf_jax.evaluate", "x"], "dtpf_jax.evaluate"),
        ([PY, "-m", "dtpf_jax.export", "w", "o"], None),  # not a heavy CLI
        ([PY, "-m", "pytest", "-m", "dtpf_jax.fuse"], None),  # pytest's own -m
        ([PY, "scripts/benchmark.py", "-m", "dtpf_jax.fuse"], None),
        ([PY, "-c", "import dtpf_jax", "-m", "dtpf_jax.fuse"], None),
        ([PY], None),
        ([], None),
    ],
)
def test_cli_module(argv, expected):
    assert malloc.cli_module(argv) == expected


def test_wants_reexec_only_for_a_glibc_cli_without_a_setting():
    argv = [PY, "-m", "dtpf_jax.fuse"]
    assert malloc.wants_reexec(argv, {}, "Linux", "glibc")
    assert not malloc.wants_reexec(argv, {"GLIBC_TUNABLES": "x=1"}, "Linux", "glibc")
    assert not malloc.wants_reexec(argv, {"DTPF_MALLOC": "default"}, "Linux", "glibc")
    assert not malloc.wants_reexec(argv, {}, "Darwin", "")
    assert not malloc.wants_reexec(argv, {}, "Linux", "")  # musl: no such tunables
    assert not malloc.wants_reexec([PY, "-m", "pytest"], {}, "Linux", "glibc")


def test_reexec_passes_the_same_command_line_and_the_setting(monkeypatch):
    calls = []
    argv = [PY, "-m", "dtpf_jax.fuse", "--vis", "v", "--ir", "i", "--out", "o"]
    monkeypatch.setattr(sys, "orig_argv", argv, raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("DTPF_MALLOC", raising=False)
    monkeypatch.setattr(malloc.platform, "system", lambda: "Linux")
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(os, "execve", lambda exe, args, env: calls.append((exe, args, env)))
    malloc.reexec_if_cli()
    assert len(calls) == 1
    exe, args, env = calls[0]
    assert exe == sys.executable and args == argv
    assert env["GLIBC_TUNABLES"] == malloc.TUNED
    assert all(env[k] == v for k, v in os.environ.items())  # nothing else changed

    calls.clear()
    monkeypatch.setenv("GLIBC_TUNABLES", malloc.TUNED)  # the re-executed process: no loop
    malloc.reexec_if_cli()
    assert calls == []


def test_cli_reexecutes_once_under_the_setting(tmp_path):
    """The real path: a sitecustomize prints each interpreter start's GLIBC_TUNABLES."""
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nprint('start', os.environ.get('GLIBC_TUNABLES'), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DTPF_MALLOC")}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env.get("PYTHONPATH", "")]).strip(
        os.pathsep
    )
    out = subprocess.run(
        [sys.executable, "-m", "dtpf_jax.fuse", "--help"], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    starts = [line for line in out.stderr.splitlines() if line.startswith("start ")]
    if not malloc.wants_reexec(
        [sys.executable, "-m", "dtpf_jax.fuse"],
        env,
        malloc.platform.system(),
        malloc.platform.libc_ver()[0],
    ):
        pytest.skip("not Linux/glibc: no re-execution")
    assert starts == ["start None", f"start {malloc.TUNED}"]
    assert out.stdout.count("usage:") == 1  # the help is printed by the second process only

    env["DTPF_MALLOC"] = "default"
    out = subprocess.run(
        [sys.executable, "-m", "dtpf_jax.fuse", "--help"], env=env, capture_output=True, text=True
    )
    assert [line for line in out.stderr.splitlines() if line.startswith("start ")] == ["start None"]
