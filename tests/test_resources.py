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
