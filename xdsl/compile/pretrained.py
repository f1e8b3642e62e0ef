"""Pretrained weights read from the local caches torchvision and timm download to; nothing is downloaded.

`torchvision.resnet50(weights="IMAGENET1K_V2")` resolves the name with torchvision's weights API and
reads `<torch.hub.get_dir()>/checkpoints/<file of the weights' URL>`, the file torchvision itself
would download and then use, so `$TORCH_HOME` is honoured. The torchvision builder runs as usual
(it knows each model's quirks: DenseNet's old key names, GoogLeNet's `transform_input`); only its one
call that would download is replaced by `torch.load(file, weights_only=True)`. `timm.<name>(pretrained=
true)` reads timm's checkpoint from the Hugging Face cache or the torch hub directory and hands it to
timm as `pretrained_cfg_overlay=dict(file=...)`, with `HF_HUB_OFFLINE=1` for the call.

`new_head=true` builds the pretrained network at the weights' own class count, loads it, and replaces
its classifier with the one a fresh `<model>(num_classes=N)` initialises. On the meta device (`xdsl
check`) no file is read: names and class counts are checked, and a file not there yet is a note (like
a data directory, it is needed by `xdsl run`, which fails before training with the error).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from xdsl.errors import XdslError
from xdsl.registry import did_you_mean

__all__ = ["looks_like_weight_name", "pretrained_kind", "hub_checkpoint", "torchvision_weights", "load_torchvision",
           "load_timm", "find_heads", "replace_heads", "keep_fresh_head",
           "without_pretrained_files"]

Construct = Callable[[Callable[..., Any], dict[str, Any]], nn.Module]
"""Builds a module from a constructor and keywords with build.py's error handling and device."""

_FILE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".tar", ".safetensors", ".pkl")


def looks_like_weight_name(value: str) -> bool:
    """`IMAGENET1K_V1`, `DEFAULT`, `ResNet50_Weights.IMAGENET1K_V2`: no path separator, no file suffix."""
    return "/" not in value and "\\" not in value and not value.lower().endswith(_FILE_SUFFIXES) and bool(value)


def pretrained_kind(ref: str, source: str | None, kwargs: dict[str, Any], weights: Any,
                    is_local_file: Callable[[], bool]) -> str | None:
    """"torchvision" for `weights="IMAGENET1K_V1"` on a torchvision model, "timm" for `pretrained=true` on
    a timm one, else None (a local state_dict file, or no weights). Pops timm's `pretrained`."""
    if source == "torchvision" and "pretrained" in kwargs:
        raise XdslError(f"{ref}: torchvision models take weights=..., not pretrained",
                        hint='weights="IMAGENET1K_V1" is what pretrained=true meant; weights="DEFAULT" the best')
    if source == "timm" and "pretrained" in kwargs:
        pretrained = kwargs.pop("pretrained")
        if not isinstance(pretrained, bool):
            raise XdslError(f"{ref}: pretrained must be true or false, got {pretrained!r}")
        if pretrained and weights is not None:
            raise XdslError(f"{ref}: give pretrained=true or weights=..., not both")
        return "timm" if pretrained else None
    if source == "torchvision" and isinstance(weights, str) and looks_like_weight_name(weights) \
            and not is_local_file():
        return "torchvision"
    return None


def hub_checkpoint(url: str) -> Path:
    """The file `torch.hub.load_state_dict_from_url(url)` reads or downloads to."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def torchvision_weights(ref: str, name: str) -> Any:
    """The torchvision `WeightsEnum` member `name` of the model `ref` names (did-you-mean otherwise)."""
    from torchvision.models import get_model_weights

    arch = ref[len("torchvision.") :]
    try:
        enum = get_model_weights(arch)
    except (ValueError, KeyError) as e:
        raise XdslError(f"{ref} has no torchvision weights") from e
    members = list(enum.__members__)
    prefix, _, member = name.rpartition(".")
    if prefix and prefix != enum.__name__:
        raise XdslError(f"{ref}: weights '{name}' are not {arch}'s",
                        hint=f"{arch}'s weights are {enum.__name__}.<name>, <name> one of {', '.join(members)}")
    if member in members:
        return enum[member]
    guess = did_you_mean(member, members)
    listed = f"{arch} has {', '.join(members)}"
    raise XdslError(f"{ref}: unknown weights '{name}'",
                    hint=f"did you mean '{guess}'? ({listed})" if guess else listed)


def _check_classes(ref: str, label: str, classes: int, wanted: Any, new_head: bool) -> None:
    if not new_head and wanted is not None and wanted != classes:
        raise XdslError(f"{ref}: weights {label} classify {classes} classes, but num_classes={wanted}",
                        hint=f"add new_head=true to load the backbone and re-initialise the classifier "
                             f"for {wanted} classes")


def _fetch_into(url: str, file: Path) -> str:
    return (f"fetch {url} on a machine with network access and copy it into {file.parent}/ "
            "(TORCH_HOME moves that directory: $TORCH_HOME/hub/checkpoints)")


def _missing(ref: str, label: str, file: Path, how: str) -> XdslError:
    return XdslError(f"{ref}: weights {label} need {file}, which is not there (xdsl never downloads)", hint=how)


def _missing_note(ref: str, label: str, file: Path, how: str) -> str:
    return f"{ref} weights {label}: {file} is not there yet; `xdsl run` needs it ({how})"


_SKIP_FILES: ContextVar[bool] = ContextVar("xdsl_skip_pretrained_files", default=False)


@contextlib.contextmanager
def without_pretrained_files() -> Iterator[None]:
    """Build pretrained networks without reading their files, as on the meta device: for weights that are
    replaced right after (`xdsl eval --checkpoint`), so evaluating needs no ImageNet file."""
    token = _SKIP_FILES.set(True)
    try:
        yield
    finally:
        _SKIP_FILES.reset(token)


class _NotRead(dict):
    """What the download call returns on the meta device: nothing read, nothing loaded."""


@contextlib.contextmanager
def _patched_torchvision_load(url: str, file: Path | None, ref: str) -> Iterator[None]:
    """torchvision's one download call reads `file` instead (or, with None, nothing: the meta device)."""
    import torchvision.models._api as api

    def load(requested: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if requested != url:
            raise XdslError(f"{ref}: torchvision asked for {requested}, not the weights' own {url}")
        if file is None:
            return _NotRead()
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise XdslError(f"{ref}: cannot read {file}: {type(e).__name__}: {e}",
                            hint=f"the file is damaged or not the one torchvision publishes; fetch {url} again"
                            ) from None

    original_load, original_sd = api.load_state_dict_from_url, nn.Module.load_state_dict

    @functools.wraps(original_sd)
    def load_state_dict(self: nn.Module, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(state_dict, _NotRead):
            return None
        return original_sd(self, state_dict, *args, **kwargs)

    api.load_state_dict_from_url = load
    if file is None:
        nn.Module.load_state_dict = load_state_dict  # type: ignore[method-assign]
    try:
        yield
    finally:
        api.load_state_dict_from_url = original_load
        nn.Module.load_state_dict = original_sd  # type: ignore[method-assign]


@dataclass
class _Request:
    ref: str
    label: str
    classes: int
    new_head: bool
    kwargs: dict[str, Any]

    @property
    def wanted(self) -> int:
        return int(self.kwargs.get("num_classes") or self.classes)

    @property
    def base(self) -> dict[str, Any]:
        return {k: v for k, v in self.kwargs.items() if k != "num_classes"}


_AUX_HEADS = {"googlenet": ("aux1", "aux2"), "inception_v3": ("AuxLogits",)}
"""The auxiliary classifiers torchvision's pretrained builders load and then drop unless aux_logits is true."""


def load_torchvision(ref: str, name: str, kwargs: dict[str, Any], *, new_head: bool, device: str,
                     construct: Construct, notes: list[str]) -> nn.Module:
    """`torchvision.<arch>(weights=name, ...)` from the torch hub cache; see the module docstring."""
    from torchvision.models import get_model

    arch = ref[len("torchvision.") :]
    weights = torchvision_weights(ref, name)
    label = name if name.endswith(weights.name) else f"{name} (= {weights.name})"
    req = _Request(ref, label, len(weights.meta["categories"]), new_head, kwargs)
    _check_classes(ref, label, req.classes, kwargs.get("num_classes"), new_head)
    file = hub_checkpoint(weights.url)
    read = device != "meta" and not _SKIP_FILES.get()
    if read and not file.is_file():
        raise _missing(ref, label, file, _fetch_into(weights.url, file))
    builder = functools.partial(get_model, arch, weights=weights)
    base, aux_off = req.base, req.base.get("aux_logits") is False and arch in _AUX_HEADS
    if aux_off:  # torchvision refuses aux_logits=False with weights, yet drops the heads when it is left out
        base = {k: v for k, v in base.items() if k != "aux_logits"}
    try:
        with _patched_torchvision_load(weights.url, file if read else None, ref):
            model = construct(builder, base)
    except RuntimeError as e:  # load_state_dict: keys or shapes do not fit
        lines = [line.strip() for line in str(e).strip().splitlines()[:4]]
        raise XdslError(f"{ref}: the weights in {file} do not fit the model", hint="; ".join(lines)) from None
    if aux_off:  # as torchvision's builders do for aux_logits left out (inception_v3 keeps them then)
        model.aux_logits = False
        for head in _AUX_HEADS[arch]:
            setattr(model, head, None)
    notes.append(_missing_note(ref, label, file, _fetch_into(weights.url, file)) if not read
                 and not file.is_file()
                 else f"{ref} weights {label}: {file}")
    if new_head:
        fresh = construct(functools.partial(get_model, arch), {**req.base, "num_classes": req.wanted})
        notes += replace_heads(model, fresh, req.classes, req.wanted, ref)
    return model


# ---------------------------------------------------------------------------------------------- timm


def _timm_cfg(timm: Any, ref: str) -> dict[str, Any]:
    name = ref[len("timm.") :]
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise XdslError(f"{ref} has no timm pretrained weights",
                        hint="timm.list_pretrained() lists the models that have them")
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


def _hf_cache() -> Path:
    """The Hugging Face hub cache, from the environment now (huggingface_hub reads it once, at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser() / "hub"


def _timm_files(cfg: dict[str, Any]) -> tuple[list[Path], list[Path], list[str]]:
    """(files that exist, files that would be read, URLs to fetch them): HF cache first, then torch hub."""
    present: list[Path] = []
    expected: list[Path] = []
    urls: list[str] = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        repo, _, revision = hub_id.partition("@")
        names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else ["model.safetensors", "pytorch_model.bin"]
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:
            try_to_load_from_cache = None
        for filename in names:
            found = try_to_load_from_cache(repo, filename, cache_dir=_hf_cache(), revision=revision or None) \
                if try_to_load_from_cache else None
            if isinstance(found, str):
                present.append(Path(found))
    if cfg.get("url"):
        file = hub_checkpoint(cfg["url"])
        expected.append(file)
        urls.append(cfg["url"])
        if file.is_file():
            present.append(file)
    return present, expected, urls


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def load_timm(ref: str, kwargs: dict[str, Any], *, new_head: bool, device: str, construct: Construct,
              notes: list[str]) -> nn.Module:
    """`timm.<name>(pretrained=true, ...)` from timm's local caches; see the module docstring."""
    import timm

    name = ref[len("timm.") :]
    cfg = _timm_cfg(timm, ref)
    label = f"pretrained ({cfg.get('hf_hub_id') or cfg.get('tag') or name})"
    req = _Request(ref, label, int(cfg.get("num_classes") or 1000), new_head, kwargs)
    _check_classes(ref, label, req.classes, kwargs.get("num_classes"), new_head)
    present, expected, urls = _timm_files(cfg)
    read = device != "meta" and not _SKIP_FILES.get()
    hf = cfg.get("hf_hub_id", "").partition("@")[0]
    if not present:
        folder = _hf_cache() / f"models--{hf.replace('/', '--')}"
        download = (f"run `huggingface-cli download {hf}` on a machine with network access and copy the "
                    f"folder {folder.name} of its cache (HF_HOME/hub) into {folder.parent}/") if hf else ""
        if expected:
            how = _fetch_into(urls[-1], expected[0]) + (f"; or {download}" if download else "")
        else:  # Hugging Face only: its cache layout has a revision hash, so name the repository's folder
            expected, how = [folder], download
        if read:
            raise _missing(ref, label, expected[0], how)
        notes.append(_missing_note(ref, label, expected[0], how))
        model = construct(functools.partial(timm.create_model, name, pretrained=False, num_classes=req.classes),
                          req.base)
    else:
        if not read:
            model = construct(functools.partial(timm.create_model, name, pretrained=False,
                                                num_classes=req.classes), req.base)
        else:
            with _offline():
                model = construct(functools.partial(timm.create_model, name, pretrained=True,
                                                    num_classes=req.classes,
                                                    pretrained_cfg_overlay={"file": str(present[0])}), req.base)
        notes.append(f"{ref} weights {label}: {present[0]}")
    if new_head:
        fresh = construct(functools.partial(timm.create_model, name, pretrained=False),
                          {**req.base, "num_classes": req.wanted})
        notes += replace_heads(model, fresh, req.classes, req.wanted, ref)
    return model


# ---------------------------------------------------------------------------------------------- new head


def _outputs(module: nn.Module) -> int | None:
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1):  # SqueezeNet's classifier
        return module.out_channels
    return None


def find_heads(model: nn.Module, classes: int) -> list[str]:
    """The classifier's module names: the last nn.Linear (or 1x1 nn.Conv2d) with `classes` outputs in
    module order (`fc`, `classifier.6`, `heads.head`), plus auxiliary ones (GoogLeNet's `aux1.fc2`)."""
    names = [n for n, m in model.named_modules() if n and _outputs(m) == classes]
    if not names:
        return []
    return [n for n in names[:-1] if "aux" in n.lower()] + [names[-1]]


def replace_heads(model: nn.Module, fresh: nn.Module, classes: int, wanted: int, ref: str) -> list[str]:
    """Swap each classifier of `model` for `fresh`'s module of the same name (as the model initialises
    it for `wanted` classes); one report line per replaced module."""
    heads = find_heads(model, classes)
    if not heads:
        raise XdslError(f"{ref}: new_head=true cannot find the classifier: no nn.Linear (or 1x1 nn.Conv2d) "
                        f"with the weights' {classes} outputs",
                        hint="drop new_head and cut the network before its head, adding your own layers")
    lines = []
    for name in heads:
        old = model.get_submodule(name)
        try:
            new = fresh.get_submodule(name)
        except AttributeError:
            new = None
        if new is None or type(new) is not type(old) or _outputs(new) != wanted:
            raise XdslError(f"{ref}: new_head=true: {name} of the {wanted}-class model is not a "
                            f"{type(old).__name__} with {wanted} outputs",
                            hint="this model's classifier is not where its class count goes; drop new_head")
        model.set_submodule(name, new)
        lines.append(f"{ref} {name}: {classes} -> {wanted} classes, re-initialised")
    return lines


def keep_fresh_head(model: nn.Module, state: Mapping[str, Any], ref: str) -> tuple[dict[str, Any], list[str]]:
    """A local state_dict with the classifier's tensors replaced by `model`'s own fresh ones (`weights=
    "file.pt", new_head=true`): the model is already built for the spec's classes, so its head is the
    one it initialises, and only the file's backbone is loaded."""
    layers = [n for n, m in model.named_modules() if n and _outputs(m) is not None]
    if not layers:
        raise XdslError(f"{ref}: new_head=true cannot find the classifier: no nn.Linear (or 1x1 nn.Conv2d)",
                        hint="drop new_head and cut the network before its head, adding your own layers")
    classes = _outputs(model.get_submodule(layers[-1]))
    state, fresh, lines = dict(state), model.state_dict(), []
    for head in find_heads(model, classes or 0):
        old = state.get(f"{head}.weight")
        before = old.shape[0] if old is not None and old.dim() else "none"
        state.update({k: v for k, v in fresh.items() if k.startswith(head + ".")})
        lines.append(f"{ref} {head}: {before} -> {classes} classes, re-initialised")
    return state, lines
