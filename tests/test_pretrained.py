"""Pretrained weights from the local torch hub cache (torchvision's weights API, timm's pretrained_cfg),
never downloaded: the file torchvision expects under a temporary TORCH_HOME is loaded exactly, a missing
one is a note at check time and an error naming the file at run time, `new_head=true` re-initialises
only the classifier."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import torchvision
from typer.testing import CliRunner

from xdsl.cli import app
from xdsl.compile.build import build_model
from xdsl.compile.pretrained import find_heads, hub_checkpoint
from xdsl.errors import SpecError, XdslError
from xdsl.experiment import compile_program

R18_FILE = "resnet18-f37072fd.pth"  # basename of ResNet18_Weights.IMAGENET1K_V1.url


@functools.lru_cache(maxsize=1)
def _r18_state() -> dict[str, torch.Tensor]:
    """A randomly initialised resnet18 (seed 7): distinguishable from any other initialisation."""
    torch.manual_seed(7)
    return {k: v.clone() for k, v in torchvision.models.resnet18().state_dict().items()}


@pytest.fixture
def torch_home(tmp_path: Path, monkeypatch) -> Path:
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home


@pytest.fixture
def r18_file(torch_home: Path) -> Path:
    file = torch_home / "hub" / "checkpoints" / R18_FILE
    file.parent.mkdir(parents=True)
    torch.save(_r18_state(), file)
    return file


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], skip: str = "~") -> bool:
    return all(torch.equal(a[k], b[k]) for k in b if not k.startswith(skip)) and set(a) == set(b)


def test_the_file_name_is_the_one_torchvision_downloads_to(torch_home: Path) -> None:
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert hub_checkpoint(url) == torch_home / "hub" / "checkpoints" / R18_FILE


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])
def test_torchvision_weights_load_exactly_the_cached_file(r18_file: Path, name: str) -> None:
    notes: list[str] = []
    model = build_model("torchvision.resnet18", {"weights": name}, notes=notes)
    assert _equal(model.state_dict(), _r18_state())
    assert notes == [f"torchvision.resnet18 weights {name}{' (= IMAGENET1K_V1)' if name == 'DEFAULT' else ''}: "
                     f"{r18_file}"]


def test_missing_file_is_an_error_naming_file_directory_and_url(torch_home: Path) -> None:
    with pytest.raises(XdslError) as err:
        build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1"})
    expected = torch_home / "hub" / "checkpoints" / R18_FILE
    assert str(expected) in err.value.message and "never downloads" in err.value.message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in err.value.hint
    assert str(expected.parent) in err.value.hint


def test_on_meta_a_missing_file_is_a_note_and_nothing_is_read(torch_home: Path) -> None:
    notes: list[str] = []
    model = build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1"}, device="meta", notes=notes)
    assert all(p.is_meta for p in model.parameters())
    assert len(notes) == 1 and "is not there yet" in notes[0] and R18_FILE in notes[0]


def test_new_head_replaces_only_the_classifier(r18_file: Path) -> None:
    notes: list[str] = []
    torch.manual_seed(0)
    model = build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1", "num_classes": 200, "new_head": True},
                        notes=notes)
    assert model.fc.out_features == 200 and model.fc.weight.shape == (200, 512)
    assert _equal({k: v for k, v in model.state_dict().items() if not k.startswith("fc.")},
                  {k: v for k, v in _r18_state().items() if not k.startswith("fc.")})
    assert not torch.equal(model.fc.weight[:200], _r18_state()["fc.weight"][:200])
    assert notes[-1] == "torchvision.resnet18 fc: 1000 -> 200 classes, re-initialised"
    bound = 1 / 512 ** 0.5  # nn.Linear's default init, as resnet18(num_classes=200) initialises its fc
    assert model.fc.weight.abs().max() <= bound and model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 200)


def test_without_new_head_a_class_count_mismatch_says_to_add_it(torch_home: Path) -> None:
    with pytest.raises(XdslError) as err:
        build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1", "num_classes": 200}, device="meta")
    assert "1000 classes" in err.value.message and "new_head=true" in err.value.hint


def test_bad_weight_names_get_did_you_mean(torch_home: Path) -> None:
    with pytest.raises(XdslError) as err:
        build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V2"}, device="meta")
    assert err.value.message == "torchvision.resnet18: unknown weights 'IMAGENET1K_V2'"
    assert err.value.hint.startswith("did you mean 'IMAGENET1K_V1'?")
    with pytest.raises(XdslError) as err:
        build_model("torchvision.resnet18", {"weights": "ResNet50_Weights.IMAGENET1K_V2"}, device="meta")
    assert "not resnet18's" in err.value.message and "ResNet18_Weights" in err.value.hint
    with pytest.raises(XdslError, match="not pretrained"):
        build_model("torchvision.resnet18", {"pretrained": True}, device="meta")
    with pytest.raises(XdslError, match="new_head=true replaces the classifier of pretrained weights"):
        build_model("torchvision.resnet18", {"new_head": True}, device="meta")


def test_a_local_file_still_wins_and_weight_names_need_torchvision(tmp_path: Path, torch_home: Path) -> None:
    torch.save(_r18_state(), tmp_path / "DEFAULT")  # a file named like a weights enum is a file
    model = build_model("torchvision.resnet18", {"weights": "DEFAULT"}, spec_dir=tmp_path)
    assert _equal(model.state_dict(), _r18_state())
    with pytest.raises(XdslError, match="names torchvision weights"):
        build_model("builtin.cnn", {"weights": "IMAGENET1K_V1"}, device="meta")


def test_a_file_that_does_not_fit_is_one_error(torch_home: Path) -> None:
    file = torch_home / "hub" / "checkpoints" / R18_FILE
    file.parent.mkdir(parents=True)
    torch.save({"fc.weight": torch.zeros(3, 3)}, file)
    with pytest.raises(XdslError, match="do not fit"):
        build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1"})
    file.write_bytes(b"not a checkpoint")
    with pytest.raises(XdslError, match="cannot read"):
        build_model("torchvision.resnet18", {"weights": "IMAGENET1K_V1"})


def test_find_heads_generic() -> None:
    with torch.device("meta"):
        assert find_heads(torchvision.models.resnet18(), 1000) == ["fc"]
        assert find_heads(torchvision.models.vgg11(), 1000) == ["classifier.6"]
        assert find_heads(torchvision.models.vit_b_16(), 1000) == ["heads.head"]
        assert find_heads(torchvision.models.squeezenet1_0(), 1000) == ["classifier.1"]
        assert find_heads(torchvision.models.googlenet(aux_logits=True, init_weights=False), 1000) == \
            ["aux1.fc2", "aux2.fc2", "fc"]


def test_new_head_on_meta_for_other_torchvision_families(torch_home: Path) -> None:
    for ref, head in [("torchvision.mobilenet_v2", "classifier.1"), ("torchvision.densenet121", "classifier"),
                      ("torchvision.squeezenet1_1", "classifier.1")]:
        notes: list[str] = []
        model = build_model(ref, {"weights": "DEFAULT", "num_classes": 751, "new_head": True}, device="meta",
                            notes=notes)
        assert notes[-1] == f"{ref} {head}: 1000 -> 751 classes, re-initialised"
        assert model.get_submodule(head).weight.shape[0] == 751


SPEC = """data synthetic(shape=[3, 32, 32], num_classes=200, train_size=8, test_size=8, batch_size=4)
network net = torchvision.resnet18(weights="IMAGENET1K_V1", num_classes=200, new_head=true)
train t { minimize ce(net, y) wrt net; optimizer sgd(lr=1e-9); epochs 1; max_steps 1 }
"""


def test_spec_check_notes_and_build_through_assemble(tmp_path: Path, torch_home: Path) -> None:
    spec = tmp_path / "p.xspec"
    spec.write_text(SPEC)
    result = CliRunner().invoke(app, ["check", "--strict", str(spec)])
    assert result.exit_code == 0 and result.output.startswith(f"ok: {spec}: "), result.output
    assert "note: network net: torchvision.resnet18 weights IMAGENET1K_V1:" in result.output
    assert "is not there yet" in result.output and "fc: 1000 -> 200 classes, re-initialised" in result.output
    with pytest.raises(SpecError) as err:  # a run compiles on a real device before training
        compile_program(spec, device="cpu")
    assert err.value.pos is not None and err.value.pos.line == 2 and R18_FILE in err.value.message
    file = torch_home / "hub" / "checkpoints" / R18_FILE
    file.parent.mkdir(parents=True)
    torch.save(_r18_state(), file)
    compiled = compile_program(spec, device="cpu")
    assert _equal(compiled.networks["net"].state_dict(), _r18_state(), skip="fc.")
    assert compiled.num_classes == 200 and compiled.notes[-1].endswith("fc: 1000 -> 200 classes, re-initialised")


def test_run_prints_the_head_and_trains_from_the_loaded_weights(tmp_path: Path, r18_file: Path, capsys) -> None:
    from xdsl.train.runner import RunOptions, run

    spec = tmp_path / "p.xspec"
    spec.write_text(SPEC)
    torch.set_num_threads(1)
    run(spec, RunOptions(out=tmp_path / "run", quiet=False, device="cpu", compile=False, amp="none", threads=1))
    assert "network net: torchvision.resnet18 fc: 1000 -> 200 classes, re-initialised" in capsys.readouterr().out
    final = torch.load(tmp_path / "run" / "checkpoints" / "t" / "final.pt", weights_only=True)
    saved = {k[len("parts.net.all."):]: v for k, v in final["modules"].items() if k.startswith("parts.net.all.")}
    # lr 1e-9: the trained weights are the loaded ones (BatchNorm running statistics aside)
    assert all(torch.allclose(saved[k], v, atol=1e-6) for k, v in _r18_state().items()
               if not k.startswith("fc.") and "running" not in k and "num_batches" not in k)
    assert saved["fc.weight"].shape == (200, 512)
    r18_file.unlink()  # evaluating the checkpoint needs no ImageNet file: the checkpoint replaces the weights
    result = CliRunner().invoke(app, ["eval", str(spec), "--checkpoint", str(tmp_path / "run" / "checkpoints" / "t" /
                                                                            "final.pt"), "--device", "cpu"])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output


def test_timm_pretrained_from_the_torch_hub_cache(torch_home: Path, tmp_path: Path, monkeypatch) -> None:
    timm = pytest.importorskip("timm")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))  # an empty Hugging Face cache
    cfg = timm.models.get_pretrained_cfg("resnet18")
    file = hub_checkpoint(cfg.url)
    file.parent.mkdir(parents=True)
    torch.manual_seed(3)
    state = timm.create_model("resnet18").state_dict()
    torch.save(state, file)
    notes: list[str] = []
    model = build_model("timm.resnet18", {"pretrained": True}, notes=notes)
    assert _equal(model.state_dict(), state) and notes == [f"timm.resnet18 weights pretrained "
                                                           f"({cfg.hf_hub_id}): {file}"]
    model = build_model("timm.resnet18", {"pretrained": True, "num_classes": 10, "new_head": True}, notes=notes)
    assert model.fc.out_features == 10 and notes[-1] == "timm.resnet18 fc: 1000 -> 10 classes, re-initialised"
    file.unlink()
    with pytest.raises(XdslError) as err:
        build_model("timm.resnet18", {"pretrained": True})
    assert str(file) in err.value.message and cfg.url in err.value.hint
    with pytest.raises(XdslError) as err:
        build_model("timm.resnet18", {"pretrained": True, "num_classes": 10}, device="meta")
    assert "new_head=true" in err.value.hint
    notes = []  # a checkpoint only on the Hugging Face hub: the note says how to fill the cache
    build_model("timm.mobilenetv1_100", {"pretrained": True, "num_classes": 751, "new_head": True}, device="meta",
                notes=notes)
    assert "huggingface-cli download timm/mobilenetv1_100." in notes[0] and str(tmp_path / "hf") in notes[0]
    assert notes[1] == "timm.mobilenetv1_100 classifier: 1000 -> 751 classes, re-initialised"


def test_timm_pretrained_from_the_hugging_face_cache(torch_home: Path, tmp_path: Path, monkeypatch) -> None:
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    cfg = timm.models.get_pretrained_cfg("resnet18")
    repo = tmp_path / "hf" / f"models--{cfg.hf_hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    torch.manual_seed(5)
    state = timm.create_model("resnet18").state_dict()
    file = repo / "snapshots" / "abc123" / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    notes: list[str] = []
    model = build_model("timm.resnet18", {"pretrained": True}, notes=notes)
    assert _equal(model.state_dict(), state) and notes[-1].endswith(str(file))


SHIPPED = Path(__file__).resolve().parent.parent / "specs" / "xml_pretrained_resnet34_resnet18_tinyimagenet.xspec"


def test_shipped_pretrained_spec_checks_without_the_files_and_run_stops_before_training(torch_home: Path,
                                                                                         tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["check", "--strict", str(SHIPPED)])
    assert result.exit_code == 0 and result.output.startswith(f"ok: {SHIPPED}: "), result.output
    assert "resnet34-b627a593.pth is not there yet" in result.output
    assert "net2: torchvision.resnet18 fc: 1000 -> 200 classes, re-initialised" in result.output
    result = CliRunner().invoke(app, ["run", str(SHIPPED), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    expected = torch_home / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert f"{SHIPPED}:16:" in result.output and str(expected) in result.output
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


MARKET_PRETRAINED = SHIPPED.parent / "dml_market1501_mobilenet_pretrained.xspec"
MOBILENET_HUB_ID = "timm/mobilenetv1_100.ra4_e3600_r224_in1k"


def test_shipped_timm_pretrained_spec_checks_without_the_files_and_run_stops_before_training(
        torch_home: Path, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("timm")
    hf = tmp_path / "hf"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))  # an empty Hugging Face cache
    result = CliRunner().invoke(app, ["check", "--strict", str(MARKET_PRETRAINED)])
    assert result.exit_code == 0 and result.output.startswith(f"ok: {MARKET_PRETRAINED}: "), result.output
    folder = hf / f"models--{MOBILENET_HUB_ID.replace('/', '--')}"
    assert f"{folder} is not there yet" in result.output
    assert f"huggingface-cli download {MOBILENET_HUB_ID}" in result.output
    assert "net2: timm.mobilenetv1_100 classifier: 1000 -> 751 classes, re-initialised" in result.output
    result = CliRunner().invoke(app, ["run", str(MARKET_PRETRAINED), "--out", str(tmp_path / "run"), "--device", "cpu"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    line = next(i for i, t in enumerate(MARKET_PRETRAINED.read_text().splitlines(), 1) if t.startswith("network"))
    assert f"{MARKET_PRETRAINED}:{line}:" in result.output and str(folder) in result.output
    assert f"huggingface-cli download {MOBILENET_HUB_ID}" in result.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_shipped_timm_pretrained_spec_loads_exactly_the_cached_checkpoint(torch_home: Path, tmp_path: Path,
                                                                         monkeypatch) -> None:
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert timm.models.get_pretrained_cfg("mobilenetv1_100").hf_hub_id == MOBILENET_HUB_ID
    repo = tmp_path / "hf" / f"models--{MOBILENET_HUB_ID.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("f00d")
    (repo / "snapshots" / "f00d").mkdir(parents=True)
    torch.manual_seed(11)
    state = timm.create_model("mobilenetv1_100").state_dict()
    file = repo / "snapshots" / "f00d" / "model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    compiled = compile_program(MARKET_PRETRAINED, device="cpu")  # no data needed to build the networks
    assert compiled.num_classes == 751
    for net in ("net1", "net2"):
        assert f"network {net}: timm.mobilenetv1_100 weights pretrained ({MOBILENET_HUB_ID}): {file}" in compiled.notes
        model = compiled.networks[net]
        assert _equal(model.state_dict(), state, skip="classifier.")
        assert model.classifier.weight.shape == (751, 1024)  # a new head, not the checkpoint's
        with torch.no_grad():  # the retrieval feature: the 1024-d output of the last pooling layer
            assert model.global_pool(model.forward_features(torch.zeros(1, 3, 64, 64))).shape == (1, 1024)
    assert not torch.equal(compiled.networks["net1"].classifier.weight, compiled.networks["net2"].classifier.weight)


GOOGLENET_FILE = "googlenet-1378be20.pth"  # basename of GoogLeNet_Weights.IMAGENET1K_V1.url


def test_googlenet_weights_with_aux_logits_false_load_and_drop_the_aux_heads(torch_home: Path) -> None:
    """torchvision refuses aux_logits=False with weights; xdsl loads the file (aux heads and all) and drops them."""
    assert hub_checkpoint(torchvision.models.GoogLeNet_Weights.IMAGENET1K_V1.url).name == GOOGLENET_FILE
    file = torch_home / "hub" / "checkpoints" / GOOGLENET_FILE
    file.parent.mkdir(parents=True)
    torch.manual_seed(9)
    state = torchvision.models.googlenet(aux_logits=True, init_weights=True).state_dict()
    torch.save(state, file)
    notes: list[str] = []
    model = build_model("torchvision.googlenet", {"weights": "IMAGENET1K_V1", "aux_logits": False, "num_classes": 751,
                                                  "new_head": True, "transform_input": False}, notes=notes)
    assert notes == [f"torchvision.googlenet weights IMAGENET1K_V1: {file}",
                     "torchvision.googlenet fc: 1000 -> 751 classes, re-initialised"]
    assert model.aux1 is None and model.aux2 is None and not model.aux_logits and not model.transform_input
    kept = {k: v for k, v in state.items() if not k.startswith(("aux1.", "aux2."))}
    assert _equal(model.state_dict(), kept, skip="fc.") and model.fc.weight.shape == (751, 1024)
    model.train()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 751)  # a tensor, not GoogLeNetOutputs


def test_inception_v3_weights_with_aux_logits_false_drop_the_aux_head_on_meta(torch_home: Path) -> None:
    notes: list[str] = []
    model = build_model("torchvision.inception_v3", {"weights": "IMAGENET1K_V1", "aux_logits": False,
                                                     "num_classes": 751, "new_head": True}, device="meta", notes=notes)
    assert model.AuxLogits is None and not model.aux_logits
    assert "inception_v3_google-0cc3c7bd.pth is not there yet" in notes[0]
    assert notes[1:] == ["torchvision.inception_v3 fc: 1000 -> 751 classes, re-initialised"]
    notes = []  # aux_logits left out: torchvision's default with weights keeps the head, and new_head renews it
    model = build_model("torchvision.inception_v3", {"weights": "IMAGENET1K_V1", "num_classes": 751,
                                                     "new_head": True}, device="meta", notes=notes)
    assert model.AuxLogits is not None and model.aux_logits
    assert "torchvision.inception_v3 AuxLogits.fc: 1000 -> 751 classes, re-initialised" in notes


def test_new_head_with_a_local_state_dict_file(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_model("builtin.cnn", {"width": 8, "num_classes": 10})
    torch.save(source.state_dict(), tmp_path / "digits10.pt")
    notes: list[str] = []
    model = build_model("builtin.cnn", {"width": 8, "num_classes": 5, "weights": "digits10.pt", "new_head": True},
                        spec_dir=tmp_path, notes=notes)
    assert model.fc.out_features == 5 and notes == ["builtin.cnn fc: 10 -> 5 classes, re-initialised"]
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in kept.items())
    notes = []  # on the meta device the file is read memory-mapped: keys and shapes checked, note given
    build_model("builtin.cnn", {"width": 8, "num_classes": 5, "weights": "digits10.pt", "new_head": True},
                spec_dir=tmp_path, device="meta", notes=notes)
    assert notes == ["builtin.cnn fc: 10 -> 5 classes, re-initialised"]
    with pytest.raises(XdslError, match="do not fit"):
        build_model("builtin.cnn", {"width": 16, "num_classes": 5, "weights": "digits10.pt", "new_head": True},
                    spec_dir=tmp_path, device="meta")
    with pytest.raises(XdslError, match="do not fit") as err:  # without new_head the class counts must agree
        build_model("builtin.cnn", {"width": 8, "num_classes": 5, "weights": "digits10.pt"}, spec_dir=tmp_path)
    assert "add new_head=true" in err.value.hint
