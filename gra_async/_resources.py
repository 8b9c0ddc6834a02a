"""Process resources a run needs: open files for its connections."""

from __future__ import annotations

import logging

__all__ = ["ensure_open_files"]

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
