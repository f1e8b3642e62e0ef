"""`xdsl models`: the model sources with parameter counts, a pattern filter, user modules beside a spec,
and `--cuts NAME`: the cut points a spec can write, each with its output shape; the README lists every
builtin with its keywords."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.compile.build import build_model
from xdsl.compile.catalog import builtin_keywords, cut_shapes, list_models, natural_input
from xdsl.compile.cut import cut_model
from xdsl.models import MODELS
from xdsl.shapes import infer_shape, param_count

README = Path(__file__).resolve().parent.parent / "README.md"
BUILTINS = [n for n in MODELS.names() if n.startswith("builtin.")]


def _invoke(*args: str):
    result = CliRunner().invoke(app, ["models", *args])
    assert "Traceback" not in result.output and (result.exception is None or isinstance(result.exception,
                                                                                        SystemExit))
    return result


def _rows(output: str) -> dict[str, list[str]]:
    """model -> its cells, from a rich table printed without a terminal."""
    rows = {}
    for line in output.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)[1:-1]]
        if cells:
            rows[cells[0]] = cells[1:]
    return rows


def test_lists_every_builtin_with_its_parameter_count_and_keywords() -> None:
    result = _invoke()
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    for ref in BUILTINS:
        assert rows[ref][0] == "builtin"
        assert rows[ref][1] == f"{param_count(build_model(ref, {}, device='meta')):,}"
        assert rows[ref][2] == builtin_keywords(ref)
    assert rows["torchvision.resnet18"][1] == "11,689,512" and '"IMAGENET1K_V1"' in rows["torchvision.resnet18"][2]


def test_every_torchvision_model_is_counted_fast_and_right_at_1000_classes() -> None:
    entries, notes = list_models(sources=["torchvision"])
    assert len(entries) > 70 and not notes and all(e.params for e in entries)
    for e in entries:  # the weights' metadata agrees with counting the built model (cheap ones checked)
        if e.ref in ("torchvision.resnet18", "torchvision.mobilenet_v2", "torchvision.vit_b_16",
                     "torchvision.densenet121", "torchvision.squeezenet1_0"):
            assert e.params == param_count(build_model(e.ref, {}, device="meta")), e.ref


def test_pattern_filters_by_glob_or_substring() -> None:
    rows = _rows(_invoke("*resnet1*").output)
    assert "torchvision.resnet18" in rows and "torchvision.resnet101" in rows and "builtin.resnet" not in rows
    assert "builtin.resnet18_cifar" in rows and "torchvision.vgg11" not in rows
    rows = _rows(_invoke("mobilenet").output)
    assert {"builtin.mobilenet_v1", "torchvision.mobilenet_v2"} <= set(rows) and "builtin.cnn" not in rows
    result = _invoke("no_such_model_anywhere")
    assert result.exit_code == 2 and "no model matches" in result.output
    rows = _rows(_invoke("--no-params", "cnn").output)
    assert rows["builtin.cnn"] == ["builtin", builtin_keywords("builtin.cnn")]


def test_user_modules_beside_a_spec(tmp_path: Path) -> None:
    (tmp_path / "mynets.py").write_text(
        "from torch import nn\n\n"
        "def tiny(num_classes: int = 3, width=4):\n"
        "    return nn.Sequential(nn.Flatten(), nn.Linear(12, width), nn.ReLU(), nn.Linear(width, num_classes))\n\n"
        "def helper(x):\n    return x\n\n"
        "def _private():\n    return None\n")
    (tmp_path / "s.xspec").write_text("network n = \"mynets:tiny\"()\n")
    rows = _rows(_invoke("--spec", str(tmp_path / "s.xspec"), "mynets").output)
    assert rows["mynets:tiny"] == ["user (mynets.py)", f"{12 * 4 + 4 + 4 * 3 + 3:,}", "num_classes=3, width=4"]
    assert rows["mynets:helper"][1] == "?" and "missing 1 required positional argument" in rows["mynets:helper"][2]
    assert not any("_private" in r for r in rows)
    result = _invoke("--dir", str(tmp_path), "--cuts", "mynets:tiny", "--input", "3,2,2")
    assert result.exit_code == 0 and _rows(result.output)["1"] == ["(4,)"]


def test_cuts_of_torchvision_resnet18_at_224() -> None:
    result = _invoke("--cuts", "torchvision.resnet18")
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    assert rows["layer2"] == ["(128, 28, 28)"] and rows["layer4"] == ["(512, 7, 7)"]
    assert rows["(output)"] == ["(1000,)"] and "input (3, 224, 224)" in result.output
    assert _rows(_invoke("--cuts", "torchvision.resnet18", "--input", "3,64,64").output)["layer2"] == ["(128, 8, 8)"]


@pytest.mark.parametrize("ref", BUILTINS)
def test_cuts_of_every_builtin_match_cutting_it_there(ref: str) -> None:
    model, shape, rows = cut_shapes(ref)
    assert shape == natural_input(ref) and rows[-1][0] == "(output)"
    points = dict(rows[:-1])
    for point in list(points)[:: max(1, len(points) // 4)]:  # a few points: cut there, shape the upper part
        up = cut_model(model, [point], ["up", "down"])["up"]
        assert tuple(infer_shape(up, (2, *shape))[1:]) == points[point], (ref, point)


def test_builtin_cut_points_are_listed() -> None:
    rows = _rows(_invoke("--cuts", "builtin.cnn").output)
    assert rows["layer2"] == ["(32, 4, 4)"] and rows["(output)"] == ["(10,)"]


def test_unknown_names_and_bad_inputs_are_one_error() -> None:
    result = _invoke("--cuts", "torchvision.resnt18")
    assert result.exit_code == 2 and "did you mean 'torchvision.resnet18'?" in result.output
    result = _invoke("--cuts", "resnet18")  # a bare name: the sources' model of that name (timm's too, if installed)
    assert result.exit_code == 2 and "did you mean 'torchvision.resnet18'" in result.output
    result = _invoke("--cuts", "builtin.cnn", "--input", "3,x")
    assert result.exit_code == 2 and "--input takes positive integers" in result.output
    result = _invoke("--cuts", "builtin.cnn", "--input", "3,32,32")  # cnn has in_channels=1
    assert result.exit_code == 2 and "cannot take an input of shape (3, 32, 32)" in result.output


def test_readme_lists_every_builtin_with_its_keywords() -> None:
    text = README.read_text()
    section = text[text.index("## Models"):text.index("## Pretrained weights")]
    for ref in BUILTINS:
        row = next((line for line in section.splitlines() if line.startswith(f"| `{ref}` |")), None)
        assert row is not None, f"README's Models table lacks {ref}"
        assert f"`{builtin_keywords(ref)}`" in row and f"{param_count(build_model(ref, {}, device='meta')):,}" in row
