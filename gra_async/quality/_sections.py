"""The report's sections: each computes its numbers from `RunData` and draws its figure.

Figures are matplotlib `Figure` objects drawn without pyplot (no global state, no
display) and saved as SVG; every plot is of aggregates (histograms, bars, binned
rates), so a figure's size does not grow with the number of samples.
"""

from __future__ import annotations

import io
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from gra_async.quality._agreement import interval_alpha, pairwise_correlation
from gra_async.quality._data import CHARS_PER_TOKEN, RunData

if TYPE_CHECKING:  # matplotlib itself is imported when a figure is drawn (the report extra)
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["Section", "sections"]

Row = Sequence[object]
_PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
            "#8c8c8c", "#ccb974", "#64b5cd")
_ACCEPT, _REJECT, _ADJ = "#55a868", "#c44e52", "#8172b3"


@dataclass(slots=True)
class Table:
    header: Row
    rows: Sequence[Row]


@dataclass(slots=True)
class Section:
    key: str
    title: str
    summary: str
    figure: bytes | None = None  # SVG
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _svg(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="svg")  # constrained layout fits it: no second, "tight" draw
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def _bars_figure(bars: int, per_bar: float, base: float) -> tuple[Figure, Axes]:
    """One axes of horizontal bars, as tall as its bars need."""
    fig = _figure(11, base + per_bar * bars)
    return fig, fig.add_subplot()


def _pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def _barh(ax: Axes, counts: Counter[str], color: str, empty: str) -> None:
    if not counts:
        ax.text(0.5, 0.5, empty, ha="center", va="center", transform=ax.transAxes, color="#666")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    items = counts.most_common(12)[::-1]
    ax.barh([_short(k, 38) for k, _ in items], [n for _, n in items], color=color)
    for y, (_, n) in enumerate(items):
        ax.text(n, y, f" {n}", va="center", fontsize=8)
    ax.margins(x=0.15)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


# --- sections ----------------------------------------------------------------------


def scores_section(data: RunData) -> Section:
    section = Section("scores", "Scores per criterion and reviewer model",
                      "How each reviewer model scores each criterion (1-10), and where the "
                      "panel mean falls against the accept bar.")
    n_criteria, n_models = len(data.criteria), len(data.reviewers)
    if not n_models or not data.finished:
        section.notes.append("No reviews in this run yet.")
        return section
    cols = min(3, max(n_criteria, 1))
    rows = -(-n_criteria // cols) + 1
    fig = _figure(11, 2.4 * rows)
    grid = fig.add_gridspec(rows, cols)
    edges = np.arange(0.5, 11.5, 1.0)
    width = 0.8 / n_models
    for c, criterion in enumerate(data.criteria):
        ax = fig.add_subplot(grid[c // cols, c % cols])
        for r, model in enumerate(data.reviewers):
            values = data.scores[:, r, c]
            values = values[~np.isnan(values)]
            counts, _ = np.histogram(values, bins=edges)
            share = counts / max(len(values), 1)
            ax.bar(np.arange(1, 11) - 0.4 + width * (r + 0.5), share, width=width,
                   color=_PALETTE[r % len(_PALETTE)], label=model)
        ax.set_title(criterion, fontsize=10)
        ax.set_xticks(range(1, 11))
        ax.set_ylabel("share", fontsize=8)
    ax = fig.add_subplot(grid[rows - 1, :])
    means = data.means
    bins = np.linspace(1, 10, 37).tolist()
    stacks = [(means[data.accepted & ~np.isnan(means)], "accepted", _ACCEPT),
              (means[~data.accepted & ~np.isnan(means)], "not accepted", _REJECT)]
    ax.hist([s for s, _, _ in stacks], bins=bins, stacked=True,
            color=[c for _, _, c in stacks], label=[name for _, name, _ in stacks])
    if data.accept_mean is not None:
        ax.axvline(data.accept_mean, color="black", linestyle="--",
                   label=f"accept bar {data.accept_mean:g}")
    ax.set_xlabel("panel mean")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    handles, labels = fig.axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper center", ncols=min(n_models, 5),
               fontsize=8, title="reviewer model")
    section.figure = _svg(fig)
    header = ["reviewer model", "reviews", *data.criteria]
    table = []
    for r, model in enumerate(data.reviewers):
        reviewed = ~np.isnan(data.review_means[:, r])
        cells = [f"{np.nanmean(data.scores[reviewed, r, c]):.2f} ± {np.nanstd(data.scores[reviewed, r, c]):.2f}"
                 if reviewed.any() else "-" for c in range(n_criteria)]
        table.append([model, int(reviewed.sum()), *cells])
    section.tables.append(Table(header, table))
    scored = means[~np.isnan(means)]
    above = int((scored >= data.accept_mean).sum()) if data.accept_mean is not None else 0
    section.tables.append(Table(["panel mean", "value"], [
        ["samples with a panel", len(scored)],
        ["median / mean", f"{_fmt(float(np.median(scored)) if len(scored) else None)} / "
                          f"{_fmt(float(scored.mean()) if len(scored) else None)}"],
        ["at or above the accept bar", f"{above} ({_pct(above, len(scored))})"],
        ["accept bar", _fmt(data.accept_mean, 1)],
        ["disagreement std (goes to the adjudicator above)", _fmt(data.disagreement_std, 1)],
    ]))
    return section


def agreement_section(data: RunData) -> Section:
    section = Section("agreement", "Reviewer agreement",
                      "Pearson correlation of the reviewer models' per-sample means (over the "
                      "samples both reviewed), and Krippendorff's alpha (interval) over the "
                      "panel for each criterion: 1 is perfect agreement, 0 is what chance "
                      "gives, below 0 is systematic disagreement.")
    if len(data.reviewers) < 2:
        section.notes.append("Agreement needs two reviewer models or more; this run has "
                             f"{len(data.reviewers)}.")
        return section
    corr = pairwise_correlation(data.review_means)
    alphas = [interval_alpha(data.scores[:, :, c]) for c in range(len(data.criteria))]
    overall = interval_alpha(data.review_means)
    fig = _figure(11, 3.8)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.3])
    k = len(data.reviewers)
    image = left.imshow(np.nan_to_num(corr, nan=0.0), vmin=-1, vmax=1, cmap="RdBu")
    left.set_xticks(range(k), [_short(m, 16) for m in data.reviewers], rotation=30, ha="right",
                    fontsize=8)
    left.set_yticks(range(k), [_short(m, 16) for m in data.reviewers], fontsize=8)
    for a in range(k):
        for b in range(k):
            dark = np.isfinite(corr[a, b]) and abs(corr[a, b]) > 0.5
            left.text(b, a, _fmt(corr[a, b]), ha="center", va="center", fontsize=8,
                      color="white" if dark else "black")
    left.set_title("correlation of per-sample means", fontsize=10)
    fig.colorbar(image, ax=left, shrink=0.8)
    names = [*data.criteria, "panel mean"]
    values = [*alphas, overall]
    right.bar(range(len(names)), [v if v is not None else 0.0 for v in values],
              color=[_PALETTE[0]] * len(alphas) + [_PALETTE[1]])
    for x, v in enumerate(values):
        below = v is not None and v < 0
        right.text(x, v if v is not None else 0, _fmt(v), ha="center",
                   va="top" if below else "bottom", fontsize=8)
    right.axhline(0.667, color="#999", linestyle=":", label="0.667 (tentative conclusions)")
    right.axhline(0.8, color="#555", linestyle="--", label="0.8 (reliable)")
    right.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    right.set_ylim(min(-0.1, *(v for v in values if v is not None)) if any(
        v is not None for v in values) else -0.1, 1.05)
    right.set_title("Krippendorff's alpha (interval)", fontsize=10)
    right.legend(fontsize=7, loc="lower right")
    section.figure = _svg(fig)
    pairs = []
    for a in range(k):
        for b in range(a + 1, k):
            both = ~np.isnan(data.review_means[:, a]) & ~np.isnan(data.review_means[:, b])
            pairs.append([data.reviewers[a], data.reviewers[b], int(both.sum()), _fmt(corr[a, b])])
    section.tables.append(Table(["model", "model", "samples both reviewed", "correlation"], pairs))
    section.tables.append(Table(["criterion", "alpha (interval)"],
                                [[n, _fmt(v, 3)] for n, v in zip(names, values, strict=True)]))
    if any(v is None for v in values):
        section.notes.append("'-': undefined (no variation in the scores, or too few samples "
                             "reviewed by two models).")
    return section


def adjudicator_section(data: RunData) -> Section:
    section = Section("adjudicator", "The adjudicator",
                      "How often each adjudicator model was called (the panel disagreed beyond "
                      "the std threshold) and how often it overturned the panel mean: accepted "
                      "a sample whose mean was below the bar, or rejected one at or above it.")
    called = sum(t["called"] for t in data.adjudications.values())
    if not called:
        section.notes.append("The adjudicator was never called in this run.")
        return section
    models = sorted(data.adjudications)
    fig, ax = _bars_figure(len(models), 0.6, 1.2)
    y = np.arange(len(models))
    for offset, key, color in ((-0.2, "called", _ADJ), (0.2, "overturned", _REJECT)):
        values = [data.adjudications[m][key] for m in models]
        ax.barh(y + offset, values, height=0.4, color=color, label=key)
        for yy, v in zip(y, values, strict=True):
            ax.text(v, yy + offset, f" {v}", va="center", fontsize=8)
    ax.set_yticks(y, models)
    ax.margins(x=0.15)
    ax.legend(fontsize=8)
    ax.set_xlabel("samples")
    section.figure = _svg(fig)
    section.tables.append(Table(
        ["model", "called", "accepted", "rejected", "overturned the mean", "overturn rate"],
        [[m, t["called"], t["accept"], t["reject"], t["overturned"], _pct(t["overturned"], t["called"])]
         for m in models for t in (data.adjudications[m],)]))
    section.notes.append(f"Called on {called} of {data.finished} finished samples "
                         f"({_pct(called, data.finished)}).")
    return section


def outcomes_section(data: RunData) -> Section:
    section = Section("outcomes", "Acceptance, rejections, duplicates and failures",
                      "Acceptance rate along the plan (tasks in plan order, in bins), and what "
                      "the other samples ended as.")
    n = data.finished
    if not n:
        section.notes.append("No finished samples yet.")
        return section
    bins = min(50, max(1, n // 20))
    edges = np.linspace(0, n, bins + 1).astype(int)
    spans = [(a, b) for a, b in itertools.pairwise(edges.tolist()) if b > a]
    rates = [float(data.accepted[a:b].mean()) for a, b in spans]
    centers = [(a + b) / 2 for a, b in spans]
    fig = _figure(11, 6.2)
    grid = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(grid[0, :])
    ax.plot(centers, rates, marker="o", markersize=3, color=_ACCEPT)
    ax.axhline(float(data.accepted.mean()), color="#555", linestyle="--",
               label=f"overall {_pct(int(data.accepted.sum()), n)}")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel(f"finished tasks in plan order ({bins} bins of ~{n // bins})")
    ax.set_ylabel("accepted share")
    ax.legend(fontsize=8)
    for col, (title, counts, color, empty) in enumerate((
            ("rejections by reason", data.rejections, _REJECT, "no rejections"),
            ("duplicates by kind", data.duplicates, _PALETTE[1], "no duplicates"),
            ("failures by kind", data.failures, _PALETTE[7], "no failures"))):
        sub = fig.add_subplot(grid[1, col])
        _barh(sub, counts, color, empty)
        sub.set_title(title, fontsize=10)
    section.figure = _svg(fig)
    section.tables.append(Table(["state", "samples", "share"], [
        [state, data.states[state], _pct(data.states[state], n)]
        for state in ("accepted", "rejected", "failed")]))
    section.tables.append(Table(["rejected because", "samples"],
                                [[k, v] for k, v in data.rejections.most_common()]))
    section.tables.append(Table(["duplicate kind", "samples"],
                                [[k, data.duplicates.get(k, 0)]
                                 for k in ("exact copy", "near-copy", "seed copy", "paraphrase",
                                           "seed paraphrase")]))
    section.tables.append(Table(["failure kind", "tasks"], [[k, v] for k, v in data.failures.most_common()]))
    semantic = (f"{len(data.similarities)} found, cosine {min(data.similarities):.3f} to "
                f"{max(data.similarities):.3f}" if data.similarities else
                "none found (or no embedder configured: `status` and the run's log say which)")
    section.notes.append("Duplicate kinds: an exact copy has the same normalized text as an "
                         "accepted sample; a near-copy is a MinHash match (Jaccard >= the "
                         "near_dup_threshold); a seed copy repeats one of the task's few-shot "
                         "seeds. A paraphrase (of an accepted sample or of a seed) is a "
                         "semantic match: embedding cosine >= planner.semantic_threshold, "
                         f"checked after MinHash. Semantic (embedding) duplicates: {semantic}.")
    return section


def domains_section(data: RunData) -> Section:
    section = Section("domains", "Domain coverage",
                      "Samples per domain: each domain's share of the seed pool against its "
                      "share of the accepted samples. A domain far below its seed share is "
                      "thin in the data.")
    if not data.domains:
        section.notes.append("No finished samples yet.")
        return section
    seeds = data.seeds_per_domain or {}
    names = sorted(set(data.domains) | set(seeds), key=lambda d: -data.domains.get(d, Counter())["accepted"])
    accepted_total = sum(c["accepted"] for c in data.domains.values())
    seed_total = sum(seeds.values())
    shown = names[:30]
    fig, ax = _bars_figure(len(shown), 0.32, 1.2)
    y = np.arange(len(shown))[::-1]
    seed_share = [seeds.get(d, 0) / seed_total if seed_total else 0 for d in shown]
    acc_share = [data.domains.get(d, Counter())["accepted"] / accepted_total if accepted_total else 0
                 for d in shown]
    ax.barh(y + 0.2, seed_share, height=0.4, color="#8c8c8c", label="share of seeds")
    ax.barh(y - 0.2, acc_share, height=0.4, color=_ACCEPT, label="share of accepted")
    ax.set_yticks(y, [_short(d, 40) for d in shown], fontsize=8)
    ax.set_xlabel("share")
    ax.legend(fontsize=8)
    section.figure = _svg(fig)
    section.tables.append(Table(
        ["domain", "seeds", "finished", "accepted", "acceptance", "share of accepted"],
        [[d, seeds.get(d, "-") if data.seeds_per_domain is not None else "-",
          sum(data.domains.get(d, Counter()).values()), data.domains.get(d, Counter())["accepted"],
          _pct(data.domains.get(d, Counter())["accepted"], sum(data.domains.get(d, Counter()).values())),
          _pct(data.domains.get(d, Counter())["accepted"], accepted_total)] for d in names]))
    if data.seeds_per_domain is None:
        section.notes.append("seeds.sqlite is missing from the run directory: seed counts are "
                             "not shown (a resume rebuilds it).")
    if len(names) > len(shown):
        section.notes.append(f"The figure shows the {len(shown)} domains with the most accepted "
                             f"samples; the table lists all {len(names)}.")
    return section


def _quantiles(values: npt.NDArray[np.float64]) -> list[str]:
    values = values[~np.isnan(values)]
    if not len(values):
        return ["-"] * 4
    return [str(len(values)), *(f"{q:.0f}" for q in np.percentile(values, [50, 90, 99]))]


def lengths_section(data: RunData) -> Section:
    section = Section("lengths", "Lengths of instructions and responses",
                      f"Estimated tokens (characters / {CHARS_PER_TOKEN}: the journal keeps no "
                      "token count per field), accepted against the rest.")
    has_text = ~np.isnan(data.instruction_tokens)
    if not has_text.any():
        section.notes.append("No generated samples yet.")
        return section
    fig = _figure(11, 3.2)
    axes = fig.subplots(1, 2)
    table = []
    for ax, name, values in ((axes[0], "instruction", data.instruction_tokens),
                             (axes[1], "response", data.response_tokens)):
        present = values[has_text]
        top = max(float(np.percentile(present, 99.5)), 1.0)
        bins = np.linspace(0, top, 41)
        for mask, label, color in ((data.accepted & has_text, "accepted", _ACCEPT),
                                   (~data.accepted & has_text, "not accepted", _REJECT)):
            chosen = np.clip(values[mask], 0, top)
            if len(chosen):
                ax.hist(chosen, bins=bins, alpha=0.6, color=color, label=label, density=True)
            table.append([name, label, *_quantiles(values[mask])])
        ax.set_title(f"{name} (estimated tokens)", fontsize=10)
        ax.set_xlabel("tokens")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    section.figure = _svg(fig)
    section.tables.append(Table(["field", "of the samples", "count", "median", "p90", "p99"], table))
    return section


def cost_section(data: RunData) -> Section:
    section = Section("cost", "Tokens and cost per role and model",
                      "Every journaled call of the run (earlier sessions included), as `status` "
                      "counts them; cost at the configured prices.")
    if not data.tokens:
        section.notes.append("No calls journaled yet.")
        return section
    labels = [f"{role} / {model}" for role, model, *_ in data.tokens]
    fig, ax = _bars_figure(len(labels), 0.45, 1.2)
    y = np.arange(len(labels))[::-1]
    prompt = np.array([t_in or 0 for *_, t_in, _ in data.tokens], dtype=float)
    completion = np.array([t_out or 0 for *_, t_out in data.tokens], dtype=float)
    ax.barh(y, prompt, color=_PALETTE[0], label="prompt")
    ax.barh(y, completion, left=prompt, color=_PALETTE[1], label="completion")
    ax.set_yticks(y, [_short(label, 48) for label in labels], fontsize=8)
    ax.set_xlabel("tokens")
    ax.legend(fontsize=8)
    section.figure = _svg(fig)
    rows: list[Row] = []
    priced = any(a or b for a, b in data.prices.values())
    for role, model, calls, t_in, t_out in data.tokens:
        p_in, p_out = data.prices.get(model, (0.0, 0.0))
        cost = ((t_in or 0) * p_in + (t_out or 0) * p_out) / 1e6
        rows.append([role, model, calls, t_in or 0, t_out or 0, f"${cost:.4f}" if priced else "-"])
    total = data.cost()
    rows.append(["total", "", sum(r[2] for r in data.tokens), int(prompt.sum()), int(completion.sum()),
                 f"${total:.4f}" if total is not None else "-"])
    section.tables.append(Table(["role", "model", "calls", "prompt tokens", "completion tokens",
                                 "cost"], rows))
    if not priced:
        section.notes.append("No prices are configured (price_in / price_out per endpoint): "
                             "cost is not computed.")
    return section


def endpoints_section(data: RunData) -> Section:
    section = Section("endpoints", "Calls, retries, 429s and latency per endpoint",
                      "Journaled calls (successful ones: a failed call leaves no row) with the "
                      "attempts they needed, and the latency of their successful attempt.")
    if not data.endpoint_calls:
        section.notes.append("No calls journaled yet.")
        return section
    names = sorted(data.endpoint_calls)
    fig, ax = _bars_figure(len(names), 0.5, 1.4)
    series = [np.asarray(data.endpoint_calls[n].latencies) for n in names]
    # Percentile boxes, not every point: the figure stays small at millions of calls.
    stats = []
    for label, values in zip(names, series, strict=True):
        q = np.percentile(values, [1, 25, 50, 75, 99]) if len(values) else np.zeros(5)
        stats.append({"label": _short(label, 48), "whislo": q[0], "q1": q[1], "med": q[2],
                      "q3": q[3], "whishi": q[4], "fliers": []})
    ax.bxp(stats, orientation="horizontal", showfliers=False)
    ax.set_xlabel("latency of the successful attempt, s (box: p25-p75, whiskers: p1-p99)")
    ax.tick_params(axis="y", labelsize=8)
    section.figure = _svg(fig)
    session = {str(e.get("endpoint")): e for e in data.endpoint_session}
    rows: list[Row] = []
    for name, values in zip(names, series, strict=True):
        tally = data.endpoint_calls[name]
        latest = session.get(name, {})
        p50, p90, p99 = (np.percentile(values, [50, 90, 99]) if len(values) else (np.nan,) * 3)
        rows.append([name, tally.calls, tally.retried_calls, tally.extra_attempts,
                     latest.get("rate_limited", "-"), latest.get("timeouts", "-"),
                     latest.get("failed", "-"), _fmt(float(p50)), _fmt(float(p90)), _fmt(float(p99))])
    section.tables.append(Table(
        ["endpoint", "calls", "retried calls", "attempts lost before a success",
         "429s*", "timeouts*", "failed attempts*", "p50 s", "p90 s", "p99 s"], rows))
    section.notes.append("* 429s, timeouts and failed attempts are not journaled per call: they "
                         "come from the endpoint statistics of the latest session, which the "
                         "run records every few seconds. Latency of failed attempts is not "
                         "recorded.")
    return section


def sections(data: RunData) -> list[Section]:
    return [scores_section(data), agreement_section(data), adjudicator_section(data),
            outcomes_section(data), domains_section(data), lengths_section(data),
            cost_section(data), endpoints_section(data)]
