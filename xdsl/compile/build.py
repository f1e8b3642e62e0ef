"""Build stage: turn a spec's model reference and keyword arguments into an nn.Module.

References: `torchvision.<name>` (every classification model), `timm.<name>` (when timm is installed),
the builtin small nets and anything else in `xdsl.models.MODELS`, and user code as
`"package.module:callable"`. User code is imported only from beside the spec, or anywhere when the
user passes `--allow-imports`; no spec text is ever evaluated. Nothing is downloaded: `weights` is a
local state_dict file, or torchvision weights read from the torch hub cache (`compile/pretrained.py`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xdsl import cifar_models  # noqa: F401  (registers the CIFAR paper networks in MODELS)
from xdsl.compile.pretrained import keep_fresh_head, load_timm, load_torchvision, pretrained_kind
from xdsl.data.params import resolve_spec_path
from xdsl.errors import XdslError
from xdsl.models import MODELS
from xdsl.registry import Registry, did_you_mean
from xdsl.user_code import check_user_ref, user_callable

__all__ = ["build_model", "check_model_ref", "model_names", "load_weights", "SOURCES", "ModelSource"]

_WEIGHT_ENUM = re.compile(r"^([A-Za-z0-9_]+\.)?(DEFAULT|[A-Z][A-Z0-9_]*_V\d+|[A-Z][A-Z0-9]*(_[A-Z0-9]+)+)$")
_TIMM_INSTALL = "pip install 'xdsl-distill[timm]'"


@functools.lru_cache(maxsize=1)
def _torchvision_names() -> tuple[str, ...]:
    import torchvision

    return tuple(torchvision.models.list_models(module=torchvision.models))


@functools.lru_cache(maxsize=1)
def _timm() -> Any | None:
    try:
        import timm
    except ImportError:
        return None
    return timm


@functools.lru_cache(maxsize=1)
def _timm_names() -> frozenset[str]:
    timm = _timm()
    return frozenset(timm.list_models()) if timm is not None else frozenset()


def _unknown(ref: str, kind: str, candidates: list[str]) -> XdslError:
    """A bare name found in several sources (`resnet18`: torchvision's and timm's) names them all, in
    source order; otherwise the closest reference."""
    bare = ref.rsplit(".", 1)[-1]
    exact = [f"{prefix}.{bare}" for prefix in SOURCES if f"{prefix}.{bare}" in candidates and "." not in ref]
    guess = " or ".join(f"'{c}'" for c in exact) if exact else None
    if guess is None:
        close = did_you_mean(ref, candidates) or next(
            (f"{prefix}.{bare}" for prefix in SOURCES if f"{prefix}.{bare}" in candidates), None)
        guess = f"'{close}'" if close else None
    forms = ", ".join(f"{prefix}.<name>" for prefix in SOURCES)
    hint = f"did you mean {guess}?" if guess else f"model references are {forms} or 'package.module:callable'"
    return XdslError(f"unknown {kind} '{ref}'", hint=hint)


def _timm_missing(ref: str) -> XdslError:
    return XdslError(f"model '{ref}' needs timm, which is not installed", hint=f"run: {_TIMM_INSTALL}")


# ---------------------------------------------------------------------------------------------- model sources


@dataclass(frozen=True)
class ModelSource:
    """One way a spec names a model: `<prefix>.<name>` (a new source such as `hub.` is one entry).

    `names()` lists the references it resolves by name (for `model_names` and did-you-mean hints),
    `check(ref)` raises the error building would raise, without building, `constructor(ref)`
    returns the callable that builds it from the spec's keywords, and `builder(ref)` the function
    whose signature lists the keywords it accepts (for the hint after a misspelled keyword).
    """

    names: Callable[[], list[str]]
    check: Callable[[str], None]
    constructor: Callable[[str], Callable[..., Any]]
    builder: Callable[[str], Callable[..., Any]] | None = None


SOURCES: Registry[ModelSource] = Registry("model source")
"""Model sources by prefix (`torchvision` for `torchvision.resnet18`); `xdsl.models.MODELS` holds
the builtin nets and user code is `package.module:callable`."""


def _check_torchvision(ref: str) -> None:
    if ref[len("torchvision.") :] not in _torchvision_names():
        raise _unknown(ref, "torchvision model", [f"torchvision.{n}" for n in _torchvision_names()])


def _torchvision(ref: str) -> Callable[..., Any]:
    import torchvision

    return functools.partial(torchvision.models.get_model, ref[len("torchvision.") :])


def _check_timm(ref: str) -> None:
    if _timm() is None:
        raise _timm_missing(ref)
    arch = ref[len("timm.") :].split(".")[0]  # `resnet50.a1_in1k` names a pretrained tag of resnet50
    if arch not in _timm_names():
        raise _unknown(ref, "timm model", [f"timm.{n}" for n in sorted(_timm_names())])


def _timm_model(ref: str) -> Callable[..., Any]:
    return functools.partial(_timm().create_model, ref[len("timm.") :], pretrained=False)


def _check_builtin(ref: str) -> None:
    if ref not in MODELS:
        raise _unknown(ref, "builtin model", [n for n in MODELS.names() if n.startswith("builtin.")])


def _torchvision_builder(ref: str) -> Callable[..., Any]:
    import torchvision

    return torchvision.models.get_model_builder(ref[len("torchvision.") :])


SOURCES.register("builtin", ModelSource(lambda: [n for n in MODELS.names() if n.startswith("builtin.")],
                                        _check_builtin, MODELS.get))
SOURCES.register("torchvision", ModelSource(lambda: [f"torchvision.{n}" for n in _torchvision_names()],
                                            _check_torchvision, _torchvision, _torchvision_builder))
SOURCES.register("timm", ModelSource(lambda: [f"timm.{n}" for n in sorted(_timm_names())], _check_timm,
                                     _timm_model, lambda ref: _timm().models.model_entrypoint(ref[len("timm.") :])))


def _source(ref: str) -> ModelSource | None:
    """The source a reference names by its prefix (`torchvision.resnet18` -> torchvision), if any."""
    prefix = ref.split(".", 1)[0] if "." in ref else None
    return SOURCES.get(prefix) if prefix is not None and prefix in SOURCES else None


def model_names(*, include_timm: bool = True) -> list[str]:
    """Every model reference that resolves by name (user `module:callable` references aside)."""
    names = list(MODELS.names())
    for prefix in SOURCES:
        if prefix != "builtin" and (include_timm or prefix != "timm"):
            names += SOURCES.get(prefix).names()
    return names


def check_model_ref(ref: str, *, spec_dir: Path | None = None, allow_imports: bool | None = None) -> None:
    """Raise the error `build_model` would raise for an unresolvable reference, without building.

    For a `module:callable` reference only the syntax is checked, plus the import rule when
    `allow_imports` is given (True/False); nothing is imported.
    """
    if ":" in ref:
        check_user_ref(ref, spec_dir=spec_dir, allow_imports=allow_imports, what="model")
        return
    if ref in MODELS:
        return
    source = _source(ref)
    if source is None:
        raise _unknown(ref, "model", model_names(include_timm=_timm() is not None))
    source.check(ref)


def _constructor(ref: str, kwargs: dict[str, Any], spec_dir: Path | None, allow_imports: bool) -> Callable[..., Any]:
    if ":" in ref:
        return user_callable(ref, spec_dir, allow_imports, what="model", returns="an nn.Module")
    check_model_ref(ref)
    if ref in MODELS:
        return MODELS.get(ref)
    source = _source(ref)
    assert source is not None  # check_model_ref refused references of no source
    return source.constructor(ref)


def _accepted_keywords(ref: str, ctor: Callable[..., Any], message: str) -> list[str]:
    """Keyword names a constructor accepts, looking through `**kwargs` to the class named in `message`."""
    builder: Any = ctor
    source = _source(ref) if ":" not in ref else None
    if isinstance(ctor, functools.partial):
        builder = ctor.func
        try:
            if source is not None and source.builder is not None:
                builder = source.builder(ref)
        except Exception:
            return []
    target = builder
    m = re.match(r"(\w+)\.__init__\(\)", message)
    if m:
        cls = getattr(sys.modules.get(getattr(builder, "__module__", ""), None), m.group(1), None)
        if inspect.isclass(cls):
            target = cls
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    skip = {"block", "layers", "weights", "progress", "pretrained"}
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in skip
    ]


def _construct(ref: str, ctor: Callable[..., Any], kwargs: dict[str, Any], device: str) -> nn.Module:
    try:
        if device == "meta":
            try:
                with torch.device("meta"):
                    model = ctor(**kwargs)
            except (NotImplementedError, RuntimeError) as e:
                if "meta" not in str(e):
                    raise
                model = ctor(**kwargs).to("meta")  # constructors that compute with tensors (regnet)
        else:
            model = ctor(**kwargs)
    except TypeError as e:
        message = str(e)
        m = re.search(r"unexpected keyword argument '(\w+)'", message)
        if m:
            bad = m.group(1)
            accepted = _accepted_keywords(ref, ctor, message)
            guess = did_you_mean(bad, accepted)
            if guess:
                hint = f"did you mean '{guess}'?"
            else:
                hint = f"{ref} accepts: {', '.join(accepted)}" if accepted else None
            raise XdslError(f"{ref} got an unknown keyword argument '{bad}'", hint=hint) from e
        raise XdslError(f"cannot build {ref}: {message}") from e
    except ValueError as e:
        raise XdslError(f"cannot build {ref}: {e}") from e
    if not isinstance(model, nn.Module):
        raise XdslError(f"{ref} returned {type(model).__name__}, not a torch.nn.Module")
    if device not in ("meta", "cpu"):
        model = model.to(device)
    return model


def _local_weights(weights: Any, spec_dir: Path | None) -> Path | None:
    """The existing file `weights` names (relative to the working directory, then to the spec), if any."""
    if not isinstance(weights, (str, Path)):
        return None
    path = Path(weights).expanduser()
    candidates = [path] if path.is_absolute() else [path] + ([Path(spec_dir) / path] if spec_dir else [])
    return next((c for c in candidates if c.is_file()), None)


def _weights_file(ref: str, weights: Any, spec_dir: Path | None) -> Path:
    if not isinstance(weights, (str, Path)):
        raise XdslError(f"{ref}: weights must be a file path string, got {weights!r}")
    path = Path(weights).expanduser()
    if spec_dir is not None:
        resolve_spec_path(path, spec_dir, f"{ref}: weights")  # no `..` out of the spec's directory
    found = _local_weights(weights, spec_dir)
    if found is not None:
        return found
    if _WEIGHT_ENUM.match(str(weights)):
        raise XdslError(
            f"{ref}: weights '{weights}' names torchvision weights, and {ref} is not a torchvision model",
            hint="timm models take pretrained=true; any model takes a local state_dict, "
            'weights="path/to/file.pt" (saved with torch.save(model.state_dict()))',
        )
    candidates = [path] if path.is_absolute() else [path] + ([Path(spec_dir) / path] if spec_dir else [])
    raise XdslError(f"{ref}: weights file not found: {' or '.join(str(c) for c in candidates)}")


def load_weights(model: nn.Module, path: Path, ref: str = "model", *, new_head: bool = False,
                 notes: list[str] | None = None) -> None:
    """Load a local state_dict (optionally wrapped as {'state_dict': ...} or {'model': ...}) safely.

    `new_head`: everything but the classifier, which keeps the model's own fresh initialisation (for
    the spec's class count). A model on the meta device reads the file memory-mapped: keys and shapes
    are checked, no data is read."""
    meta = next((t.is_meta for t in model.parameters()), False)
    try:
        try:
            state = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True, mmap=meta)
        except RuntimeError:  # mmap needs torch.save's zip format; legacy files are read whole
            state = torch.load(path, map_location="meta" if meta else "cpu", weights_only=True)
    except Exception as e:
        raise XdslError(f"{ref}: cannot load weights from {path}: {e}") from e
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise XdslError(f"{ref}: {path} does not hold a state_dict")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module.") :]: v for k, v in state.items()}
    if new_head:
        state, said = keep_fresh_head(model, state, ref)
        if notes is not None:
            notes += said
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        hint = "; ".join(line.strip() for line in first[:4])
        if not new_head:
            with contextlib.suppress(RuntimeError, XdslError):  # the model is discarded: trying costs nothing
                model.load_state_dict(keep_fresh_head(model, state, ref)[0])
                hint = "only the classifier differs (another class count): add new_head=true to load the rest"
        raise XdslError(f"{ref}: weights in {path} do not fit the model", hint=hint) from e


def build_model(
    ref: str,
    kwargs: Mapping[str, Any],
    *,
    device: str = "cpu",
    spec_dir: Path | None = None,
    allow_imports: bool = False,
    notes: list[str] | None = None,
) -> nn.Module:
    """Construct the network a spec names; `device="meta"` allocates nothing (for check-time shapes).

    `weights="file.pt"` (relative to the working directory, then to `spec_dir`) loads a local
    state_dict into any model; on the meta device the file is only checked to exist. Torchvision's
    `weights="IMAGENET1K_V1"`, timm's `pretrained=true` and `new_head=true` are `xdsl.compile.pretrained`'s;
    what they loaded or replaced is appended to `notes` (the run header and `xdsl check` print it).
    """
    kwargs = dict(kwargs)
    weights = kwargs.pop("weights", None)
    new_head = kwargs.pop("new_head", False)
    notes = [] if notes is None else notes
    if not isinstance(new_head, bool):
        raise XdslError(f"{ref}: new_head must be true or false, got {new_head!r}")
    ctor = _constructor(ref, kwargs, spec_dir, allow_imports)
    source = ref.split(".", 1)[0] if ":" not in ref and ref not in MODELS else None
    kind = pretrained_kind(ref, source, kwargs, weights, lambda: _local_weights(weights, spec_dir) is not None)

    def construct(c: Callable[..., Any], kw: dict[str, Any]) -> nn.Module:
        return _construct(ref, c, kw, device)

    if kind == "torchvision":
        return load_torchvision(ref, weights, kwargs, new_head=new_head, device=device, construct=construct,
                                notes=notes)
    if kind == "timm":
        return load_timm(ref, kwargs, new_head=new_head, device=device, construct=construct, notes=notes)
    if new_head and weights is None:
        raise XdslError(f"{ref}: new_head=true replaces the classifier of pretrained weights, and there are none",
                        hint='give weights="IMAGENET1K_V1" (torchvision models) or pretrained=true (timm models)')
    weights_path = _weights_file(ref, weights, spec_dir) if weights is not None else None
    model = _construct(ref, ctor, kwargs, device)
    if weights_path is not None and (device != "meta" or new_head):
        load_weights(model, weights_path, ref, new_head=new_head, notes=notes)
    return model
