"""Process resources a run needs: open files for its connections, a collector that keeps up."""

from __future__ import annotations

import contextlib
import gc
import logging
import threading
from collections.abc import Iterator

__all__ = ["collector_for_run", "ensure_open_files"]

log = logging.getLogger("gra_async")

# Beyond one socket per call in flight: the journal (with its WAL), the lock, the seed
# store, the embedded servers' pipes, the event loop's own descriptors.
_SPARE_FILES = 256


def ensure_open_files(concurrency: int) -> int:
    """Raise the soft open-file limit to the hard one; warn when even that is too low.

    Each call in flight holds a socket; at 10,000 calls the usual soft limit of 1,024
    fails connections with "Too many open files", which reads as an outage. Returns the
    limit now in force (or -1 where the platform has no such limit).
    """
    try:
        import resource
    except ImportError:  # Windows: no RLIMIT_NOFILE, and select()'s limit is elsewhere
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = concurrency + _SPARE_FILES
    unlimited = resource.RLIM_INFINITY
    if soft != unlimited and soft < need and (hard == unlimited or soft < hard):
        target = need if hard == unlimited else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != unlimited and soft < need:
        log.warning(
            "the open-file limit is %d, and %d calls in flight need about %d: calls past it "
            "fail to connect; raise it (ulimit -n %d, or LimitNOFILE= for a service) or "
            "lower --concurrency", soft, concurrency, need, need)
    return int(soft)


# A full collection once per this many middle-generation (gen 1) collections instead of
# CPython's 10. Every call's state lives for the call's latency, long enough to reach the
# oldest generation, and each full pass walks everything in flight: at 10,000 calls in
# flight (bench/pipeline_bench.py --scale) 66 full passes took 72 s of a 244 s run, up
# to 1.7 s each with the event loop stopped; with 1000 here, 1 pass of 1.5 s. The
# pipeline makes ~2 objects of cyclic garbage per call (gc.DEBUG_SAVEALL), which the
# younger passes still collect.
_FULL_PASS_EVERY = 1000
# A young (gen 0) pass once this many objects more are alive instead of CPython's 700:
# each young pass scans what is new, and at thousands of calls in flight most of it is
# still alive, moved up only to be scanned again by the middle generation. At C = 10,000
# the collector took 12.8 s of a run's ~98 s of CPU with 700, 6.8-7.9 s with this; its
# longest pause grew from 0.58-0.77 s to 0.81-1.04 s, under the 2-2.5 s the event loop's
# lag reaches at times either way (bench/pipeline_bench.py --scale, which times them).
_YOUNG_PASS_AFTER = 20_000
_tuned = 0
_saved: tuple[tuple[int, int, int], bool] | None = None
_tuning = threading.Lock()


@contextlib.contextmanager
def collector_for_run() -> Iterator[None]:
    """While a run runs: objects from before it frozen out of the collector's scans (the
    modules, the config, the seeds), and young and full passes rarer. Restored when the last run
    in the process ends; a collector the application disabled is left alone."""
    global _tuned, _saved
    with _tuning:
        if _tuned == 0 and gc.isenabled():
            threshold = gc.get_threshold()
            froze = gc.get_freeze_count() == 0
            gc.collect()
            if froze:
                gc.freeze()
            gc.set_threshold(max(threshold[0], _YOUNG_PASS_AFTER), threshold[1],
                             max(threshold[2], _FULL_PASS_EVERY))
            _saved = (threshold, froze)
        _tuned += 1
    try:
        yield
    finally:
        with _tuning:
            _tuned -= 1
            if _tuned == 0 and _saved is not None:
                threshold, froze = _saved
                _saved = None
                gc.set_threshold(*threshold)
                if froze:
                    gc.unfreeze()
