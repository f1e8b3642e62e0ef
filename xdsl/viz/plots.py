"""Result plots: learning curves, the Xross accuracy heatmap, accuracy vs #params with its Pareto front.

matplotlib is optional: it is imported lazily, and without it every function returns None.
Figures are drawn with the object API on an Agg canvas, so the global pyplot backend is untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["plot_learning_curves", "plot_xross_heatmap", "plot_acc_vs_params"]


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any] | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig: Any, out_png: str | Path) -> Path:
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out)
    return out


def _xross_item(result: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """Accept an xross item or a whole results dict (its first xross item)."""
    if "rows" in result:
        return result
    for item in result.get("items", []):
        if item.get("kind") == "xross" and item.get("rows"):
            return item
    return None


def plot_learning_curves(metrics: Iterable[Mapping[str, Any]], out_png: str | Path) -> Path | None:
    """Loss (left) and accuracy (right) per epoch, one line per stage/network; stages follow each other.

    Rows look like {"stage": "xml", "epoch": 3, "network": "net1", "train_loss": .., "test_acc": ..};
    test_loss / train_acc are drawn dashed when present.
    """
    rows = [dict(r) for r in metrics if "epoch" in r]
    made = _figure(11, 4, 2)
    if made is None:
        return None
    fig, (ax_loss, ax_acc) = made
    stages: list[str] = []
    last_epoch: dict[str, int] = {}
    for r in rows:
        s = str(r.get("stage", ""))
        if s not in stages:
            stages.append(s)
        last_epoch[s] = max(last_epoch.get(s, 0), int(r["epoch"]))
    offset, start = 0, {}
    for s in stages:
        start[s] = offset
        offset += last_epoch[s]
    series: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    for r in rows:
        s, net = str(r.get("stage", "")), str(r.get("network", ""))
        for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
            if r.get(key) is not None:
                series.setdefault((s, net, key), []).append((start[s] + int(r["epoch"]), float(r[key])))
    colors: dict[tuple[str, str], str] = {}
    for (s, net, key), pts in series.items():
        pts.sort()
        color = colors.setdefault((s, net), f"C{len(colors) % 10}")
        label = "/".join(x for x in ((s if len(stages) > 1 else ""), net) if x) or key
        ax = ax_loss if key.endswith("loss") else ax_acc
        ys = [y * 100.0 for _, y in pts] if key.endswith("acc") else [y for _, y in pts]
        primary = key in ("train_loss", "test_acc")
        ax.plot([x for x, _ in pts], ys, color=color, linestyle="-" if primary else "--",
                marker="." if len(pts) < 30 else None, label=f"{label} ({key.split('_')[0]})")
    for s in stages[1:]:
        for ax in (ax_loss, ax_acc):
            ax.axvline(start[s] + 0.5, color="0.7", linewidth=0.8)
    ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")
    ax_acc.set(title="accuracy", xlabel="epoch", ylabel="accuracy (%)")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, out_png)


def plot_xross_heatmap(xross_result: Mapping[str, Any], out_png: str | Path) -> Path | None:
    """2 parts: up-network rows x down-network columns, annotated accuracies; more parts: a bar chart."""
    item = _xross_item(xross_result)
    if item is None:
        return None
    rows = list(item.get("rows", []))
    parts = list(item.get("parts", []))
    nets = list(item.get("networks", [])) or sorted({n for r in rows for n in r["networks"]})
    if len(parts) == 2:
        made = _figure(1.6 + 1.3 * len(nets), 1.2 + 1.1 * len(nets))
        if made is None:
            return None
        fig, ax = made
        import numpy as np

        grid = np.full((len(nets), len(nets)), np.nan)
        for r in rows:
            a, b = r["networks"]
            if r.get("accuracy") is not None and a in nets and b in nets:
                grid[nets.index(a), nets.index(b)] = 100.0 * r["accuracy"]
        image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
        fig.colorbar(image, ax=ax, label="accuracy (%)")
        finite = grid[np.isfinite(grid)]
        mid = float(finite.mean()) if finite.size else 0.0
        for i in range(len(nets)):
            for j in range(len(nets)):
                v = grid[i, j]
                ax.text(j, i, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=9,
                        color="black" if np.isnan(v) or v > mid else "white")
        ax.set_xticks(range(len(nets)), nets)
        ax.set_yticks(range(len(nets)), nets)
        ax.set_xlabel(f"{parts[1]} from")
        ax.set_ylabel(f"{parts[0]} from")
        ax.set_title("Xross accuracy")
        return _save(fig, out_png)
    made = _figure(7, 1.0 + 0.35 * max(1, len(rows)))
    if made is None:
        return None
    fig, ax = made
    labels = [" > ".join(r["networks"]) for r in rows]
    values = [100.0 * r["accuracy"] if r.get("accuracy") is not None else 0.0 for r in rows]
    ax.barh(range(len(rows)), values, color=["C0" if r.get("accuracy") is not None else "0.8" for r in rows])
    for i, (v, r) in enumerate(zip(values, rows)):
        ax.text(v, i, f" {v:.2f}" if r.get("accuracy") is not None else " n/a", va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("accuracy (%)")
    ax.set_title("Xross accuracy (" + " > ".join(parts) + ")")
    return _save(fig, out_png)


def plot_acc_vs_params(xross_result: Mapping[str, Any], out_png: str | Path) -> Path | None:
    """Every combination as a labelled point (#params, accuracy) and the Pareto front as a step line."""
    from xdsl.eval.dynamic import pareto_front

    item = _xross_item(xross_result)
    if item is None:
        return None
    rows = [r for r in item.get("rows", []) if r.get("accuracy") is not None and r.get("params") is not None]
    made = _figure(7, 5)
    if made is None:
        return None
    fig, ax = made
    top = max((r["params"] for r in rows), default=0)
    scale, unit = (1e6, "millions") if top >= 1e6 else (1e3, "thousands") if top >= 1e3 else (1.0, "")
    xs = [r["params"] / scale for r in rows]
    ys = [100.0 * r["accuracy"] for r in rows]
    ax.scatter(xs, ys, color="C0", zorder=3)
    for x, y, r in zip(xs, ys, rows):
        label = " > ".join(r.get("networks") or [str(r.get("label") or r.get("path"))])
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front(rows)
    if front:
        ax.step([r["params"] / scale for r in front], [100.0 * r["accuracy"] for r in front], where="post",
                color="C3", linewidth=1.2, marker="o", markerfacecolor="none", markersize=9,
                label="Pareto front", zorder=2)
        ax.legend(fontsize=8)
    ax.set_xlabel(f"#params ({unit})" if unit else "#params")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Param - Acc")
    ax.grid(alpha=0.3)
    return _save(fig, out_png)
