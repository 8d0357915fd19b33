"""Huge-page malloc re-exec: when it changes the environment, and that the re-executed process
keeps its pid and arguments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from allava_jax import hugepages

ROOT = Path(__file__).resolve().parents[1]


def test_tunable_is_appended_once_and_respects_choices():
    assert hugepages.tunables_with_hugepages({}) == "glibc.malloc.hugetlb=1"
    other = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    assert hugepages.tunables_with_hugepages(other) == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    assert hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) is None
    assert hugepages.tunables_with_hugepages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) is None
    assert hugepages.tunables_with_hugepages({"ALLAVA_HUGEPAGES": "0"}) is None


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert hugepages.thp_mode(f) == "madvise"
    f.write_text("[always] madvise never\n")
    assert hugepages.thp_mode(f) == "always"
    assert hugepages.thp_mode(tmp_path / "missing") == ""


_SHOW_ENV = (
    "from allava_jax import hugepages; hugepages.reexec_with_hugepages(); "
    "import os, sys; print(os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])"
)


def _run(env_changes: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "ALLAVA_HUGEPAGES")}
    env.update(env_changes, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _SHOW_ENV, "x", "--flag"], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    pid, *rest = out.split(maxsplit=1)
    assert int(pid) == proc.pid  # exec keeps the pid: supervisors and kill -9 still see the process
    return rest


@pytest.mark.skipif(
    sys.platform != "linux"
    or hugepages.glibc_version() < hugepages.MIN_GLIBC
    or hugepages.thp_mode() not in ("always", "madvise"),
    reason="needs Linux, glibc >= 2.35 and THP madvise/always",
)
def test_reexec_sets_the_tunable_and_keeps_pid_and_arguments():
    (line,) = _run({})
    assert line.startswith("glibc.malloc.hugetlb=1 ") and line.rstrip().endswith("['x', '--flag']")
    (line,) = _run({"ALLAVA_HUGEPAGES": "0"})
    assert line.startswith("[")  # no tunable: left alone
