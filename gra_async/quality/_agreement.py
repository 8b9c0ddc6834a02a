"""How far reviewers agree: Krippendorff's alpha (interval) and pairwise correlation.

Plain numpy over a dense (samples x reviewers) array with NaN where a reviewer did not
score a sample, so the panels of a rotating team (different reviewers per sample) are
measured as they were.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["interval_alpha", "pairwise_correlation"]

Ratings = npt.NDArray[np.float64]


def interval_alpha(ratings: Ratings) -> float | None:
    """Krippendorff's alpha for interval data; rows are units (samples), columns coders
    (reviewer models), NaN where a coder gave no value.

    alpha = 1 - D_o / D_e over the pairable values (units with two values or more). Both
    disagreements are sums of squared differences over ordered pairs, which collapse to
    sums and sums of squares: sum_{i != j} (v_i - v_j)^2 = 2 (m sum v^2 - (sum v)^2), so
    the whole computation is one pass, linear in the values. None when it is undefined:
    fewer than two pairable values, or no variation at all.
    """
    values = np.asarray(ratings, dtype=np.float64)
    present = ~np.isnan(values)
    m = present.sum(axis=1)
    pairable = m >= 2
    values, present, m = values[pairable], present[pairable], m[pairable]
    n = float(m.sum())
    if n < 2:
        return None
    filled = np.where(present, values, 0.0)
    s1, s2 = filled.sum(axis=1), (filled * filled).sum(axis=1)
    observed = float((2.0 * (m * s2 - s1 * s1) / (m - 1)).sum()) / n
    expected = 2.0 * (n * float(s2.sum()) - float(s1.sum()) ** 2) / (n * (n - 1))
    if expected <= 0:
        return None
    return 1.0 - observed / expected


def pairwise_correlation(ratings: Ratings, *, min_overlap: int = 3) -> Ratings:
    """Pearson correlation of every pair of columns over the rows both scored; NaN where
    they share fewer than `min_overlap` rows or one of them never varies there."""
    values = np.asarray(ratings, dtype=np.float64)
    k = values.shape[1]
    out = np.full((k, k), np.nan)
    for a in range(k):
        for b in range(a, k):
            both = ~np.isnan(values[:, a]) & ~np.isnan(values[:, b])
            if both.sum() < min_overlap:
                continue
            x, y = values[both, a], values[both, b]
            if x.std() == 0 or y.std() == 0:
                continue
            out[a, b] = out[b, a] = float(np.corrcoef(x, y)[0, 1])
    return out
