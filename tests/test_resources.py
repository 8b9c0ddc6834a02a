"""The open-file limit a run raises for itself, in a child process with its own limits."""

from __future__ import annotations

import subprocess
import sys

import pytest

resource = pytest.importorskip("resource")

CHILD = """
import logging, resource, sys
logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
hard = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
from gra_async._resources import ensure_open_files
print("limit", ensure_open_files(int(sys.argv[2])), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
"""


def _child(hard: int, concurrency: int) -> str:
    out = subprocess.run([sys.executable, "-c", CHILD, str(hard), str(concurrency)],
                         capture_output=True, text=True, check=True)
    return out.stdout


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard != resource.RLIM_INFINITY and hard < 2000:
        pytest.skip(f"this machine's hard open-file limit is {hard}")
    out = _child(2000, 1000)
    assert out.strip() == "limit 2000 2000"


def test_a_hard_limit_below_the_concurrency_is_announced() -> None:
    out = _child(300, 1000)
    assert "the open-file limit is 300, and 1000 calls in flight need about 1256" in out
    assert "ulimit -n 1256" in out
    assert out.strip().endswith("limit 300 300")


COLLECTOR = """
import gc
from gra_async._resources import collector_for_run
gc.set_threshold(700, 10, 10)
before = gc.get_threshold()
with collector_for_run():
    during = gc.get_threshold(), gc.get_freeze_count() > 0
    with collector_for_run():  # a second run in the same process
        nested = gc.get_threshold()
    after_inner = gc.get_threshold()
print(before, during, nested, after_inner, gc.get_threshold(), gc.get_freeze_count())
gc.disable()
with collector_for_run():
    print(gc.get_threshold(), gc.isenabled(), gc.get_freeze_count())
"""


def test_a_run_makes_full_collections_rare_and_puts_the_collector_back() -> None:
    out = subprocess.run([sys.executable, "-c", COLLECTOR], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0] == ("(700, 10, 10) ((20000, 10, 1000), True) (20000, 10, 1000) "
                      "(20000, 10, 1000) (700, 10, 10) 0")
    assert out[1] == "(700, 10, 10) False 0"  # the application's choice stands
