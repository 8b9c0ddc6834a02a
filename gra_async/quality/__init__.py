"""The data-quality report of a run (`gra-async report`): one self-contained HTML file.

    _data       one read-only pass over the journal: the numbers per sample, call and endpoint
    _agreement  Krippendorff's alpha (interval) and pairwise correlation of reviewers
    _sections   each section's numbers and its matplotlib figure
    _page       the HTML page, figures embedded; `write_report`
"""

from __future__ import annotations

from gra_async.quality._agreement import interval_alpha, pairwise_correlation
from gra_async.quality._page import QualityReport, write_report

__all__ = ["QualityReport", "interval_alpha", "pairwise_correlation", "write_report"]
