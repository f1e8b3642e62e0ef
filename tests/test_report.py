"""report.html: one self-contained page per run directory (results, evaluation tables, per-term losses,
plots, the experiment graph, the spec), checked in Debian's headless Chromium when it is installed."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app

SPEC = """data digits(batch_size=64, train_fraction=0.2)
network net1, net2 = builtin.cnn(num_classes=10, in_channels=1, width=8)
cut net1, net2 at "layer2" into up, down
dml(net1, net2, epochs=2, optimizer=adam(lr=1e-2))
evaluate accuracy, xross(net1, net2)
"""
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("report")
    spec = home / "r.xspec"
    spec.write_text(SPEC)
    result = CliRunner().invoke(app, ["run", str(spec), "--out", str(home / "run"), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    return home / "run" / "report.html"


def test_report_is_one_self_contained_page(report: Path) -> None:
    page = report.read_text()
    assert '<table id="results">' in page and "<td>dml</td>" in page
    assert not re.search(r"(src|href)=\"(?!data:)", page)   # no file, no address: everything inline
    assert "http://" not in page and "https://" not in page and "<script" not in page
    images = re.findall(r'<img src="data:image/(png|svg\+xml);base64,', page)
    assert len(images) >= 2  # learning curves and Xross (+ the graph when Graphviz is installed)
    assert "Per-term training losses" in page and "kl(net2.up &gt;&gt; net2.down" in page
    assert "train dml {" in page  # the spec that ran


def _chromium(page: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                           "--v=0", *args, page.as_uri()], capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    """Chromium writes every console message (console.error, uncaught exceptions) as a CONSOLE log line."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (.ci/run installs Debian's `chromium` "
                                             "with apt-get when it can)")
def test_report_loads_in_headless_chromium_without_console_errors(report: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.html"
    broken.write_text("<html><body><script>console.error('x'); undefined_function();</script></body></html>")
    assert len(_console_messages(_chromium(broken, "--dump-dom").stderr)) == 2  # the check sees errors

    dom = _chromium(report, "--dump-dom")
    assert dom.returncode == 0 and _console_messages(dom.stderr) == []
    assert '<table id="results">' in dom.stdout and dom.stdout.count('<img src="data:image/') >= 2

    bare = tmp_path / "bare.html"  # the same page without its figures: what the text alone looks like
    bare.write_text(re.sub(r"<figure>.*?</figure>", "", report.read_text(), flags=re.S))
    assert _colour(_screenshot(bare, tmp_path / "bare.png")) < 0.001
    shot = _screenshot(report, tmp_path / "shot.png")
    ink = (shot.min(axis=-1) < 0.5).mean()
    assert ink > 0.01, f"the page looks empty ({ink:.3%} dark pixels)"
    assert _colour(shot) > 0.003, "no plot was drawn"


def _screenshot(page: Path, out: Path):
    import matplotlib.image

    run = _chromium(page, "--hide-scrollbars", "--window-size=1280,1800", f"--screenshot={out}")
    assert run.returncode == 0 and _console_messages(run.stderr) == []
    return matplotlib.image.imread(str(out))[..., :3]


def _colour(pixels) -> float:
    """Share of saturated pixels: the plots' lines and heatmaps (the page's text and tables are grey)."""
    return float((pixels.max(axis=-1) - pixels.min(axis=-1) > 0.25).mean())
