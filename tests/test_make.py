"""A fresh machine needs two commands, `make demo` and `make test`: `make test` installs the
Debian packages its cluster tests need where it can (root and apt), and otherwise stops with
one line naming them. The Makefile's recipes run for real, with stand-ins for the packages'
commands and for apt-get."""

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Two packages whose commands no machine has, beside one that every machine has.
ABSENT = "SYSTEM_DEPS=dd-absent-a:pkg-a sh:dash dd-absent-b:pkg-b"


def make(*args: str, user: int | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """`make -s -f ROOT/Makefile ARGS` from ``cwd``, as ``user`` (a uid) where given."""
    drop = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups"] if user is not None else []
    return subprocess.run([*drop, "make", "-s", "-f", str(ROOT / "Makefile"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def fake_apt(tmp_path) -> tuple[Path, Path]:
    """An apt-get that records its arguments, a line per call."""
    calls = tmp_path / "apt-calls"
    apt = tmp_path / "apt-get"
    apt.write_text(f'#!/bin/sh\necho "$*" >> {calls}\n')
    apt.chmod(0o755)
    return apt, calls


def assert_names_packages_in_one_line(out: subprocess.CompletedProcess) -> None:
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and out.stdout == "" and len(lines) == 1, out
    assert re.search(r"needs Debian packages pkg-a pkg-b for its SLURM/cluster tests", lines[0]), lines
    assert "root" in lines[0] and "apt" in lines[0] and "make test-fast" in lines[0] and "not cluster" in lines[0]


def test_system_deps_installs_the_missing_packages_as_root_with_apt(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    apt, calls = fake_apt(tmp_path)
    out = make("system-deps", ABSENT, f"APT_GET={apt}")
    assert out.returncode == 0, out
    assert "installing Debian packages for the SLURM/cluster tests: pkg-a pkg-b" in out.stdout
    assert calls.read_text().splitlines() == ["update -qq", "install -y -qq pkg-a pkg-b"]


def test_system_deps_does_nothing_once_installed(tmp_path):
    apt, calls = fake_apt(tmp_path)
    out = make("system-deps", "SYSTEM_DEPS=sh:dash", f"APT_GET={apt}")
    assert out.returncode == 0 and out.stdout == out.stderr == "" and not calls.exists(), out


def test_without_apt_one_line_names_the_packages(tmp_path):
    assert_names_packages_in_one_line(make("system-deps", ABSENT, f"APT_GET={tmp_path / 'no-apt-get'}"))


def test_without_root_one_line_names_the_packages(tmp_path):
    if os.geteuid() != 0:
        assert_names_packages_in_one_line(make("system-deps", ABSENT))
        return
    apt, calls = fake_apt(tmp_path)
    tmp_path.chmod(0o755)
    nobody = 65534
    assert_names_packages_in_one_line(make("system-deps", ABSENT, f"APT_GET={apt}", user=nobody, cwd=tmp_path))
    assert not calls.exists()


def test_make_test_checks_the_packages_first_unless_the_cluster_tests_are_left_out(tmp_path):
    no_apt = f"APT_GET={tmp_path / 'no-apt-get'}"
    assert_names_packages_in_one_line(make("-n", "test", ABSENT, no_apt))
    for marks in ("-m 'not cluster'", "-m 'not slow and not cluster'"):
        dry = make("-n", "test", ABSENT, no_apt, f"TEST_ARGS={marks}")
        assert dry.returncode == 0 and "-m pytest" in dry.stdout and marks in dry.stdout, dry
    fast = make("-n", "test-fast", ABSENT, no_apt)
    assert fast.returncode == 0 and "not slow and not cluster" in fast.stdout, fast


def test_a_fresh_machine_needs_make_demo_and_make_test():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## First commands on a fresh machine")[1].split("```bash\n")[1].split("```")[0]
    commands = [line.split("#")[0].strip() for line in block.splitlines()]
    assert commands[:2] == ["make demo", "make test"] and "make system-deps" not in commands, block
    ci = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert "make test" in ci and "make system-deps" not in ci  # CI runs what the README tells users to
