"""report.html: one self-contained page per run directory, readable offline and mailable as one file.

It holds the results table, every block's evaluation tables, the per-term training losses, every plot
and the experiment graph (images inlined as data: URIs, no script, no network access), and the spec
that ran. It is written from the files of the run directory alone, so `write_report(dir)` can also
rebuild it for an old run.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #212529; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #dee2e6; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0 1.2em; font-size: .9em; }
th, td { border: 1px solid #dee2e6; padding: .25em .6em; }
th { background: #f1f3f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: .3em; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #e9ecef; }
figcaption { color: #495057; font-size: .9em; }
pre { background: #f8f9fa; padding: 1em; overflow-x: auto; font-size: .85em; }
.meta { color: #495057; }
"""


def _table(title: str, headers: list[str], rows: list[list[str]], numeric: set[int] | None = None,
           table_id: str | None = None) -> str:
    numeric = numeric or set()
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td{" class=num" if i in numeric else ""}>{html.escape(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><caption>{html.escape(title)}</caption><tr>{head}</tr>{body}</table>"


def _summary(results: list[dict[str, Any]]) -> str:
    from xdsl.eval.summary import best_note, summary_rows
    from xdsl.sweep.aggregate import cell_text

    columns, values = summary_rows(results)
    rows = [[block, *[cell_text(cells.get(c)) for c in columns]] for block, cells in values.items()]
    n = len(results)
    title = "Top-1 test accuracy (%)" + (f", mean ± std over {n} seeds" if n > 1 else "") + \
        f"; last epoch, {best_note(results)}"
    return _table(title, ["train block", *columns], rows, set(range(1, len(columns) + 1)), "results")


def _run_tables(results: list[dict[str, Any]]) -> list[str]:
    """Tables over the whole run (error_table: networks x methods), after the results table."""
    from xdsl.eval.summary import run_tables

    return [_table(t.title, t.headers, t.rows, t.numeric) for t in run_tables(results)]


def _image(path: Path, caption: str) -> str:
    mime = "image/svg+xml" if path.suffix == ".svg" else "image/png"
    data = base64.b64encode(path.read_bytes()).decode()
    return (f'<figure><img src="data:{mime};base64,{data}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _figures(run: Path) -> str:
    parts = []
    named = [("learning_curves.png", "Learning curves: train loss and test accuracy of the trained networks"),
             ("xross.png", "Xross accuracy of every train block, chance to 100%")]
    for name, caption in named:
        if (run / name).is_file():
            parts.append(_image(run / name, caption))
    for png in sorted(run.glob("acc_vs_params_*.png")):
        parts.append(_image(png, f"Accuracy vs parameters, block {png.stem.removeprefix('acc_vs_params_')}"))
    if (run / "graph.svg").is_file():
        parts.append(_image(run / "graph.svg", "The experiment: what every train block computes"))
    elif (run / "graph.dot").is_file():
        parts.append("<p>The experiment graph (Graphviz was not installed, so it is shown as DOT text):</p>"
                     f"<pre>{html.escape((run / 'graph.dot').read_text())}</pre>")
    return "\n".join(parts)


def _term_losses(run: Path) -> str:
    """Per block and network: the mean of each loss term over each epoch (sampled to at most 10 epochs)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return ""
    table: dict[tuple[str, str], dict[int, dict[str, float]]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row.get("terms"):
            table.setdefault((row["stage"], row["network"]), {})[int(row["epoch"])] = row["terms"]
    out = []
    for (block, net), epochs in table.items():
        shown = sorted(epochs)
        if len(shown) > 10:
            step = (len(shown) - 1) / 9
            shown = sorted({shown[round(i * step)] for i in range(10)})
        terms = list(dict.fromkeys(t for e in shown for t in epochs[e]))
        rows = [[t, *[f"{epochs[e][t]:.4f}" if t in epochs[e] else "" for e in shown]] for t in terms]
        out.append(_table(f"{block} / {net}: mean of each term over the epoch",
                          ["term", *[f"epoch {e}" for e in shown]], rows, set(range(1, len(shown) + 1))))
    return "\n".join(out)


def write_report(run: Path) -> Path | None:
    """Write `run`/report.html from the run directory's files; None when it has no results.json."""
    from xdsl.eval.tables import result_tables

    run = Path(run)
    file = run / "results.json"
    if not file.is_file():
        return None
    data = json.loads(file.read_text())
    results = data["seeds"] if "seeds" in data else [data]
    first = results[0]
    name = Path(str(first.get("spec", run.name))).stem
    body = [f"<h1>xdsl run: {html.escape(name)}</h1>",
            f'<p class="meta">run directory {html.escape(str(run.resolve()))}; seed(s) '
            f'{", ".join(str(r.get("seed")) for r in results)}; device {html.escape(str(first.get("device")))}</p>',
            "<h2>Results</h2>", _summary(results), *_run_tables(results)]
    figures = _figures(run)
    if figures:
        body += ["<h2>Figures</h2>", figures]
    if len(results) == 1:
        for block, r in first["stages"].items():
            body.append(f"<h2>Train block {html.escape(block)}</h2>")
            body += [_table(*t) for t in result_tables(r["evaluate"])]
    terms = _term_losses(run)
    if terms:
        body += ["<h2>Per-term training losses</h2>", terms]
    if len(results) > 1:
        links = "".join(f'<li><a href="seed{r["seed"]}/report.html">seed {r["seed"]}</a></li>' for r in results)
        body += ["<h2>Seeds</h2>", f"<ul>{links}</ul>"]
    if (run / "spec.xspec").is_file():
        body += ["<h2>Spec (macros expanded)</h2>", f"<pre>{html.escape((run / 'spec.xspec').read_text())}</pre>"]
    page = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>xdsl run: {html.escape(name)}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")
    out = run / "report.html"
    out.write_text(page, encoding="utf-8")
    return out
