"""`gra-async report`: the agreement statistics by hand, the page of a real fake-server run,
and the same page in a real browser (marker `browser`)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import gra_async
from gra_async.cli import main
from gra_async.quality import interval_alpha, pairwise_correlation
from gra_async.store import Journal, SampleRecord

from .test_pipeline import fixed_team, review, synthesize

nan = np.nan


class TestAlpha:
    def test_two_coders_by_hand(self) -> None:
        """Units (1,1), (2,3), (3,3); n = 6 pairable values.
        D_o = (0 + 2 + 0) / 6 = 1/3 (each unit: both ordered pairs, over m - 1 = 1).
        D_e = 2 (6 * 33 - 13^2) / (6 * 5) = 58/30 over the values 1,1,2,3,3,3.
        alpha = 1 - (1/3) / (58/30) = 24/29."""
        got = interval_alpha(np.array([[1, 1], [2, 3], [3, 3]], dtype=float))
        assert got == pytest.approx(24 / 29)

    def test_krippendorffs_published_example(self) -> None:
        """Krippendorff (2011), "Computing Krippendorff's alpha-reliability": 4 coders, 12
        units, missing values; alpha interval = 0.849."""
        a = [1, 2, 3, 3, 2, 1, 4, 1, 2, nan, nan, nan]
        b = [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, nan, 3]
        c = [nan, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, nan]
        d = [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, nan]
        assert interval_alpha(np.array([a, b, c, d]).T) == pytest.approx(0.849, abs=5e-4)

    def test_perfect_agreement_and_the_undefined_cases(self) -> None:
        assert interval_alpha(np.array([[1, 1], [5, 5], [9, 9]], dtype=float)) == pytest.approx(1.0)
        assert interval_alpha(np.array([[4, 4], [4, 4]], dtype=float)) is None  # no variation
        assert interval_alpha(np.array([[1, nan], [nan, 2]])) is None  # nothing pairable

    def test_correlation_over_shared_samples_only(self) -> None:
        ratings = np.array([[1, 2, 9], [2, 4, nan], [3, 6, 1], [4, 8, nan], [5, nan, 5]],
                           dtype=float)
        corr = pairwise_correlation(ratings)
        assert corr[0, 1] == pytest.approx(1.0)  # rows 0-3: b = 2a
        assert corr[0, 2] == pytest.approx(np.corrcoef([1, 3, 5], [9, 1, 5])[0, 1])
        assert np.isnan(pairwise_correlation(ratings, min_overlap=4)[0, 2])


def figures(page: str) -> list[bytes]:
    return [base64.b64decode(uri) for uri in
            re.findall(r'<img class="figure"[^>]* src="data:image/svg\+xml;base64,([^"]+)"', page)]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run against the fake server: rev-b agrees high, rev-c scores at random,
    so the gate, the adjudicator and the agreement statistics all have work."""
    from .conftest import start_fake_server

    run_dir = tmp_path_factory.mktemp("run")
    server = start_fake_server(latency=0.0, rules=[{"model": "rev-b", "content": review(8)}])
    try:
        synthesize(run_dir, endpoints=fixed_team(server), target=12, run={"max_tasks": 40})
    finally:
        server.close()
    return run_dir


class TestPage:
    def test_the_page_holds_every_section_and_nothing_from_the_network(
        self, fake_run: Path, tmp_path: Path,
    ) -> None:
        written = gra_async.write_report(fake_run, tmp_path / "r.html")
        page = written.path.read_text()
        for key in ("scores", "agreement", "adjudicator", "outcomes", "domains", "lengths",
                    "cost", "endpoints"):
            assert f'<section id="{key}">' in page, key
        assert written.figures == len(figures(page)) == 8
        for svg in figures(page):
            assert b"<svg" in svg[:2000] and svg.rstrip().endswith(b"</svg>")
        # Self-contained: no script, no stylesheet or image fetched from anywhere.
        assert "<script" not in page and "<link" not in page
        assert not re.search(r'(src|href)="(?!data:|#)', page)
        samples = list(gra_async.read_samples(fake_run, include_all=True))
        assert written.samples == len(samples)
        accepted = sum(s.decision == "accept" for s in samples)
        assert f"<b>{accepted}</b>accepted" in page
        adjudicated = sum(s.adjudication is not None for s in samples)
        assert (f"Called on {adjudicated} of {len(samples)}" in page) == bool(adjudicated)

    def test_while_the_run_writes(self, tmp_path: Path) -> None:
        """The report reads committed rows through a read-only connection: a journal with
        its writer running (and its lock held) is reported on, and keeps working after."""
        async def go() -> None:
            journal = Journal.open(tmp_path / "live", {"gate": {"criteria": ["clarity"],
                                                                "accept_mean": 7.0}})
            journal.start()
            for i in range(30):
                scores = [{"model": m, "scores": {"clarity": 5 + (i + k) % 5}, "mean": 5.0,
                           "feedback": ""} for k, m in enumerate(("a", "b"))]
                journal.record_sample(SampleRecord(f"r1-{i}", 1, i, "accepted", "d", (),
                                                   {"decision": "accept", "reviews": scores,
                                                    "mean": 7.5, "std": 0.5,
                                                    "instruction": "q", "response": "a"}))
            await journal.flush()
            written = await asyncio.to_thread(gra_async.write_report, tmp_path / "live")
            assert written.samples == 30 and written.path == tmp_path / "live" / "report.html"
            journal.record_sample(SampleRecord("r1-30", 1, 30, "rejected", "d", (),
                                               {"decision": "reject"}))
            await journal.close()

        asyncio.run(go())

    def test_cli(self, fake_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        assert main(["report", "--run-dir", str(fake_run), "--out", str(tmp_path / "x.html")]) == 0
        assert capsys.readouterr().out.startswith(f"wrote {tmp_path / 'x.html'} (")
        assert main(["report", "--run-dir", str(tmp_path / "nothing")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "no journal.sqlite here" in err

    def test_without_matplotlib_one_line_says_what_to_install(
        self, fake_run: Path, tmp_path: Path,
    ) -> None:
        """An environment where matplotlib does not import (a package that raises
        ImportError shadows it), run as a user runs the command."""
        shadow = tmp_path / "shadow" / "matplotlib"
        shadow.mkdir(parents=True)
        (shadow / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(shadow.parent), *filter(None, [os.environ.get("PYTHONPATH")])])}
        done = subprocess.run([sys.executable, "-m", "gra_async", "report", "--run-dir",
                               str(fake_run)], capture_output=True, text=True, env=env, check=False)
        assert done.returncode == 2
        assert done.stderr == ("error: the report draws its figures with matplotlib, which is not "
                               "installed (pip install 'gra-async[report]')\n")


# --- a real browser ----------------------------------------------------------------------

_CHECK = """<script>
window.addEventListener('load', () => {
  const figs = [...document.querySelectorAll('img.figure')].map(
    i => [i.complete, i.naturalWidth, i.naturalHeight, i.getBoundingClientRect().width]);
  document.body.setAttribute('data-figures', JSON.stringify(figs));
});
</script>"""


def _chromium() -> str | None:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("GRA_REQUIRE_BROWSER") == "1":
        pytest.fail("GRA_REQUIRE_BROWSER=1 but no chromium on PATH (apt-get install chromium)")
    return found


def _chrome(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.browser
def test_the_report_renders_in_chromium(fake_run: Path, tmp_path: Path) -> None:
    """Debian's Chromium renders the page: the screenshot is not blank and every figure
    decoded to a non-empty image laid out at a real width."""
    binary = _chromium()
    if binary is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; GRA_REQUIRE_BROWSER=1 makes it required)")
    from PIL import Image  # matplotlib's own dependency, so present with the report extra

    written = gra_async.write_report(fake_run, tmp_path / "report.html")
    shot = tmp_path / "report.png"
    done = _chrome(binary, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,3000",
                   written.path.as_uri())
    assert shot.exists(), done.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # a blank page has one or two

    checked = tmp_path / "checked.html"
    checked.write_text(written.path.read_text().replace("</body>", _CHECK + "</body>"))
    done = _chrome(binary, tmp_path / "profile2", "--virtual-time-budget=10000", "--dump-dom",
                   checked.as_uri())
    match = re.search(r'data-figures="([^"]*)"', done.stdout)
    assert match, done.stderr[-2000:]
    figs = json.loads(match.group(1).replace("&quot;", '"'))
    assert len(figs) == written.figures == 8
    for complete, width, height, shown in figs:
        assert complete and width > 100 and height > 50 and shown > 100
    if os.environ.get("GRA_KEEP_SCREENSHOT"):
        shutil.copy(shot, os.environ["GRA_KEEP_SCREENSHOT"])
