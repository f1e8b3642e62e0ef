"""Registry, model building, cutting, shape inference and adapters (the build/cut/shapes stages)."""

from __future__ import annotations

import pickle
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from xdsl.adapters import ADAPTERS, adapter_params, joinable, make_adapter
from xdsl.compile.build import build_model, check_model_ref, model_names
from xdsl.compile.cut import compose, cut_model, cut_points_available
from xdsl.errors import XdslError
from xdsl.registry import Registry, did_you_mean
from xdsl.shapes import infer_shape, infer_shapes, param_count

warnings.filterwarnings("ignore", category=FutureWarning)  # torchvision's googlenet init notice


def _ids(module: nn.Module) -> set[int]:
    return {id(p) for p in module.parameters()}


def _halves(ref: str, point: str = "layer2", **kwargs) -> tuple[nn.Module, dict[str, nn.Module]]:
    model = build_model(ref, kwargs, device="meta")
    return model, cut_model(model, [point], ["up", "down"])


# --- registry -------------------------------------------------------------------------------------


def test_registry_register_get_and_did_you_mean() -> None:
    reg: Registry[int] = Registry("loss")
    reg.register("kl", 1)

    @reg.register("ce")
    def ce() -> int:
        return 2

    assert reg.get("kl") == 1 and reg.get("ce") is ce
    assert reg.names() == ["kl", "ce"] and "ce" in reg and "mse" not in reg
    with pytest.raises(XdslError) as err:
        reg.get("kll")
    assert err.value.message == "unknown loss 'kll'" and err.value.hint == "did you mean 'kl'?"
    with pytest.raises(ValueError):
        reg.register("kl", 3)
    assert did_you_mean("resnet81", ["resnet18", "vgg11"]) == "resnet18"
    assert did_you_mean("zzz", ["resnet18"]) is None


# --- builtin models and building ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "kwargs", "shape", "stages"),
    [
        ("builtin.cnn", {}, (2, 1, 8, 8), ["stem", "layer1", "layer2", "layer3", "pool"]),
        ("builtin.resnet", {"depth": 14}, (2, 3, 32, 32), ["stem", "layer1", "layer2", "layer3", "pool"]),
        ("builtin.mlp", {"num_classes": 5}, (2, 1, 8, 8), ["layer1", "layer2"]),
    ],
)
def test_builtin_models_run_and_cut_at_their_stages(ref, kwargs, shape, stages) -> None:
    model = build_model(ref, kwargs).eval()
    x = torch.randn(shape)
    assert model(x).shape == (2, kwargs.get("num_classes", 10))
    available = cut_points_available(model)
    assert all(s in available for s in stages)
    for points in ([stages[1]], stages[1:3]):
        parts = cut_model(model, points, [f"p{i}" for i in range(len(points) + 1)])
        assert torch.equal(compose(list(parts.values()))(x), model(x))


def test_builtin_resnet_depth_must_be_6n_plus_2() -> None:
    with pytest.raises(XdslError, match="6n\\+2"):
        build_model("builtin.resnet", {"depth": 10})


def test_build_torchvision_on_meta_and_unknown_names() -> None:
    model = build_model("torchvision.resnet50", {"num_classes": 200}, device="meta")
    assert next(model.parameters()).is_meta and model.fc.out_features == 200
    assert "torchvision.resnet18" in model_names() and "builtin.cnn" in model_names()
    with pytest.raises(XdslError) as err:
        check_model_ref("torchvision.resnet81")
    assert err.value.hint == "did you mean 'torchvision.resnet18'?"
    with pytest.raises(XdslError) as err:
        check_model_ref("resnet18")
    assert "torchvision.resnet18" in (err.value.hint or "")
    with pytest.raises(XdslError) as err:
        build_model("builtin.cnnn", {})
    assert err.value.hint == "did you mean 'builtin.cnn'?"


def test_build_regnet_on_meta_falls_back_to_cpu_construction() -> None:
    model = build_model("torchvision.regnet_x_400mf", {"num_classes": 10}, device="meta")
    assert all(p.is_meta for p in model.parameters())


def test_unknown_constructor_keyword_is_named() -> None:
    with pytest.raises(XdslError) as err:
        build_model("torchvision.resnet18", {"num_clases": 10}, device="meta")
    assert "'num_clases'" in err.value.message and err.value.hint == "did you mean 'num_classes'?"
    with pytest.raises(XdslError) as err:
        build_model("builtin.cnn", {"widht": 8})
    assert "'widht'" in err.value.message and err.value.hint == "did you mean 'width'?"


def test_weights_are_local_files_only(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # tests/test_pretrained.py: the cache
    with pytest.raises(XdslError, match="never downloads"):
        build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1"})
    with pytest.raises(XdslError, match="not pretrained"):
        build_model("torchvision.resnet18", {"pretrained": True}, device="meta")
    with pytest.raises(XdslError, match="not found"):
        build_model("builtin.cnn", {"weights": "missing.pt"}, spec_dir=tmp_path)
    source = build_model("builtin.cnn", {"width": 8})
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = build_model("builtin.cnn", {"width": 8, "weights": "w.pt"}, spec_dir=tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), loaded.state_dict().values()))
    with pytest.raises(XdslError, match="do not fit"):
        build_model("builtin.cnn", {"width": 16, "weights": "w.pt"}, spec_dir=tmp_path)


def test_timm_refs_need_timm() -> None:
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(XdslError) as err:
            check_model_ref("timm.resnet18")
        assert "xdsl-distill[timm]" in (err.value.hint or "")
    else:
        assert next(build_model("timm.resnet18", {"num_classes": 7}, device="meta").parameters()).is_meta


def test_user_models_import_only_from_beside_the_spec(tmp_path: Path, monkeypatch) -> None:
    spec_dir, elsewhere = tmp_path / "spec", tmp_path / "lib"
    spec_dir.mkdir()
    elsewhere.mkdir()
    code = textwrap.dedent(
        """
        from torch import nn

        def make(num_classes=10):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

        def not_a_module():
            return 3
        """
    )
    (spec_dir / "xdsl_test_beside.py").write_text(code)
    (elsewhere / "xdsl_test_installed.py").write_text(code)
    model = build_model("xdsl_test_beside:make", {"num_classes": 4}, spec_dir=spec_dir)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 4)
    check_model_ref("xdsl_test_beside:make", spec_dir=spec_dir, allow_imports=False)

    with pytest.raises(XdslError) as err:
        build_model("xdsl_test_installed:make", {}, spec_dir=spec_dir)
    assert "--allow-imports" in (err.value.hint or "")
    with pytest.raises(XdslError, match="not beside the spec"):
        check_model_ref("xdsl_test_installed:make", spec_dir=spec_dir, allow_imports=False)
    monkeypatch.syspath_prepend(str(elsewhere))
    assert isinstance(build_model("xdsl_test_installed:make", {}, spec_dir=spec_dir, allow_imports=True), nn.Module)

    with pytest.raises(XdslError) as err:
        build_model("xdsl_test_beside:mkae", {}, spec_dir=spec_dir)
    assert err.value.hint == "did you mean 'xdsl_test_beside:make'?"
    with pytest.raises(XdslError, match="not a torch.nn.Module"):
        build_model("xdsl_test_beside:not_a_module", {}, spec_dir=spec_dir)
    with pytest.raises(XdslError, match="bad model reference"):
        check_model_ref("xdsl_test_beside:make()")

    other_spec = tmp_path / "other"  # another spec's file of the same name replaces the first one
    other_spec.mkdir()
    (other_spec / "xdsl_test_beside.py").write_text(code.replace("Linear(64,", "Linear(16,"))
    assert build_model("xdsl_test_beside:make", {}, spec_dir=other_spec)[1].in_features == 16


# --- cutting --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return build_model("torchvision.resnet18", {"num_classes": 200})


@pytest.mark.parametrize("points", [["layer2"], ["layer1", "layer2"]])
def test_resnet18_parts_share_parameters_and_compose_exactly(resnet18: nn.Module, points: list[str]) -> None:
    names = [f"p{i}" for i in range(len(points) + 1)]
    parts = cut_model(resnet18, points, names)
    assert list(parts) == names
    own = dict(resnet18.named_parameters())
    for part in parts.values():
        for name, p in part.named_parameters():
            assert p is own[name]  # the same Parameter objects, under the network's own names
        assert sum(n.op == "placeholder" for n in part.graph.nodes) == 1
    assert _ids(compose(list(parts.values()))) == _ids(resnet18)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        resnet18.eval()
        assert torch.equal(compose(list(parts.values()))(x), resnet18(x))
        resnet18.train()  # batch statistics: still exact
        assert torch.equal(compose(list(parts.values()))(x), resnet18(x))
    resnet18.eval()


def test_parts_pickle_and_never_overwrite_their_input(resnet18: nn.Module) -> None:
    parts = cut_model(resnet18.eval(), ["add_3"], ["up", "down"])  # `down` starts with an in-place ReLU
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = parts["up"](x)
        kept = h.clone()
        out = parts["down"](h)
        assert torch.equal(h, kept) and torch.equal(out, resnet18(x))
        copy = pickle.loads(pickle.dumps(parts["down"]))
        assert torch.equal(copy(h), out)


@pytest.mark.parametrize("arch", ["resnet34", "resnet50", "wide_resnet50_2", "resnext50_32x4d"])
def test_torchvision_resnets_cut_at_one_and_two_points(arch: str) -> None:
    model = build_model(f"torchvision.{arch}", {"num_classes": 200}, device="meta")
    two = cut_model(model, ["layer1", "layer2"], ["a", "b", "c"])
    one = cut_model(model, ["layer2"], ["up", "down"])
    assert param_count(list(two.values())) == param_count(model) == param_count(list(one.values()))
    assert param_count(two["a"]) + param_count(two["b"]) == param_count(one["up"])
    assert _ids(compose(list(two.values()))) == _ids(model)


def test_cut_errors_explain_why(resnet18: nn.Module) -> None:
    def error(points: list[str]) -> XdslError:
        with pytest.raises(XdslError) as err:
            cut_model(resnet18, points, [f"p{i}" for i in range(len(points) + 1)])
        return err.value

    inside = error(["layer2.0.conv1"])
    assert inside.message.startswith("cut at 'layer2.0.conv1' leaves 2 live tensors crossing the boundary (")
    assert inside.message.endswith("cut at a block boundary such as 'layer2.0' or 'layer2'")
    assert error(["layer22"]).hint == "did you mean 'layer2'?"
    assert "out of order" in error(["layer2", "layer1"]).message
    assert "twice" in error(["layer2", "layer2"]).message
    assert "same place" in error(["layer2", "layer2.1"]).message
    assert "would be empty" in error(["fc"]).message
    with pytest.raises(XdslError, match="part names"):
        cut_model(resnet18, ["layer2"], ["up"])


def test_cut_refuses_input_used_after_the_cut() -> None:
    class Skip(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x)) + x

    with pytest.raises(XdslError, match="input 'x' is still used after the cut at 'a'"):
        cut_model(Skip(), ["a"], ["up", "down"])


def test_cut_follows_train_eval_mode_of_stochastic_modules() -> None:
    from torchvision.ops import StochasticDepth

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.drop, self.b = nn.Linear(8, 8), StochasticDepth(0.5, "row"), nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x)
            return self.b(h + self.drop(h))

    net = Net()
    parts = compose(list(cut_model(net, ["a"], ["up", "down"]).values()))
    x = torch.randn(16, 8)
    for mode in (True, False):
        net.train(mode)
        torch.manual_seed(1)
        expected = net(x)
        torch.manual_seed(1)
        assert torch.equal(parts(x), expected)


def test_cut_refuses_networks_with_training_only_outputs() -> None:
    model = build_model("torchvision.googlenet", {"init_weights": False}, device="meta")
    with pytest.raises(XdslError, match="different code in train and eval mode") as err:
        cut_model(model, ["inception4a"], ["up", "down"])
    assert "aux_logits=false" in (err.value.hint or "")
    model = build_model("torchvision.googlenet", {"init_weights": False, "aux_logits": False}, device="meta")
    assert len(cut_model(model, ["inception4a"], ["up", "down"])) == 2


def test_cut_points_available_lists_block_boundaries(resnet18: nn.Module) -> None:
    available = cut_points_available(resnet18)
    assert {"layer1", "layer2", "layer2.0", "layer3.1", "avgpool"} <= set(available)
    assert "layer2.0.conv1" not in available and "fc" not in available
    assert available.index("layer1") < available.index("layer2") < available.index("layer3")


# --- shapes and parameter counts ------------------------------------------------------------------


def test_shapes_at_layer2_for_64x64_input(resnet18: nn.Module) -> None:
    parts = cut_model(resnet18, ["layer2"], ["up", "down"])
    tracked = resnet18.bn1.num_batches_tracked.clone()
    resnet18.train()
    assert infer_shapes(list(parts.values()), torch.randn(5, 3, 64, 64)) == [(5, 128, 8, 8), (5, 200)]
    assert torch.equal(resnet18.bn1.num_batches_tracked, tracked)  # nothing real ran
    resnet18.eval()
    _, halves = _halves("torchvision.resnet50", num_classes=200)
    sample = torch.empty(5, 3, 64, 64, device="meta")
    assert infer_shapes(list(halves.values()), sample) == [(5, 512, 8, 8), (5, 200)]
    assert infer_shape(halves["down"], (5, 512, 8, 8)) == (5, 200)
    with pytest.raises(XdslError, match=r"part 'down' cannot take a tensor of shape \(5, 3, 64, 64\)"):
        infer_shapes([halves["down"]], sample, names=["down"])


def test_param_count_counts_shared_parameters_once() -> None:
    lin = nn.Linear(3, 4)
    assert param_count(lin) == 16 and param_count([lin, nn.Sequential(lin)]) == 16


# Seed 000's tables, as torchvision builds the halves (num_classes=200, cut after layer2).
SEED_HALVES = {
    "resnet18": (683_072, 10_596_040),
    "resnet50": (1_444_928, 22_472_904),
    "resnext50_32x4d": (1_412_416, 21_977_288),
    "wide_resnet50_2": (4_126_528, 63_117_512),
}


@pytest.mark.parametrize("arch", sorted(SEED_HALVES))
def test_half_parameter_counts_match_seed_000(arch: str) -> None:
    _, halves = _halves(f"torchvision.{arch}", num_classes=200)
    assert (param_count(halves["up"]), param_count(halves["down"])) == SEED_HALVES[arch]


def test_seed_000_first_table_is_a_3x3_stem_with_100_classes() -> None:
    """The seed's first table (ResNet18 675,392 / 10,544,740; ResNet34 1,340,224 / 19,988,068) differs
    from torchvision's 200-class halves (683,072 / 10,596,040 and 1,347,904 / 20,039,368); it matches a
    CIFAR-style 3x3 stem conv and a 100-class fc exactly."""
    for arch, seed in {"resnet18": (675_392, 10_544_740), "resnet34": (1_340_224, 19_988_068)}.items():
        model = build_model(f"torchvision.{arch}", {"num_classes": 100}, device="meta")
        with torch.device("meta"):
            model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        halves = cut_model(model, ["layer2"], ["up", "down"])
        assert (param_count(halves["up"]), param_count(halves["down"])) == seed
    _, halves = _halves("torchvision.resnet34", num_classes=200)
    assert (param_count(halves["up"]), param_count(halves["down"])) == (1_347_904, 20_039_368)


# --- adapters -------------------------------------------------------------------------------------


def test_adapter_channels_come_from_shapes() -> None:
    up18 = torch.Size([2, 128, 8, 8])  # resnet18 after layer2 on 64x64
    up_x50 = torch.Size([2, 512, 8, 8])  # resnext50 after layer2
    a = make_adapter("conv1x1", {"relu": True}, up18, up_x50, 200)
    conv = a[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (128, 512, (1, 1))
    assert isinstance(a[-1], nn.ReLU) and a(torch.randn(up18)).shape == up_x50
    b = make_adapter("conv1x1", {}, up_x50, up18, 200)
    assert (b[0].in_channels, b[0].out_channels) == (512, 128) and len(b) == 1
    down = make_adapter("conv3x3", {"bn": True}, torch.Size([2, 64, 16, 16]), up18, None)
    assert down[0].stride == (2, 2) and down(torch.randn(2, 64, 16, 16)).shape == up18
    with pytest.raises(XdslError, match=r"\(2, 128, 8, 8\) to \(2, 512, 6, 6\)"):
        make_adapter("conv1x1", {}, up18, torch.Size([2, 512, 6, 6]), None)
    fit = make_adapter("regressor", {}, up18, up_x50, None)
    assert fit[0].kernel_size == (3, 3) and fit(torch.randn(up18)).shape == up_x50
    flat = make_adapter("linear", {"relu": True}, torch.Size([2, 64]), torch.Size([2, 32]), None)
    assert flat(torch.randn(2, 64)).shape == (2, 32)
    assert isinstance(make_adapter("identity", {}, up18, up18, None), nn.Identity)
    with pytest.raises(XdslError):
        make_adapter("identity", {}, up18, up_x50, None)


def test_head_adapter_is_a_byot_classifier() -> None:
    head = make_adapter("head", {}, torch.Size([2, 128, 8, 8]), None, 200)
    assert [name for name, _ in head.named_children()] == ["bottleneck", "pool", "fc"]
    assert head(torch.randn(2, 128, 8, 8)).shape == (2, 200)
    assert head.bottleneck(torch.randn(2, 128, 8, 8)).shape == (2, 128, 8, 8)
    wide = make_adapter("head", {"out_channels": 512, "num_classes": 10}, torch.Size([2, 64, 16, 16]), None, 200)
    assert wide(torch.randn(2, 64, 16, 16)).shape == (2, 10)
    with pytest.raises(XdslError, match="number of classes"):
        make_adapter("head", {}, torch.Size([2, 128, 8, 8]), None, None)


def test_adapter_options_are_checked() -> None:
    assert {"identity", "conv1x1", "conv3x3", "linear", "head", "regressor"} <= set(ADAPTERS.names())
    assert adapter_params("conv1x1") == {"relu": False, "bn": False, "channels": None}
    assert adapter_params("head")["reduction"] == 4
    shape = torch.Size([2, 8, 4, 4])
    with pytest.raises(XdslError) as err:
        make_adapter("conv1x1", {"rleu": True}, shape, shape, None)
    assert "'rleu'" in err.value.message and err.value.hint == "did you mean 'relu'?"
    with pytest.raises(XdslError, match="true or false"):
        make_adapter("conv1x1", {"relu": 1}, shape, shape, None)
    with pytest.raises(XdslError) as err:
        make_adapter("conv1x2", {}, shape, shape, None)
    assert err.value.hint == "did you mean 'conv1x1'?"
    assert joinable((5, 128, 8, 8), (2, 128, 8, 8)) and not joinable((5, 128, 8, 8), (5, 512, 8, 8))


def test_conv_adapter_channels_option_sets_the_width_of_a_chain() -> None:
    shape = torch.Size([2, 8, 4, 4])
    widen = make_adapter("conv1x1", {"channels": 32}, shape, None, None)
    assert widen(torch.randn(shape)).shape == (2, 32, 4, 4)
    with pytest.raises(XdslError, match="channels=32, but what follows it has 8 channels"):
        make_adapter("conv1x1", {"channels": 32}, shape, shape, None)
