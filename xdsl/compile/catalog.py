"""`xdsl models`: the models a spec can name, their parameter counts, and where one of them can be cut.

Every source in `build.SOURCES` is listed (builtin, torchvision, timm when installed), plus the user
modules beside a spec: the public top-level functions and classes of its `*.py` files, found by reading
the files (they are imported only to count parameters, as a spec beside them would import them).
Counts are for the default keywords, on the meta device (nothing allocated); torchvision's come from
its weights' metadata (`num_params`, exact for the 1000-class models), so listing all of them is
instant. Cut points are the module paths `cut ... at "..."` accepts, each with its output shape.
"""

from __future__ import annotations

import ast
import fnmatch
import functools
import inspect
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from xdsl.compile.build import SOURCES, build_model, check_model_ref, model_names
from xdsl.compile.cut import cut_point_nodes, trace_model
from xdsl.errors import XdslError
from xdsl.models import MODELS
from xdsl.registry import did_you_mean
from xdsl.shapes import param_count

__all__ = ["ModelEntry", "list_models", "user_models", "natural_input", "cut_shapes", "builtin_keywords",
           "TIMM_PARAMS_LIMIT"]

TIMM_PARAMS_LIMIT = 50  # timm has ~1,300 architectures: count parameters only for a selection this small

# (C, H, W) a builtin is made for (its docstring's dataset); other builtins get (3, 32, 32)
_NATURAL = {"builtin.cnn": (1, 8, 8), "builtin.mlp": (1, 8, 8), "builtin.mobilenet_v1": (3, 224, 224),
            "builtin.inception_v1": (3, 224, 224)}
IMAGENET_INPUT = (3, 224, 224)


@dataclass
class ModelEntry:
    """One row of `xdsl models`: the reference a spec writes, its source, #params and what it takes."""

    ref: str
    source: str
    params: int | None = None
    takes: str = ""  # builtin and user models: keywords with defaults; torchvision: its weights' names
    error: str = ""  # why params is None, when it could not be counted


def builtin_keywords(ref: str) -> str:
    """`num_classes=10, in_channels=1, width=16`: the keywords of a builtin (or user) constructor."""
    return _keywords(MODELS.get(ref))


def _keywords(ctor: Callable[..., Any]) -> str:
    try:
        params = inspect.signature(ctor).parameters.values()
    except (TypeError, ValueError):
        return ""
    return ", ".join(p.name if p.default is inspect.Parameter.empty else f"{p.name}={_value(p.default)}"
                     for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def _value(v: Any) -> str:
    return "true" if v is True else "false" if v is False else f'"{v}"' if isinstance(v, str) else repr(v)


def _matches(ref: str, pattern: str | None) -> bool:
    """A glob (`*resnet*`, `torchvision.vit_*`) on the reference or its bare name, else a substring."""
    if not pattern:
        return True
    if any(c in pattern for c in "*?["):
        bare = ref.split(":")[-1].split(".", 1)[-1]
        return fnmatch.fnmatch(ref, pattern) or fnmatch.fnmatch(bare, pattern)
    return pattern.lower() in ref.lower()


def _count(ref: str, spec_dir: Path | None = None) -> tuple[int | None, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return param_count(build_model(ref, {}, device="meta", spec_dir=spec_dir)), ""
    except XdslError as e:
        return None, e.message
    except Exception as e:  # a user constructor that fails without arguments
        return None, f"{type(e).__name__}: {e}"


@functools.cache
def _torchvision_entry(ref: str) -> ModelEntry:
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(ref[len("torchvision.") :])
    except (ValueError, KeyError):
        return ModelEntry(ref, "torchvision", *_count(ref)[:1])
    counts = [w.meta["num_params"] for w in enum if w.meta.get("num_params")
              and len(w.meta.get("categories") or []) == 1000]
    params = counts[0] if counts else _count(ref)[0]
    return ModelEntry(ref, "torchvision", params, "weights=" + "|".join(f'"{w.name}"' for w in enum))


def _ast_keywords(node: ast.FunctionDef | ast.ClassDef) -> str:
    """A function's (or a class's `__init__`'s) parameters with their defaults, read from the source."""
    if isinstance(node, ast.ClassDef):
        init = next((n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"), None)
        if init is None:
            return ""
        node = init
    args = node.args
    plain = [a for a in args.posonlyargs + args.args if a.arg not in ("self", "cls")]
    defaults = [None] * (len(plain) - len(args.defaults)) + list(args.defaults)
    pairs = list(zip(plain, defaults)) + list(zip(args.kwonlyargs, args.kw_defaults))
    return ", ".join(a.arg if d is None else f"{a.arg}={ast.unparse(d)}" for a, d in pairs)


def user_models(directory: Path) -> dict[str, str]:
    """`module:callable` references of the public top-level functions and classes in `directory/*.py`,
    each with its keywords."""
    refs: dict[str, str] = {}
    for file in sorted(Path(directory).glob("*.py")):
        if file.stem.startswith("_") or not file.stem.isidentifier():
            continue
        try:
            tree = ast.parse(file.read_text(), str(file))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        refs.update({f"{file.stem}:{node.name}": _ast_keywords(node) for node in tree.body
                     if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and not node.name.startswith("_")})
    return refs


def list_models(pattern: str | None = None, *, user_dir: Path | None = None, params: bool = True,
                sources: list[str] | None = None) -> tuple[list[ModelEntry], list[str]]:
    """The models matching `pattern`, source by source, and notes (what was not counted and why)."""
    entries: list[ModelEntry] = []
    notes: list[str] = []
    for prefix in SOURCES:
        if sources and prefix not in sources:
            continue
        try:
            names = [n for n in SOURCES.get(prefix).names() if _matches(n, pattern)]
        except Exception as e:  # an optional source that is broken in this environment
            notes.append(f"{prefix}: cannot list its models ({type(e).__name__}: {e})")
            continue
        if prefix == "timm" and params and len(names) > TIMM_PARAMS_LIMIT:
            notes.append(f"timm: {len(names)} models; parameters are counted for {TIMM_PARAMS_LIMIT} or fewer "
                         "(narrow the PATTERN)")
        for ref in names:
            if prefix == "torchvision":
                entry = _torchvision_entry(ref) if params else ModelEntry(ref, prefix)
            else:
                entry = ModelEntry(ref, prefix, takes=builtin_keywords(ref) if ref in MODELS else "")
                if params and (prefix != "timm" or len(names) <= TIMM_PARAMS_LIMIT):
                    entry.params, entry.error = _count(ref)
            entries.append(entry)
    if user_dir is not None and (not sources or "user" in sources):
        for ref, keywords in user_models(user_dir).items():
            if not _matches(ref, pattern):
                continue
            entry = ModelEntry(ref, f"user ({ref.split(':')[0]}.py)", takes=keywords)
            if params:
                entry.params, entry.error = _count(ref, user_dir)
            entries.append(entry)
    return entries, notes


def natural_input(ref: str) -> tuple[int, ...]:
    """The input a model is made for: a builtin's dataset, ImageNet's (3, 224, 224) otherwise."""
    if ref in MODELS:
        return _NATURAL.get(ref, (3, 32, 32))
    return IMAGENET_INPUT


def _unknown_model(ref: str, user_dir: Path | None) -> XdslError:
    candidates = model_names() + (list(user_models(user_dir)) if user_dir is not None else [])
    same = [c for c in candidates if c.rsplit(".", 1)[-1] == ref]  # a bare name: its sources' models
    close = did_you_mean(ref, candidates)
    guess = " or ".join(f"'{c}'" for c in same) if same else (f"'{close}'" if close else None)
    hint = f"did you mean {guess}?" if guess else "`xdsl models PATTERN` lists the models"
    return XdslError(f"unknown model '{ref}'", hint=hint)


def cut_shapes(ref: str, input_shape: tuple[int, ...] | None = None, *, user_dir: Path | None = None,
               max_depth: int = 2) -> tuple[nn.Module, tuple[int, ...], list[tuple[str, tuple[int, ...]]]]:
    """(the model on meta, its input shape, [(cut point, output shape without batch)...] in graph order,
    ending with ("(output)", logits shape)). One trace and one meta-device run, however many points."""
    if ":" not in ref:
        try:
            check_model_ref(ref)
        except XdslError:
            raise _unknown_model(ref, user_dir) from None
    shape = tuple(input_shape or natural_input(ref))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(ref, {}, device="meta", spec_dir=user_dir).eval()
    gm = trace_model(model)
    points = cut_point_nodes(gm, max_depth)
    wanted = {node: point for point, node in points.items()}
    shapes: dict[str, tuple[int, ...]] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            out = super().run_node(n)
            if n.name in wanted and isinstance(out, torch.Tensor):
                shapes[wanted[n.name]] = tuple(out.shape[1:])
            return out

    try:
        with torch.no_grad():
            out = _Recorder(gm).run(torch.empty((2, *shape), device="meta"))
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise XdslError(f"{ref} cannot take an input of shape {shape}: {type(e).__name__}: {first}",
                        hint="give the input shape the model expects, e.g. --input 3,224,224") from None
    rows = [(p, shapes[p]) for p in points if p in shapes]
    if isinstance(out, torch.Tensor):
        rows.append(("(output)", tuple(out.shape[1:])))
    return model, shape, rows
