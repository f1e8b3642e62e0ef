"""The shape of an evaluate item: one class per item, one file per class, registered in
`xdsl/eval/items/__init__.py`. The checker reads the signature (`takes`, `keywords`,
`check_keywords`); evaluation calls the rest, in the style of a torch.fx pass:

    plan(job)            ask the shared pass over the test set for paths / ensembles / features
    compute(job)         after the pass: this process's result (items with their own passes run them here)
    merge(shards, n)     results of several processes' test shards -> one (per-sample means: exact)
    tables(result)       the result as tables (`xdsl.eval.table.Tab`)
    run_tables(result, runs)  tables over every block of the run (`error_table`), after the results table
    columns(result)      its cells in the one-line-per-train-block summary `xdsl run` ends with

Item modules import nothing above `lang` at run time (the checker imports them); they run paths
through the `Engine` they are handed.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from xdsl.eval.paths import path_label
from xdsl.eval.table import Tab
from xdsl.lang import ir

if TYPE_CHECKING:
    import torch

    from xdsl.eval.engine import Engine, Pass
    from xdsl.experiment import Experiment

__all__ = ["EvaluateItem", "PerPathItem", "Context", "Result", "SPLITS"]

SPLITS = ("test", "train")
"""What a `split=` keyword may name: the test set, or the training set without augmentation."""

Result = dict[str, Any]
"""An item's result: JSON data with at least "kind" and "title" (results.json keeps it as is)."""


@dataclass
class Context:
    """What every item of one evaluation sees."""

    exp: Experiment
    engine: Engine
    loader: Iterable            # the test batches of this process
    device: torch.device
    seed: int = 0               # makes random draws (flatness noise) reproducible
    data: Any = None            # the DataBundle: re-id query/gallery split, the plain training set
    shared: dict[str, Any] = field(default_factory=dict)   # what items of one evaluation share (features)


class EvaluateItem:
    """Base class of the evaluate items; a subclass sets the class variables and overrides the methods."""

    name: ClassVar[str]
    takes: ClassVar[Literal["paths", "networks"]] = "paths"   # what the positional arguments are
    keywords: ClassVar[dict[str, Any]] = {}                     # accepted keywords and their defaults
    min_networks: ClassVar[int] = 0                             # for takes="networks"
    per_sample: ClassVar[bool] = True   # numbers are means over test samples: shards merge exactly
    title_keywords: ClassVar[bool] = False                      # show keywords in the title

    def __init__(self, spec: ir.EvalItem, index: int, ctx: Context):
        self.spec = spec
        self.index = index          # position in the evaluate clause
        self.ctx = ctx
        self.exp = ctx.exp
        self.engine = ctx.engine
        self.program = ctx.exp.program

    # ---- checking (class level: the checker has no experiment) ----
    @classmethod
    def check_keywords(cls, kwargs: Mapping[str, Any]) -> tuple[str, str, str | None] | None:
        """(keyword, message, hint) when a keyword's value is wrong beyond its type, else None; an item
        with a `split` keyword gets its value checked here."""
        if "split" in cls.keywords and kwargs.get("split", "test") not in SPLITS:
            return "split", f"{cls.name}(): split is test or train, got '{kwargs['split']}'", None
        return None

    @classmethod
    def check_program(cls, item: ir.EvalItem, program: ir.Program) -> tuple[str | None, int | None, str,
                                                                            str | None] | None:
        """After every statement is checked: (keyword or None, index in that keyword's list or None,
        message, hint) when the item does not fit the program (`error_table` names blocks), else None."""
        return None

    @classmethod
    def split(cls, kwargs: Mapping[str, Any]) -> str:
        """The data the item scores: "test" (a labelled test split of the training classes), "train",
        "query/gallery" (re-id retrieval) or "any" (features only). The checker keeps re-id data and
        test-split items apart with it. Items with a `split` keyword score the split it names."""
        return str(kwargs.get("split", "test")) if "split" in cls.keywords else "test"

    # ---- evaluation ----
    @property
    def title(self) -> str:
        args = [path_label(self.program, a) if isinstance(a, ir.Path) else str(a) for a in self.spec.args]
        if self.title_keywords:
            args += [f"{k}={v}" for k, v in self.spec.kwargs.items()]
        return f"{self.spec.kind}({', '.join(args)})" if args else self.spec.kind

    def plan(self, job: Pass) -> None:
        """Register what the shared pass must compute; raise `Unavailable` if the item cannot run."""

    def compute(self, job: Pass) -> Result:
        """This process's result, after the shared pass."""
        raise NotImplementedError

    def result(self, **fields: Any) -> Result:
        return {"kind": self.spec.kind, "title": self.title, **fields}

    # ---- helpers for subclasses ----
    @property
    def on_train(self) -> bool:
        """Whether the item scores the training set (`split="train"`) instead of the test set."""
        return self.spec.kwargs.get("split") == "train"

    @property
    def loader(self) -> Iterable:
        """The batches the item scores: the test loader, or the training set without augmentation (built
        once per evaluation and shared by every item with `split="train"`)."""
        if not self.on_train:
            return self.ctx.loader
        if "train_loader" not in self.ctx.shared:
            if self.ctx.data is None:
                raise RuntimeError(f"{self.spec.kind}(split=\"train\") needs the data bundle "
                                   "(evaluate_items(data=...))")
            self.ctx.shared["train_loader"] = self.ctx.data.plain_train_loader()
        return self.ctx.shared["train_loader"]

    def paths(self) -> list[ir.Path]:
        """The item's path arguments; every network's own full path when there are none."""
        paths = [a for a in self.spec.args if isinstance(a, ir.Path)]
        return paths or [self.program.natural_path(net) for net in self.program.networks]

    def networks(self) -> list[str]:
        return [str(a) for a in self.spec.args] or list(self.program.networks)

    def need(self, job: Pass, path: ir.Path) -> None:
        """Ask the shared pass for `path`'s statistics (if it can be run at all)."""
        if self.engine.check(path) is None:
            job.paths.setdefault(str(path), path)

    def path_row(self, job: Pass, path: ir.Path) -> Result:
        """Accuracy, CE loss, entropy and #params of one path, or why it has none."""
        key = str(path)
        row: Result = {"path": key, "label": path_label(self.program, path)}
        problem = self.engine.problem(path, job)
        if problem is not None:
            return {**row, "accuracy": None, "loss": None, "entropy": None, "params": None, "status": problem}
        stats = job.stats[key].summary()
        ranked = stats.pop("ranked", None)  # the shared pass keeps the largest k any item asked for
        if ranked is not None and self.ranked_k:
            stats["ranked"] = ranked[:self.ranked_k]
        return {**row, **stats, "params": self.engine.params(path), "status": "ok"}

    def scored_pass(self, job: Pass) -> Pass:
        """The pass holding this item's path statistics: the shared test pass, or for `split="train"`
        a pass of its own over the training set (shared prefixes still computed once)."""
        if not self.on_train:
            return job
        if "train_pass" not in self.ctx.shared:  # one pass for every split="train" item (planned in `plan`)
            if "train_job" not in self.ctx.shared:
                self.plan(type(job)())
            want = self.ctx.shared["train_job"]
            paths = {k: p for k, p in want.paths.items() if self.engine.problem(p) is None}
            self.ctx.shared["train_pass"] = self.engine.run_paths(self.loader, paths, ranked=want.ranked)
        return self.ctx.shared["train_pass"]

    @property
    def ranked_k(self) -> int:
        """How many of the largest softmax probabilities the pass must keep for this item (`ranked`)."""
        return 0

    # ---- results of several processes, tables, summary ----
    @classmethod
    def merge(cls, shards: Sequence[Result], weights: Sequence[int]) -> Result:
        """Sample-weighted means of accuracy / loss / entropy over the shards, in the item, its rows
        and its members (exact for per-sample items)."""
        total = sum(weights)
        out = copy.deepcopy(shards[0])

        def mean(target: Result, parts: list[Result]) -> None:
            for key in ("accuracy", "top5", "loss", "entropy"):
                if all(p.get(key) is not None for p in parts):
                    target[key] = sum(p[key] * w for p, w in zip(parts, weights)) / total
            if all(p.get("ranked") is not None for p in parts):
                target["ranked"] = [sum(p["ranked"][i] * w for p, w in zip(parts, weights)) / total
                                    for i in range(len(parts[0]["ranked"]))]

        mean(out, list(shards))
        for key in ("rows", "members"):
            for j, row in enumerate(out.get(key, [])):
                mean(row, [s[key][j] for s in shards])
        return out

    @classmethod
    def tables(cls, result: Mapping[str, Any]) -> list[Tab]:
        return []

    @classmethod
    def columns(cls, result: Mapping[str, Any], n_networks: int | None) -> dict[str, float | None]:
        """Accuracy cells for the run summary (column name -> value); most items add none."""
        return {}

    @classmethod
    def run_tables(cls, result: Mapping[str, Any], all_results: list[Mapping[str, Any]]) -> list[Tab]:
        """Tables over the whole run, drawn after the results table from `result` (the item's result
        after the last block) and every block's results; most items have none."""
        return []


class PerPathItem(EvaluateItem):
    """An item that reports the shared pass's statistics of each path (accuracy, CE loss, entropy,
    ranked posterior mass), on the test set or, with `split="train"`, on the unaugmented training set
    (the seeds measure training accuracy and entropy there)."""

    keywords: ClassVar[dict[str, Any]] = {"split": "test"}

    @property
    def title(self) -> str:
        base = super().title
        return base + " on the training set" if self.on_train else base

    def plan(self, job: Pass) -> None:
        # the training set gets a pass of its own in compute, shared by every split="train" item
        target = self.ctx.shared.setdefault("train_job", type(job)()) if self.on_train else job  # a Pass
        target.ranked = max(target.ranked, self.ranked_k)
        for p in self.paths():
            self.need(target, p)

    def compute(self, job: Pass) -> Result:
        scored = self.scored_pass(job)
        return self.result(split=self.spec.kwargs.get("split", "test"),
                           rows=[self.path_row(scored, p) for p in self.paths()])
