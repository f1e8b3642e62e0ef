"""Model references dispatch through one registry of sources: a new prefix such as `hub.` is one entry."""

from __future__ import annotations

import pytest
from torch import nn

from xdsl.compile.build import SOURCES, ModelSource, build_model, check_model_ref, model_names
from xdsl.errors import XdslError


def _hub_check(ref: str) -> None:
    if ref != "hub.tiny":
        raise XdslError(f"unknown hub model '{ref}'")


@pytest.fixture
def hub(monkeypatch):
    source = ModelSource(names=lambda: ["hub.tiny"], check=_hub_check,
                         constructor=lambda ref: lambda width=3: nn.Linear(width, 2))
    monkeypatch.setitem(SOURCES._items, "hub", source)
    return source


def test_a_registered_source_resolves_checks_and_lists_its_models(hub):
    model = build_model("hub.tiny", {"width": 5})
    assert isinstance(model, nn.Linear) and model.in_features == 5
    check_model_ref("hub.tiny")
    assert "hub.tiny" in model_names()
    with pytest.raises(XdslError, match="unknown hub model 'hub.huge'"):
        check_model_ref("hub.huge")
    with pytest.raises(XdslError, match="unknown keyword argument 'depth'"):
        build_model("hub.tiny", {"depth": 2})


def test_every_builtin_prefix_is_a_source_and_unknown_prefixes_are_unknown_models():
    assert {"builtin", "torchvision", "timm"} <= set(SOURCES)
    with pytest.raises(XdslError, match="unknown model 'hub.tiny'") as err:
        check_model_ref("hub.tiny")
    assert "builtin.<name>, torchvision.<name>, timm.<name>" in (err.value.hint or "") or "did you mean" in (
        err.value.hint or "")
