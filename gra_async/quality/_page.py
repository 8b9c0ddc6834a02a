"""The report page: one self-contained HTML file, its figures embedded as SVG data URIs.

No script, no stylesheet link, no font or CDN: the file reads offline and can be
attached to a dataset card as it is.
"""

from __future__ import annotations

import base64
import html
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gra_async.errors import MissingDependency, RunDirError
from gra_async.quality._data import RunData, load_run
from gra_async.quality._sections import Section, Table, sections

__all__ = ["QualityReport", "write_report"]

_STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1160px;
padding:24px;color:#222;background:#fff;line-height:1.45}
h1{font-size:1.6em;margin-bottom:0}h2{margin-top:2.2em;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;margin-top:4px}nav a{margin-right:14px}
figure{margin:12px 0}figure img{max-width:100%;height:auto;display:block}
table{border-collapse:collapse;margin:10px 0;font-size:0.88em}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}.note{color:#555;font-size:0.9em}
.cards{display:flex;gap:12px;flex-wrap:wrap;margin:16px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:1.4em}
"""


@dataclass(frozen=True, slots=True)
class QualityReport:
    """What `write_report` wrote: the file, the samples it covers, its figures."""

    path: Path
    samples: int
    figures: int
    seconds: float


def _table(table: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _section(section: Section) -> str:
    parts = [f'<section id="{section.key}"><h2>{html.escape(section.title)}</h2>',
             f"<p>{html.escape(section.summary)}</p>"]
    if section.figure is not None:
        uri = "data:image/svg+xml;base64," + base64.b64encode(section.figure).decode()
        parts.append(f'<figure><img class="figure" alt="{html.escape(section.title)}" '
                     f'src="{uri}"></figure>')
    parts += [_table(t) for t in section.tables if t.rows]
    parts += [f'<p class="note">{html.escape(n)}</p>' for n in section.notes]
    parts.append("</section>")
    return "\n".join(parts)


def render(data: RunData, parts: list[Section]) -> str:
    n = data.finished
    accepted = data.states["accepted"]
    cards = [("finished samples", n), ("accepted", accepted),
             ("acceptance", f"{100 * accepted / n:.1f}%" if n else "-"),
             ("rejected", data.states["rejected"]), ("failed", data.states["failed"]),
             ("reviewer models", len(data.reviewers))]
    cost = data.cost()
    if cost is not None:
        cards.append(("cost", f"${cost:.2f}"))
    read = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(data.read_at))
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>gra-async report: {html.escape(data.run_dir.name or str(data.run_dir))}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>Data-quality report: {html.escape(str(data.run_dir))}</h1>",
        f'<p class="meta">Read from the journal at {read}: committed rows only (a run still '
        "writing adds more). Made by gra-async.</p>",
        '<div class="cards">' + "".join(f"<div class=\"card\"><b>{html.escape(str(v))}</b>"
                                        f"{html.escape(k)}</div>" for k, v in cards) + "</div>",
        "<nav>" + "".join(f'<a href="#{p.key}">{html.escape(p.title)}</a>' for p in parts) + "</nav>",
        *(_section(p) for p in parts),
        "</body></html>",
    ])


def _matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependency(
            "the report draws its figures with matplotlib, which is not installed "
            "(pip install 'gra-async[report]')") from None


def write_report(run_dir: str | Path, out: str | Path | None = None) -> QualityReport:
    """Write the data-quality report of `run_dir` to `out` (default RUN_DIR/report.html).

    Reads the journal read-only (safe while the run writes). Raises `RunDirError` when
    `run_dir` holds no journal or `out` cannot be written, and `MissingDependency`
    without matplotlib (the `report` extra).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    path = Path(out) if out is not None else run_dir / "report.html"
    _matplotlib()
    import matplotlib

    data = load_run(run_dir)
    style: dict[Any, Any] = {"svg.hashsalt": "gra-async", "font.size": 9, "axes.spines.top": False,
             "axes.spines.right": False, "axes.titleweight": "bold"}
    with matplotlib.rc_context(style):
        parts = sections(data)
    page = render(data, parts)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise RunDirError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    return QualityReport(path, data.finished, sum(p.figure is not None for p in parts),
                         time.perf_counter() - started)
