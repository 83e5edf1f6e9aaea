"""CI may not pass by skipping: .ci/run exports DD_REQUIRE_CLUSTER=1, under which a test of
a cluster module (SLURM, Ray, the 2-node cluster) that skips fails instead; without it (a
developer's `make test` without root) it skips with its reason. Checked by running pytest
on a stand-in suite that uses tests/conftest.py's hooks."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

STAND_IN = {
    "conftest.py": f"""
import importlib.util
spec = importlib.util.spec_from_file_location("dd_conftest", {str(ROOT / "tests/conftest.py")!r})
ours = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ours)
pytest_collection_modifyitems = ours.pytest_collection_modifyitems
pytest_runtest_makereport = ours.pytest_runtest_makereport
""",
    "pytest.ini": "[pytest]\nmarkers =\n    cluster: c\n    slow: s\n    s3: s\n",
    "test_cluster.py": """
import pytest

@pytest.fixture(scope="module")
def cluster():
    pytest.skip("no 2-node cluster on this machine: needs root")

def test_on_the_cluster(cluster):
    pass

def test_skipped_in_the_test():
    pytest.skip("needs a node of 2 CPUs")

@pytest.mark.xfail(reason="known", strict=False)
def test_expected_to_fail():
    assert False
""",
    "test_other.py": """
import pytest

def test_skips_anywhere():
    pytest.skip("this machine has CUDA")
""",
}


def run_stand_in(tmp_path: Path, require: str | None) -> subprocess.CompletedProcess:
    for name, text in STAND_IN.items():
        (tmp_path / name).write_text(text)
    env = {k: v for k, v in os.environ.items() if k != "DD_REQUIRE_CLUSTER"}
    env |= {"DD_REQUIRE_CLUSTER": require} if require is not None else {}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-v", "-rfEs",
                           str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def outcomes(out: subprocess.CompletedProcess) -> dict[str, str]:
    return dict(re.findall(r"^\S+::(\w+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL)", out.stdout, re.M))


def test_ci_exports_dd_require_cluster_before_make_test():
    lines = [line.strip() for line in (ROOT / ".ci/run").read_text().splitlines()]
    assert lines.index("export DD_REQUIRE_CLUSTER=1") < lines.index("make test")


def test_a_skipped_cluster_test_fails_under_dd_require_cluster(tmp_path):
    out = run_stand_in(tmp_path, "1")
    assert out.returncode == 1, out.stdout + out.stderr
    assert outcomes(out) == {"test_on_the_cluster": "ERROR", "test_skipped_in_the_test": "FAILED",
                             "test_expected_to_fail": "XFAIL", "test_skips_anywhere": "SKIPPED"}, out.stdout
    assert "DD_REQUIRE_CLUSTER=1: a cluster test may not skip here (no 2-node cluster on this machine: needs root)" \
        in out.stdout


def test_without_it_a_cluster_test_skips_with_its_reason(tmp_path):
    out = run_stand_in(tmp_path, None)
    assert out.returncode == 0, out.stdout + out.stderr
    assert outcomes(out) == {"test_on_the_cluster": "SKIPPED", "test_skipped_in_the_test": "SKIPPED",
                             "test_expected_to_fail": "XFAIL", "test_skips_anywhere": "SKIPPED"}, out.stdout
    assert "no 2-node cluster on this machine: needs root" in out.stdout
