"""Result plots in the form a paper would print them.

    learning curves   one figure, train loss and test accuracy side by side; every train block starts at
                      epoch 1 on the same axes (blocks overlaid, one colour each; networks by line style),
                      trained networks only (a frozen teacher's flat line says nothing), legend outside
    Xross             one figure, every block's heatmap side by side on one colour scale from chance to
                      100%, values printed, each panel named after its block (Independent / DML crosses
                      at chance next to XML's is the point of the XML paper's table)
    acc vs params     only when the paths' parameter counts differ (equal counts make a vertical line of
                      dots); every point labelled with its `>>` name, the Pareto front as a step line
    compare           learning curves of several runs, one column per train block, shared axes

matplotlib is optional: it is imported lazily, and without it every function returns None.
Figures are drawn with the object API on an Agg canvas, so the global pyplot backend is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_learning_curves", "plot_compare_curves", "plot_xross", "plot_xross_heatmap",
           "plot_acc_vs_params", "path_name"]

_STYLES = ["-", "--", ":", "-."]
_MARKERS = ["o", "s", "^", "D", "v", "P"]


def _figure(width: float, height: float, nrows: int = 1, ncols: int = 1, **kw: Any) -> tuple[Any, Any] | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def path_name(row: Mapping[str, Any]) -> str:
    """`net1>>net2` for a crossed path (the column name of the results table), `net1` for a network."""
    nets = list(row.get("networks") or [])
    if nets and len(set(nets)) == 1:
        return nets[0]
    return ">>".join(nets) if nets else str(row.get("label") or row.get("path"))


def _xross_item(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Accept an xross item or a block's evaluation (its first xross item)."""
    if "rows" in result and result.get("kind", "xross") == "xross":
        return result
    for item in result.get("items", []):
        if item.get("kind") == "xross" and item.get("rows"):
            return item
    return None


# ---- learning curves ----

def _series(rows: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """(block, network) -> metric -> [(epoch, value)], trained networks only."""
    out: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for r in rows:
        if "epoch" not in r or not r.get("trained", True):
            continue
        key = (str(r.get("stage", "")), str(r.get("network", "")))
        for metric in ("train_loss", "test_acc", "train_acc"):
            if r.get(metric) is not None:
                out.setdefault(key, {}).setdefault(metric, []).append((int(r["epoch"]), float(r[metric])))
    for metrics in out.values():
        for pts in metrics.values():
            pts.sort()
    return out


def _draw_curves(ax_loss: Any, ax_acc: Any, series: Mapping[tuple[str, str], Mapping[str, list]],
                 color_of: Mapping[str, str], style_key: int, label_of) -> None:
    """Lines of `series` on the loss and accuracy axes; colour by one key part, line style by the other."""
    styles: dict[str, int] = {}
    for key, metrics in series.items():
        colour = color_of[key[1 - style_key]]
        i = styles.setdefault(key[style_key], len(styles))
        for ax, metric, scale in ((ax_loss, "train_loss", 1.0), (ax_acc, "test_acc", 100.0),
                                  (ax_acc, "train_acc", 100.0)):
            pts = metrics.get(metric, [])
            if pts:  # training accuracy (`eval_train`): thin and unlabelled beside the test curve
                train = metric == "train_acc"
                ax.plot([e for e, _ in pts], [v * scale for _, v in pts], color=colour,
                        linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)] if len(pts) < 25
                        and not train else None, markersize=3.5, linewidth=0.8 if train else None,
                        alpha=0.6 if train else None, label=None if train else label_of(key))


def _finish_curve_axes(axes: list[Any], max_epoch: int) -> None:
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.set_xlim(1 - 0.2, max(max_epoch, 2) + 0.2)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch")


def plot_learning_curves(metrics: Iterable[Mapping[str, Any]], out_png: str | Path,
                         title: str = "Learning curves") -> Path | None:
    """Train loss and test accuracy per epoch of every trained network, every block from epoch 1."""
    series = _series(metrics)
    if not series:
        return None
    made = _figure(10, 3.8, 1, 2)
    if made is None:
        return None
    fig, axes = made
    ax_loss, ax_acc = axes[0]
    blocks = list(dict.fromkeys(b for b, _ in series))
    colors = {b: f"C{i % 10}" for i, b in enumerate(blocks)}
    _draw_curves(ax_loss, ax_acc, series, colors, 1, lambda k: f"{k[0]}: {k[1]}" if len(blocks) > 1 else k[1])
    _finish_curve_axes([ax_loss, ax_acc], max(e for m in series.values() for p in m.values() for e, _ in p))
    ax_loss.set(title="Train loss", ylabel="loss")
    ax_acc.set(title="Test accuracy", ylabel="top-1 accuracy (%)")
    handles, labels = ax_loss.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8, title="train block: network")
    fig.suptitle(title)
    return _save(fig, out_png)


def plot_compare_curves(runs: Mapping[str, Iterable[Mapping[str, Any]]], out_png: str | Path,
                        title: str = "Learning curves of the compared runs") -> Path | None:
    """Several runs: one column per train block (shared axes), one colour per run, networks by line style."""
    per_run = {label: _series(rows) for label, rows in runs.items()}
    blocks = list(dict.fromkeys(b for s in per_run.values() for b, _ in s))
    if not blocks:
        return None
    made = _figure(3.6 * len(blocks) + 2.5, 6.4, 2, len(blocks), sharex=True, sharey="row")
    if made is None:
        return None
    fig, axes = made
    colors = {label: f"C{i % 10}" for i, label in enumerate(per_run)}
    top = 1
    for j, block in enumerate(blocks):
        for label, series in per_run.items():
            mine = {(label, net): m for (b, net), m in series.items() if b == block}
            _draw_curves(axes[0][j], axes[1][j], mine, colors, 1, lambda k: f"{k[0]}: {k[1]}")
            top = max([top] + [e for m in mine.values() for p in m.values() for e, _ in p])
        axes[0][j].set_title(block)
    _finish_curve_axes([ax for row in axes for ax in row], top)
    axes[0][0].set_ylabel("train loss")
    axes[1][0].set_ylabel("test top-1 accuracy (%)")
    seen: dict[str, Any] = {}
    for ax in axes[0]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    fig.legend(list(seen.values()), list(seen), loc="outside right upper", fontsize=8, title="run: network")
    fig.suptitle(title)
    return _save(fig, out_png)


# ---- Xross ----

def _grid(item: Mapping[str, Any]) -> tuple[list[str], Any]:
    import numpy as np

    nets = list(item.get("networks", [])) or sorted({n for r in item["rows"] for n in r["networks"]})
    grid = np.full((len(nets), len(nets)), np.nan)
    for r in item["rows"]:
        a, b = r["networks"]
        if r.get("accuracy") is not None and a in nets and b in nets:
            grid[nets.index(a), nets.index(b)] = 100.0 * r["accuracy"]
    return nets, grid


def plot_xross(blocks: Mapping[str, Mapping[str, Any]], out_png: str | Path, chance: float = 0.0,
               title: str = "Xross accuracy (%)") -> Path | None:
    """Every block's Xross result side by side on one colour scale (chance..100%), values printed.

    Two parts: a heatmap per block (rows: the network the first part comes from, columns: the second
    part's). More parts: a bar per combination, the bars of all blocks on the same accuracy axis.
    """
    items = {b: i for b, i in ((b, _xross_item(r)) for b, r in blocks.items()) if i is not None}
    if not items:
        return None
    first = next(iter(items.values()))
    parts = list(first.get("parts", []))
    if len(parts) == 2:
        return _xross_heatmaps(items, out_png, chance, title, parts)
    return _xross_bars(items, out_png, chance, title, parts)


def _xross_heatmaps(items: Mapping[str, Mapping[str, Any]], out_png: str | Path, chance: float, title: str,
                    parts: list[str]) -> Path | None:
    import numpy as np

    n = max(len(_grid(i)[0]) for i in items.values())
    made = _figure(1.2 + (1.0 + 0.95 * n) * len(items), 1.5 + 0.95 * n, 1, len(items))
    if made is None:
        return None
    fig, axes = made
    vmin, vmax = 100.0 * chance, 100.0
    image = None
    for ax, (block, item) in zip(axes[0], items.items()):
        nets, grid = _grid(item)
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=vmin, vmax=vmax)
        for i in range(len(nets)):
            for j in range(len(nets)):
                v = grid[i, j]
                light = np.isnan(v) or v > vmin + 0.6 * (vmax - vmin)
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if light else "white")
        ax.set_xticks(range(len(nets)), nets)
        ax.set_yticks(range(len(nets)), nets)
        ax.set_xlabel(f"{parts[1]} from")
        ax.set_ylabel(f"{parts[0]} from")
        ax.set_title(block)
    fig.colorbar(image, ax=list(axes[0]), label=f"top-1 accuracy (%), {vmin:.0f} = chance", shrink=0.9)
    fig.suptitle(title)
    return _save(fig, out_png)


def _xross_bars(items: Mapping[str, Mapping[str, Any]], out_png: str | Path, chance: float, title: str,
                parts: list[str]) -> Path | None:
    rows_max = max(len(i["rows"]) for i in items.values())
    made = _figure(1.5 + 3.6 * len(items), 1.4 + 0.3 * rows_max, 1, len(items), sharex=True)
    if made is None:
        return None
    fig, axes = made
    for j, (ax, (block, item)) in enumerate(zip(axes[0], items.items())):
        rows = list(item["rows"])
        values = [100.0 * r["accuracy"] if r.get("accuracy") is not None else 0.0 for r in rows]
        ax.barh(range(len(rows)), values, color=[f"C{j % 10}" if r.get("accuracy") is not None else "0.8"
                                                 for r in rows])
        for i, (v, r) in enumerate(zip(values, rows)):
            ax.text(v, i, f" {v:.1f}" if r.get("accuracy") is not None else " n/a", va="center", fontsize=7)
        ax.set_yticks(range(len(rows)), [path_name(r) for r in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 110)
        ax.axvline(100.0 * chance, color="0.4", linewidth=0.8, linestyle="--")
        ax.set_xlabel("top-1 accuracy (%)")
        ax.set_title(block)
    fig.suptitle(f"{title}\nparts {' > '.join(parts)}; dashed line = chance", fontsize=10)
    return _save(fig, out_png)


def plot_xross_heatmap(xross_result: Mapping[str, Any], out_png: str | Path, chance: float = 0.0) -> Path | None:
    """One block's Xross result (see plot_xross)."""
    return plot_xross({"xross": xross_result}, out_png, chance)


def _label_points(ax: Any, xs: list[float], ys: list[float], labels: list[str], size: float = 7.0) -> None:
    """Name every point; a label that would cover an earlier one moves up, with a line back to its point.

    Text boxes are estimated in axes fractions from the font size (7 pt is about 0.6 of its size per
    character), which is enough to keep dozens of Xross paths legible without another dependency.
    """
    if not xs:
        return
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    ax.set_xlim(x0 - 0.05 * span_x, x1 + 0.25 * span_x)
    ax.set_ylim(y0 - 0.08 * span_y, y1 + 0.12 * span_y)
    width_in, height_in = ax.figure.get_size_inches()
    char_w = size * 0.6 / 72 / (0.8 * width_in)     # one character, in axes fractions
    line_h = size * 1.3 / 72 / (0.8 * height_in)
    placed: list[tuple[float, float, float]] = []    # (x, y, width) in axes fractions
    for i in sorted(range(len(xs)), key=lambda i: (ys[i], xs[i])):
        fx = (xs[i] - (x0 - 0.05 * span_x)) / (1.3 * span_x) + 0.01
        fy = (ys[i] - (y0 - 0.08 * span_y)) / (1.2 * span_y) + 0.01
        w = char_w * len(labels[i])
        ty = fy
        while any(abs(ty - py) < line_h and fx < px + pw and px < fx + w for px, py, pw in placed):
            ty += line_h
        placed.append((fx, ty, w))
        moved = ty - fy > line_h / 2
        ax.annotate(labels[i], (xs[i], ys[i]), xytext=(fx, ty), textcoords="axes fraction", fontsize=size,
                    arrowprops={"arrowstyle": "-", "color": "0.6", "lw": 0.5} if moved else None)


def plot_acc_vs_params(xross_result: Mapping[str, Any], out_png: str | Path,
                       title: str = "Accuracy vs parameters") -> Path | None:
    """Every path as a point (#params, accuracy) labelled with its `>>` name, and the Pareto front.

    None when every path has the same parameter count: such a plot is a column of dots.
    """
    from xdsl.eval.dynamic import pareto_front

    item = _xross_item(xross_result)
    if item is None:
        return None
    rows = [r for r in item.get("rows", []) if r.get("accuracy") is not None and r.get("params") is not None]
    if len({r["params"] for r in rows}) < 2:
        return None
    made = _figure(6.5 + 0.08 * len(rows), 4.5 + 0.08 * len(rows))
    if made is None:
        return None
    fig, axes = made
    ax = axes[0][0]
    top = max(r["params"] for r in rows)
    scale, unit = (1e6, "millions") if top >= 1e6 else (1e3, "thousands") if top >= 1e3 else (1.0, "")
    xs = [r["params"] / scale for r in rows]
    ys = [100.0 * r["accuracy"] for r in rows]
    ax.scatter(xs, ys, color="C0", zorder=3)
    _label_points(ax, xs, ys, [path_name(r) for r in rows])
    front = pareto_front(rows)
    if front:
        ax.step([r["params"] / scale for r in front], [100.0 * r["accuracy"] for r in front], where="post",
                color="C3", linewidth=1.2, label="Pareto front", zorder=2)
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(f"parameters ({unit})" if unit else "parameters")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, out_png)
