"""Benchmark harness: xdsl's generated training steps against hand-written PyTorch of the same experiments.

    python -m benchmarks.run                                   # builtin.cnn on 1x8x8, batch 64, CPU eager
    python -m benchmarks.run --model builtin.resnet            # CIFAR ResNet-8 on 3x32x32
    python -m benchmarks.run --model torchvision.resnet18 --input 3x64x64 --batch 64   # the XML paper's input size
    python -m benchmarks.run --device cuda --compile --amp bf16                        # GPU path

Every variant trains its own copy of two networks cut at "layer2" on one synthetic batch. The variants
are timed INTERLEAVED in one process (round-robin, the starting variant rotating every round, after
warm-up), so a ratio is taken between samples measured side by side in the same round; on a shared,
noisy machine the ratios are the numbers to trust, the absolute times less so. Before timing, each
xdsl variant and its hand-written twin take one step from the same initial weights in eager fp32 and
must give the same losses, weights and BatchNorm buffers (torch.testing.assert_close): the two sides
compute the same thing. Run `python -m benchmarks.run --help` for every option; BENCHMARKS.md has
the method and the numbers.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._functorch import config as functorch_config
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Config", "Variant", "VARIANTS", "RATIOS", "HandWritten", "Runner", "build_runners", "count_work", "run",
           "spec_compile_times", "format_report", "main"]

ROOT = Path(__file__).resolve().parent.parent
COHORT_SPEC = "specs/xml_cohort3_wrn50_resnet50_resnext50_tinyimagenet.xspec"
SPEC_GRAPH_TARGET_S = 2.0


class Variant(NamedTuple):
    """What one timed variant trains, and who wrote its step."""

    experiment: str  # xml | dml
    author: str      # xdsl (the generated step) | hand (HandWritten)
    order: str       # alternating | simultaneous
    eager: bool = False  # run eagerly even under --compile (the compile speedup's baseline)


VARIANTS: dict[str, Variant] = {
    "xml-xdsl-alternating": Variant("xml", "xdsl", "alternating"),
    "xml-hand-alternating": Variant("xml", "hand", "alternating"),
    "xml-xdsl-simultaneous": Variant("xml", "xdsl", "simultaneous"),
    "xml-hand-simultaneous": Variant("xml", "hand", "simultaneous"),
    "dml-xdsl-alternating": Variant("dml", "xdsl", "alternating"),
    "dml-hand-alternating": Variant("dml", "hand", "alternating"),
    # A/A control: a second, identical hand-written copy; its ratio to the first is the noise floor
    "xml-hand-alternating-copy": Variant("xml", "hand", "alternating"),
    # under --compile: xdsl's step without torch.compile, timed in the same rounds
    "xml-xdsl-alternating-eager": Variant("xml", "xdsl", "alternating", eager=True),
}
DEFAULT_VARIANTS = tuple(n for n, v in VARIANTS.items() if not v.eager)

# (label, numerator, denominator, target: the wall-time median ratio must be <= target; None = reported only)
RATIOS: list[tuple[str, str, str, float | None]] = [
    ("XML alternating: xdsl / hand-written", "xml-xdsl-alternating", "xml-hand-alternating", 1.05),
    ("XML: xdsl simultaneous / hand-written alternating", "xml-xdsl-simultaneous", "xml-hand-alternating", 0.60),
    ("XML simultaneous: xdsl / hand-written", "xml-xdsl-simultaneous", "xml-hand-simultaneous", 1.05),
    ("DML alternating: xdsl / hand-written", "dml-xdsl-alternating", "dml-hand-alternating", 1.05),
    ("A/A control: hand-written / identical copy (noise floor)", "xml-hand-alternating",
     "xml-hand-alternating-copy", None),
    ("XML alternating, xdsl: torch.compile / eager", "xml-xdsl-alternating", "xml-xdsl-alternating-eager", None),
]

_OPTIMIZERS = {  # spec text, the papers' settings
    "adam": "adam(lr=1e-4)",  # the XML paper
    "sgd": "sgd(lr=0.1, momentum=0.9, nesterov=true, weight_decay=5e-4)",  # the DML paper
}


@dataclass
class Config:
    """One benchmark run. Defaults: a small model on CPU, where per-step framework overhead is most visible."""

    model: str = "builtin.cnn"            # builtin.cnn | builtin.resnet | torchvision.resnet18/34/50 ...
    input: tuple[int, ...] | None = None  # (C, H, W); None = the model's natural size (see _default_input)
    batch: int = 64                       # the DML paper's batch size
    classes: int = 10                     # synthetic labels; torchvision models get the same head size
    width: int = 16                       # builtin nets' base width
    depth: int = 8                        # builtin.resnet depth (6n+2)
    optimizer: str = "adam"               # adam = the XML paper's Adam 1e-4; sgd = the DML paper's SGD Nesterov
    device: str = "cpu"                   # cpu | cuda | cuda:N
    compile: bool = False                 # torch.compile both sides (xdsl: the generated objectives)
    compile_mode: str = "default"         # torch.compile mode: default | max-autotune-no-cudagraphs | ...
    fullgraph: bool = False               # torch.compile(fullgraph=True): a graph break is an error
    amp: str = "none"                     # none | bf16 (autocast on both sides)
    channels_last: bool = False           # NHWC weights and batch on both sides (what `xdsl run` does on CUDA)
    threads: int = 1                      # CPU threads: 1 keeps a shared 2-core machine repeatable
    steps: int = 5                        # optimisation steps per timed sample
    rounds: int = 20                      # timed samples per variant (round-robin)
    warmup: int = 3                       # untimed steps per variant first (allocations, optimiser state, compile)
    variants: tuple[str, ...] = DEFAULT_VARIANTS  # + xml-xdsl-alternating-eager to time compile's speedup
    seed: int = 0
    verify: bool = True                   # check xdsl == hand-written after one step before timing
    memory: bool = True                   # peak memory of a step, per variant
    flops: bool = True                    # FLOPs (FlopCounterMode) and aten ops of a step, per variant
    specs: tuple[str, ...] | None = None  # spec -> graph timing; None = every specs/*.xspec, () = skip
    spec_repeats: int = 3                 # warm compiles per spec (median)
    cold: bool = True                     # also time each spec's first compile in a fresh process
    profile: Path | None = None           # torch.profiler: a Chrome trace per variant here, top ops in the report

    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.input) if self.input else _default_input(self.model)


def _default_input(model: str) -> tuple[int, ...]:
    if model == "builtin.cnn":
        return (1, 8, 8)        # digits-sized
    if model.startswith("builtin."):
        return (3, 32, 32)      # CIFAR-sized
    return (3, 64, 64)          # Tiny ImageNet-sized (the XML paper)


# ---------------------------------------------------------------- the experiments as spec text

_XML_LOSS = """
loss xml(s, T) =
    ( ce(s, y)
    + mean(kl(t, s) for t in T)
    + sum(kl(t, s.up >> t.down) for t in T)
    + sum(kl(t, t.up >> s.down) for t in T)
    + sum(ce(s.up >> t.down, y) for t in T)
    + sum(ce(t.up >> s.down, y) for t in T)
    ) / (2 * len(T))
"""


def _model_call(cfg: Config) -> str:
    c = cfg.input_shape()[0]
    if cfg.model == "builtin.cnn":
        return f"builtin.cnn(num_classes={cfg.classes}, in_channels={c}, width={cfg.width})"
    if cfg.model == "builtin.resnet":
        return f"builtin.resnet(depth={cfg.depth}, num_classes={cfg.classes}, in_channels={c}, width={cfg.width})"
    return f"{cfg.model}(num_classes={cfg.classes})"


def spec_text(cfg: Config, experiment: str, order: str) -> str:
    """The .xspec of one benchmarked experiment: XML (the XML paper) or DML (the DML paper) of two networks."""
    shape = ", ".join(map(str, cfg.input_shape()))
    head = (f"data synthetic(num_classes={cfg.classes}, shape=[{shape}], batch_size={cfg.batch})\n"
            f"network net1, net2 = {_model_call(cfg)}\n")
    opt = _OPTIMIZERS[cfg.optimizer]
    if experiment == "xml":
        return (head + 'cut net1, net2 at "layer2" into up, down\n' + _XML_LOSS +
                f"train xml {{\n    minimize xml(s, peers(s)) wrt s for s in [net1, net2]\n"
                f"    optimizer {opt}\n    order {order}\n}}\n")
    return (head + "loss dml(s, T) = 0.5 * ce(s, y) + 0.5 * mean(kl(t, s) for t in T)\n"
            f"train dml {{\n    minimize dml(s, peers(s)) wrt s for s in [net1, net2]\n"
            f"    optimizer {opt}\n    order {order}\n}}\n")


# ---------------------------------------------------------------- hand-written PyTorch

def _kl(t: Tensor, s: Tensor) -> Tensor:
    """KL(softmax(t) || softmax(s)), batch mean; t is already a no-grad tensor."""
    return F.kl_div(F.log_softmax(s, dim=1), F.log_softmax(t, dim=1), reduction="batchmean", log_target=True)


def halves(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(up, down) of a network cut after layer2, as a person would slice it by hand."""
    if hasattr(model, "stem"):  # builtin.cnn / builtin.resnet: stem, layer1..3, pool (with flatten), fc
        return nn.Sequential(model.stem, model.layer1, model.layer2), nn.Sequential(model.layer3, model.pool, model.fc)
    import torchvision

    if isinstance(model, torchvision.models.ResNet):
        up = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1, model.layer2)
        return up, nn.Sequential(model.layer3, model.layer4, model.avgpool, nn.Flatten(1), model.fc)
    raise ValueError(f"no hand-written cut for {type(model).__name__}: use builtin.* or torchvision ResNets")


def _hand_optimizer(name: str, params: list[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """The optimiser a careful person picks: foreach kernels on CPU, fused Adam on CUDA (same as xdsl)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4, foreach=True)
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(params, lr=1e-4, **fast)


class HandWritten:
    """The same experiment written directly in PyTorch, on deep copies of xdsl's initial networks.

    XML, per network s with peer t: t.up and t.down(t.up) under no_grad (they get no gradient from
    s's objective); s.up computed once and reused in s.down(s.up) and t.down(s.up); s.down(t.up);
    the seed-000 formula; backward into s's parameters only; optimiser step. Alternating updates
    net1 then net2 (net2 sees net1's new weights); simultaneous does one forward of the six
    sub-results and one backward per objective. DML: t(x) under no_grad, s(x), 0.5 CE + 0.5 KL.
    """

    def __init__(self, networks: dict[str, nn.Module], experiment: str, order: str, cfg: Config,
                 device: torch.device):
        self.names = list(networks)
        self.nets = [copy.deepcopy(networks[n]) for n in self.names]
        if cfg.channels_last:
            for net in self.nets:
                net.to(memory_format=torch.channels_last)
        self.experiment, self.order = experiment, order
        self.params = [list(n.parameters()) for n in self.nets]
        self.opts = [_hand_optimizer(cfg.optimizer, p, device) for p in self.params]
        self.autocast = _autocast(cfg, device)
        self.no_donation = functorch_config.patch(donated_buffer=False) if cfg.compile else nullcontext()
        if experiment == "xml":
            self.parts = [halves(n) for n in self.nets]
            if order == "simultaneous":
                self.objectives = _maybe_compile(self._xml_joint, cfg)
            else:
                self.objective = [_maybe_compile(self._xml_one(s, 1 - s), cfg) for s in (0, 1)]
        else:
            self.objective = [_maybe_compile(self._dml_one(s, 1 - s), cfg) for s in (0, 1)]

    def modules(self) -> dict[str, nn.Module]:
        return dict(zip(self.names, self.nets))

    def _xml_one(self, s: int, t: int) -> Callable[[Tensor, Tensor], Tensor]:
        (su, sd), (tu, td) = self.parts[s], self.parts[t]

        def objective(x: Tensor, y: Tensor) -> Tensor:
            with torch.no_grad():
                t_up = tu(x)
                t_logits = td(t_up)
            s_up = su(x)
            s_logits = sd(s_up)
            s_up_t_down = td(s_up)
            t_up_s_down = sd(t_up)
            return (F.cross_entropy(s_logits, y) + _kl(t_logits, s_logits) + _kl(t_logits, s_up_t_down)
                    + _kl(t_logits, t_up_s_down) + F.cross_entropy(s_up_t_down, y)
                    + F.cross_entropy(t_up_s_down, y)) / 2

        return objective

    def _xml_joint(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        (u1, d1), (u2, d2) = self.parts
        up1 = u1(x)
        z11 = d1(up1)  # z_ab = a.up >> b.down
        up2 = u2(x)
        z22 = d2(up2)
        z12, z21 = d2(up1), d1(up2)
        t11, t22 = z11.detach(), z22.detach()
        loss1 = (F.cross_entropy(z11, y) + _kl(t22, z11) + _kl(t22, z12) + _kl(t22, z21)
                 + F.cross_entropy(z12, y) + F.cross_entropy(z21, y)) / 2
        loss2 = (F.cross_entropy(z22, y) + _kl(t11, z22) + _kl(t11, z21) + _kl(t11, z12)
                 + F.cross_entropy(z21, y) + F.cross_entropy(z12, y)) / 2
        return loss1, loss2

    def _dml_one(self, s: int, t: int) -> Callable[[Tensor, Tensor], Tensor]:
        net_s, net_t = self.nets[s], self.nets[t]

        def objective(x: Tensor, y: Tensor) -> Tensor:
            with torch.no_grad():
                t_logits = net_t(x)
            s_logits = net_s(x)
            return 0.5 * F.cross_entropy(s_logits, y) + 0.5 * _kl(t_logits, s_logits)

        return objective

    def step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if self.order == "simultaneous":
            # retain_graph backwards: compiled without AOTAutograd's donated buffers, as xdsl does
            with self.no_donation:
                with self.autocast:
                    losses = self.objectives(x, y)
                for s, loss in enumerate(losses):
                    self.opts[s].zero_grad(set_to_none=True)
                    loss.backward(inputs=self.params[s], retain_graph=s < len(losses) - 1)
                    out[self.names[s]] = loss.detach()
            for opt in self.opts:
                opt.step()
            return out
        for s in range(len(self.nets)):
            with self.autocast:
                loss = self.objective[s](x, y)
            self.opts[s].zero_grad(set_to_none=True)
            loss.backward(inputs=self.params[s])
            self.opts[s].step()
            out[self.names[s]] = loss.detach()
        return out


def _autocast(cfg: Config, device: torch.device):
    if cfg.amp == "none":
        return nullcontext()
    return torch.autocast(device.type, dtype=_AMP[cfg.amp])


_AMP = {"none": None, "bf16": torch.bfloat16}


def _maybe_compile(fn: Callable, cfg: Config) -> Callable:
    if not cfg.compile:
        return fn
    return torch.compile(fn, mode=None if cfg.compile_mode == "default" else cfg.compile_mode,
                         fullgraph=cfg.fullgraph, dynamic=False)


# ---------------------------------------------------------------- building the variants

@dataclass
class Runner:
    """One variant ready to time: `step(x, y)` is one optimisation step of every network."""

    name: str
    step: Callable[[Tensor, Tensor], dict[str, Tensor]]
    modules: dict[str, nn.Module]


def _experiment(cfg: Config, experiment: str, order: str, device: torch.device, workdir: Path):
    from xdsl.experiment import Experiment, compile_program

    path = workdir / f"{experiment}_{order}.xspec"
    path.write_text(spec_text(cfg, experiment, order))
    torch.manual_seed(cfg.seed)  # both sides start from these weights
    compiled = compile_program(path, device=device)
    return Experiment(compiled, compile_mode=cfg.compile_mode if cfg.compile else None, amp=_AMP[cfg.amp],
                      channels_last=cfg.channels_last, fullgraph=cfg.fullgraph)


def build_runners(cfg: Config, names: Sequence[str], device: torch.device, workdir: Path) -> dict[str, Runner]:
    """Fresh runners: each xdsl variant from its spec, each hand-written one from a copy of xdsl's initial nets."""
    runners: dict[str, Runner] = {}
    for name in names:
        experiment, who, order, eager = VARIANTS[name]
        exp = _experiment(replace(cfg, compile=False) if eager else cfg, experiment, order, device, workdir)
        if who == "xdsl":
            runners[name] = Runner(name, exp.train_step, exp.networks)
        else:
            hand = HandWritten(exp.networks, experiment, order, cfg, device)
            runners[name] = Runner(name, hand.step, hand.modules())
    return runners


def _twin(name: str) -> str:
    experiment, _, order, _ = VARIANTS[name]
    return f"{experiment}-hand-{order}"


def verify(cfg: Config, device: torch.device, workdir: Path, x: Tensor, y: Tensor) -> list[dict[str, Any]]:
    """One step of each xdsl variant and its hand-written twin from the same init (eager, fp32): equal?"""
    eager = replace(cfg, compile=False, amp="none")
    results = []
    for name in cfg.variants:
        experiment, who, order, eager_twin = VARIANTS[name]
        if who != "xdsl" or eager_twin:  # it computes what its compiled variant does
            continue
        exp = _experiment(eager, experiment, order, device, workdir)
        hand = HandWritten(exp.networks, experiment, order, eager, device)
        got, want = exp.train_step(x, y), hand.step(x, y)
        entry = {"xdsl": name, "hand": _twin(name), "steps": 1, "equal": True, "checked": 0, "error": None}
        try:
            for net in got:
                torch.testing.assert_close(got[net], want[net], msg=lambda m, n=net: f"loss of {n}: {m}")
                a, b = exp.networks[net].state_dict(), hand.modules()[net].state_dict()
                assert a.keys() == b.keys(), f"{net}: state_dict keys differ"
                for key in a:
                    torch.testing.assert_close(a[key], b[key], msg=lambda m, k=f"{net}.{key}": f"{k}: {m}")
                    entry["checked"] += 1
        except AssertionError as e:
            entry["equal"], entry["error"] = False, str(e).splitlines()[0]
        results.append(entry)
    return results


# ---------------------------------------------------------------- measuring

def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def warm_up(cfg: Config, runners: dict[str, Runner], x: Tensor, y: Tensor,
            device: torch.device) -> dict[str, dict[str, int]]:
    """`cfg.warmup` untimed steps per variant; under --compile, what each variant's warm-up compiled."""
    compiled = {}
    for name, runner in runners.items():
        before = _dynamo_counts() if cfg.compile else None
        for _ in range(cfg.warmup):
            runner.step(x, y)
        _sync(device)()
        if before is not None:
            after = _dynamo_counts()
            compiled[name] = {k: after[k] - before[k] for k in after}
    return compiled


def time_interleaved(cfg: Config, runners: dict[str, Runner], x: Tensor, y: Tensor,
                     device: torch.device) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """(wall, CPU) seconds per step, one sample per round per variant; the order rotates every round.

    CPU time is the process's (all threads): on a shared machine it is not inflated by time spent
    waiting for a core, so its ratios are the steadier cross-check of the wall-time ones.
    """
    sync = _sync(device)
    names = list(runners)
    samples: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: a collection inside one variant's sample is noise, not its cost
    try:
        for r in range(cfg.rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                step = runners[name].step
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                for _ in range(cfg.steps):
                    step(x, y)
                sync()
                samples[name].append((time.perf_counter() - t0) / cfg.steps)
                cpu[name].append((time.process_time() - c0) / cfg.steps)
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples, cpu


def _rss_kib() -> tuple[int, int] | None:
    """(current RSS, peak RSS since the last reset) in KiB from /proc, or None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    rss = re.search(r"VmRSS:\s+(\d+)", text)
    hwm = re.search(r"VmHWM:\s+(\d+)", text)
    return (int(rss.group(1)), int(hwm.group(1))) if rss and hwm else None


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _malloc_trim() -> None:
    """Give freed heap back to the OS, so the next peak is the step's own working set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(runners: dict[str, Runner], x: Tensor, y: Tensor, device: torch.device,
                steps: int = 2) -> tuple[dict[str, float], str]:
    """MiB a step needs above the state between steps (activations, gradients, temporaries), per variant.

    CUDA: torch.cuda.max_memory_allocated after a reset. CPU: the kernel's peak RSS (VmHWM) after
    malloc_trim and a reset of the mark, minus the RSS before the steps (tracemalloc does not see
    torch's allocator); where the mark cannot be reset, the getrusage(ru_maxrss) delta, a lower bound.
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        for name, runner in runners.items():
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            for _ in range(steps):
                runner.step(x, y)
            torch.cuda.synchronize(device)
            out[name] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        return out, "torch.cuda.max_memory_allocated - memory_allocated before the steps"
    method = "VmHWM after reset - VmRSS before the steps (malloc_trim first)"
    for name, runner in runners.items():
        gc.collect()
        _malloc_trim()
        if _reset_peak_rss() and _rss_kib() is not None:
            base = _rss_kib()[0]
            for _ in range(steps):
                runner.step(x, y)
            out[name] = (_rss_kib()[1] - base) / 1024
        else:
            method = "getrusage ru_maxrss delta (lower bound: the mark cannot be reset here)"
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            for _ in range(steps):
                runner.step(x, y)
            out[name] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    return out, method


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops a step dispatches: a noise-free measure of the work each side asks for."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def profile_steps(runners: dict[str, Runner], x: Tensor, y: Tensor, device: torch.device, out: Path,
                  steps: int = 3, top: int = 8) -> dict[str, dict[str, Any]]:
    """Where each variant's step spends its time: `steps` steps under torch.profiler.

    Writes `<out>/<variant>.json` (open in chrome://tracing or Perfetto) and returns, per variant,
    the trace path and the `top` ops by self time (CPU, plus CUDA kernels on a GPU).
    """
    from torch.profiler import ProfilerActivity, profile

    out.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync = _sync(device)
    result = {}
    for name, runner in runners.items():
        with profile(activities=activities) as prof:
            for _ in range(steps):
                runner.step(x, y)
            sync()
        trace = out / f"{name}.json"
        prof.export_chrome_trace(str(trace))
        key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:top]
        result[name] = {"trace": str(trace), "steps": steps, "sort": key,
                        "top": [{"op": e.key, "calls": e.count, "self_ms_per_step": getattr(e, key) / 1e3 / steps}
                                for e in events]}
    return result


def count_work(runners: dict[str, Runner], x: Tensor, y: Tensor) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """(FLOPs, aten op counts) of one step per variant: forward, backward and optimiser (FLOPs count
    matmuls and convolutions only, the optimiser's elementwise work is not in them)."""
    from torch.utils.flop_counter import FlopCounterMode

    flops, ops = {}, {}
    for name, runner in runners.items():
        with FlopCounterMode(display=False) as counter, _OpCounter() as opcount:
            runner.step(x, y)
        flops[name] = int(counter.get_total_flops())
        ops[name] = dict(sorted(opcount.counts.items()))
    return flops, ops


def _dynamo_counts() -> dict[str, int]:
    """Frames dynamo converted, graphs captured (each compile or recompile captures at least one), graph breaks.

    Under fullgraph=True dynamo does not count frames, so `graphs` is the compile count to read.
    """
    from torch._dynamo.utils import counters

    return {"frames_compiled": int(counters["frames"]["total"]), "graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values()))}


def _quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(q1, median, q3); a single value is its own spread."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _median_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the median: how far the reported median could move on a rerun."""
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(resamples))
    return meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]


# ---------------------------------------------------------------- spec -> graph

def _stage_times(spec: Path) -> dict[str, float]:
    from xdsl.compile.assemble import assemble
    from xdsl.lang.check import check
    from xdsl.lang.parser import parse_file

    t0 = time.perf_counter()
    program = check(parse_file(spec))
    t1 = time.perf_counter()
    assemble(program, device="meta", spec_dir=spec.resolve().parent)
    t2 = time.perf_counter()
    return {"parse_check_s": t1 - t0, "assemble_s": t2 - t1, "total_s": t2 - t0}


def spec_compile_times(specs: Sequence[str | Path], repeats: int = 3, cold: bool = True) -> list[dict[str, Any]]:
    """Seconds from spec text to the compiled graph on the meta device (parse, check, build, cut, shapes, graph).

    `warm_*`: the median of `repeats` compiles in this process after one untimed compile (imports and
    caches warm). `cold_s`: the first compile in a fresh Python process, after `import xdsl` (so it
    includes importing torchvision's model code and first-use costs) - what `xdsl check` feels like.
    """
    rows = []
    for spec in specs:
        path = Path(spec)
        _stage_times(path)
        runs = [_stage_times(path) for _ in range(repeats)]
        row: dict[str, Any] = {"spec": str(spec)}
        for key in ("parse_check_s", "assemble_s", "total_s"):
            row[f"warm_{key}"] = statistics.median(r[key] for r in runs)
        probe = _cold_compile(path) if cold else None
        row["cold_s"] = None if probe is None else probe["compile_s"]
        row["cold_import_s"] = None if probe is None else probe["import_s"]
        worst = max(v for v in (row["warm_total_s"], row["cold_s"]) if v is not None)
        row["target_s"] = SPEC_GRAPH_TARGET_S if Path(spec).as_posix().endswith(COHORT_SPEC) else None
        row["met"] = None if row["target_s"] is None else worst < row["target_s"]
        rows.append(row)
    return rows


def _cold_compile(spec: Path) -> dict[str, float] | None:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--probe-compile", str(spec)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _probe_compile(spec: str) -> None:
    """Child process of `_cold_compile`: import, then time one compile."""
    t0 = time.perf_counter()
    from xdsl.experiment import compile_program

    t1 = time.perf_counter()
    compile_program(spec, device="meta")
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "compile_s": t2 - t1}))


# ---------------------------------------------------------------- the run

def machine_info(device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        found = re.search(r"Model name:\s*(.+)", lscpu)
        cpu = found.group(1).strip() if found else cpu
    except (OSError, subprocess.SubprocessError):
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run(cfg: Config, progress: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Verify, time, measure memory and FLOPs, and time spec compiles; returns the report as plain data."""
    unknown = [v for v in cfg.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if cfg.amp not in _AMP:
        raise ValueError(f"--amp must be one of {list(_AMP)}")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda, but torch.cuda.is_available() is False")
    torch.set_num_threads(cfg.threads)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    x = torch.randn(cfg.batch, *cfg.input_shape(), generator=g).to(device)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g).to(device)
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    report: dict[str, Any] = {"config": _config_dict(cfg), "machine": machine_info(device)}
    with tempfile.TemporaryDirectory(prefix="xdsl-bench-") as tmp:
        workdir = Path(tmp)
        if cfg.verify:
            progress("verifying: one step of xdsl and of hand-written PyTorch from the same init")
            report["verification"] = verify(cfg, device, workdir, x, y)
        progress(f"building {len(cfg.variants)} variants")
        runners = build_runners(cfg, cfg.variants, device, workdir)
        progress(f"warming up: {cfg.warmup} steps per variant" + (" (torch.compile compiles here)"
                                                                 if cfg.compile else ""))
        warm = warm_up(cfg, runners, x, y, device)
        before = _dynamo_counts() if cfg.compile else None
        progress(f"timing: {cfg.rounds} rounds x {cfg.steps} steps per variant, interleaved")
        samples, cpu = time_interleaved(cfg, runners, x, y, device)
        if before is not None:
            after = _dynamo_counts()
            report["compile"] = {"warmup": warm, "during_timing": {k: after[k] - before[k] for k in after}}
        memory, memory_method = peak_memory(runners, x, y, device) if cfg.memory else ({}, None)
        if cfg.profile is not None:
            progress(f"profiling: Chrome traces in {cfg.profile}")
            report["profile"] = profile_steps(runners, x, y, device, cfg.profile)
        flops, ops = {}, {}
        if cfg.flops:
            progress("counting FLOPs and aten ops" + (" (on eager copies: compiled kernels bypass the counters)"
                                                      if cfg.compile else ""))
            counted = build_runners(replace(cfg, compile=False), cfg.variants, device, workdir) if cfg.compile \
                else runners
            flops, ops = count_work(counted, x, y)
    report["variants"] = {}
    for name, values in samples.items():
        q1, med, q3 = _quantiles(values)
        row = {"median_s": med, "q1_s": q1, "q3_s": q3, "min_s": min(values), "max_s": max(values),
               "cpu_median_s": statistics.median(cpu[name]),
               "samples": len(values), "steps_per_s": 1 / med, "samples_per_s": cfg.batch / med,
               "peak_mem_mib": memory.get(name), "flops_per_step": flops.get(name),
               "aten_ops_per_step": sum(ops[name].values()) if name in ops else None, "aten_ops": ops.get(name),
               "wall_samples_s": values, "cpu_samples_s": cpu[name]}
        row["tflop_per_s"] = flops[name] / med / 1e12 if name in flops else None
        report["variants"][name] = row
    report["memory_method"] = memory_method
    report["ratios"] = []
    for label, num, den, target in RATIOS:
        if num not in samples or den not in samples:
            continue
        per_round = [a / b for a, b in zip(samples[num], samples[den])]
        q1, med, q3 = _quantiles(per_round)
        lo, hi = _median_ci(per_round)
        cq1, cmed, cq3 = _quantiles([a / b for a, b in zip(cpu[num], cpu[den])])
        report["ratios"].append({"label": label, "numerator": num, "denominator": den, "median": med, "q1": q1,
                                 "q3": q3, "ci95": [lo, hi], "cpu_median": cmed, "cpu_q1": cq1, "cpu_q3": cq3,
                                 "target": target,
                                 "met": None if target is None else med <= target,
                                 "flop_ratio": flops[num] / flops[den] if num in flops and den in flops else None})
    specs = cfg.specs if cfg.specs is not None else tuple(sorted(str(p.relative_to(ROOT))
                                                              for p in (ROOT / "specs").glob("*.xspec")))
    if specs:
        progress(f"timing spec -> graph for {len(specs)} specs")
        report["spec_compile"] = spec_compile_times([ROOT / s if not Path(s).is_absolute() else s for s in specs],
                                                    cfg.spec_repeats, cfg.cold)
        for row, spec in zip(report["spec_compile"], specs):
            row["spec"] = str(spec)
    else:
        report["spec_compile"] = []
    return report


def _config_dict(cfg: Config) -> dict[str, Any]:
    d = asdict(cfg)
    d["input"] = list(cfg.input_shape())
    d["variants"] = list(cfg.variants)
    d["specs"] = None if cfg.specs is None else list(cfg.specs)
    d["profile"] = None if cfg.profile is None else str(cfg.profile)  # JSON-serialisable
    return d


# ---------------------------------------------------------------- the report

def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:.2f}"


def format_report(report: dict[str, Any]) -> str:
    """Markdown tables of a `run` report (what BENCHMARKS.md shows)."""
    cfg, m = report["config"], report["machine"]
    precision = cfg["amp"] if cfg["amp"] != "none" else "fp32"
    compiler = f"torch.compile(mode={cfg['compile_mode']}" + (", fullgraph" if cfg["fullgraph"] else "") + ")"
    mode = f"{cfg['device']} {compiler if cfg['compile'] else 'eager'} {precision}" \
        + (" channels_last" if cfg["channels_last"] else "")
    shape = "x".join(map(str, cfg["input"]))
    lines = [f"### {cfg['model']}, input {shape}, batch {cfg['batch']}, {cfg['optimizer']}, {mode}, "
             f"{cfg['threads']} thread(s)",
             "",
             f"Machine: {m['cpu']}, {m['cpu_count']} CPUs, torch {m['torch']}, Python {m['python']}"
             + (f", GPU {m['gpu']}" if "gpu" in m else "") + f". {cfg['rounds']} rounds x {cfg['steps']} steps "
             f"per variant, interleaved, after {cfg['warmup']} warm-up steps.", ""]
    if report.get("verification"):
        lines += ["Verification (one step from the same init, eager fp32, losses + every parameter and buffer):"]
        for v in report["verification"]:
            status = f"equal ({v['checked']} tensors)" if v["equal"] else f"DIFFERENT: {v['error']}"
            lines.append(f"- {v['xdsl']} vs {v['hand']}: {status}")
        lines.append("")
    lines += ["| variant | median ms/step | IQR ms | min-max ms | CPU ms/step | steps/s | samples/s "
              "| peak step mem MiB | GFLOP/step | TFLOP/s | aten ops/step |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in report["variants"].items():
        mem = "-" if r["peak_mem_mib"] is None else f"{r['peak_mem_mib']:.1f}"
        gflop = "-" if r["flops_per_step"] is None else f"{r['flops_per_step'] / 1e9:.3f}"
        tflops = "-" if r["tflop_per_s"] is None else f"{r['tflop_per_s']:.4f}"
        nops = "-" if r["aten_ops_per_step"] is None else str(r["aten_ops_per_step"])
        lines.append(f"| {name} | {_ms(r['median_s'])} | {_ms(r['q1_s'])}-{_ms(r['q3_s'])} | "
                     f"{_ms(r['min_s'])}-{_ms(r['max_s'])} | {_ms(r['cpu_median_s'])} | {r['steps_per_s']:.1f} | "
                     f"{r['samples_per_s']:.0f} | "
                     f"{mem} | {gflop} | {tflops} | {nops} |")
    if report.get("memory_method"):
        lines += ["", f"Peak step memory: {report['memory_method']}."]
    if report["ratios"]:
        lines += ["", "| ratio (per round, side by side) | wall median | wall IQR | median 95% CI | CPU-time median "
                      "| CPU-time IQR | FLOP ratio | target (wall median) | met |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|:-:|"]
        for r in report["ratios"]:
            target = "-" if r["target"] is None else f"<= {r['target']:.2f}"
            met = "-" if r["met"] is None else ("yes" if r["met"] else "**no**")
            flop = "-" if r["flop_ratio"] is None else f"{r['flop_ratio']:.3f}"
            lines.append(f"| {r['label']} | {r['median']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} | "
                         f"{r['ci95'][0]:.3f}-{r['ci95'][1]:.3f} | {r['cpu_median']:.3f} | "
                         f"{r['cpu_q1']:.3f}-{r['cpu_q3']:.3f} | {flop} | {target} | {met} |")
    if report.get("compile"):
        c = report["compile"]
        lines += ["", "torch.compile (torch._dynamo.utils.counters; graphs = compiles + recompiles): "
                      + "; ".join(f"{n} warm-up {v}" for n, v in c["warmup"].items())
                      + f"; during timing {c['during_timing']} (non-zero = recompiling inside the loop)."]
    for name, prof in report.get("profile", {}).items():
        lines += ["", f"Profile of {name} ({prof['steps']} steps, trace {prof['trace']}), top ops by "
                      f"{prof['sort'].replace('_', ' ')}:", "", "| op | calls | self ms/step |", "|---|---:|---:|"]
        lines += [f"| `{t['op']}` | {t['calls']} | {t['self_ms_per_step']:.3f} |" for t in prof["top"]]
    if report["spec_compile"]:
        lines += ["", "| spec -> graph (meta device) | parse+check s | build+cut+shapes+graph s | total s (warm) "
                      "| first call, fresh process s | import xdsl, fresh process s | target |",
                  "|---|---:|---:|---:|---:|---:|:-:|"]
        for r in report["spec_compile"]:
            cold = "-" if r["cold_s"] is None else f"{r['cold_s']:.3f}"
            imp = "-" if r["cold_import_s"] is None else f"{r['cold_import_s']:.2f}"
            target = "-" if r["target_s"] is None else f"< {r['target_s']:.0f} s: {'yes' if r['met'] else '**no**'}"
            lines.append(f"| {Path(r['spec']).name} | {r['warm_parse_check_s']:.3f} | {r['warm_assemble_s']:.3f} | "
                         f"{r['warm_total_s']:.3f} | {cold} | {imp} | {target} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- command line

def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input wants CxHxW such as 3x64x64, got {text!r}") from None
    if len(dims) != 3 or min(dims) < 1:
        raise argparse.ArgumentTypeError(f"--input wants CxHxW such as 3x64x64, got {text!r}")
    return dims


def _parser() -> argparse.ArgumentParser:
    d = Config()
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=d.model, help="builtin.cnn | builtin.resnet | torchvision.resnet18 ...")
    p.add_argument("--input", type=_shape, default=None, help="CxHxW (default: the model's natural size)")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--classes", type=int, default=d.classes)
    p.add_argument("--width", type=int, default=d.width, help="builtin nets' base width")
    p.add_argument("--depth", type=int, default=d.depth, help="builtin.resnet depth")
    p.add_argument("--optimizer", choices=list(_OPTIMIZERS), default=d.optimizer)
    p.add_argument("--device", default=d.device, help="cpu | cuda | cuda:N")
    p.add_argument("--compile", action="store_true", help="torch.compile both sides")
    p.add_argument("--compile-mode", default=d.compile_mode,
                   help="torch.compile mode: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs")
    p.add_argument("--fullgraph", action="store_true", help="torch.compile(fullgraph=True) on both sides")
    p.add_argument("--amp", choices=list(_AMP), default=d.amp, help="autocast dtype on both sides")
    p.add_argument("--channels-last", action="store_true", help="NHWC weights and batch on both sides")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument("--steps", type=int, default=d.steps, help="steps per timed sample")
    p.add_argument("--rounds", type=int, default=d.rounds, help="timed samples per variant")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed steps per variant first")
    p.add_argument("--variants", default=",".join(d.variants), help="comma-separated subset of: "
                   + ", ".join(VARIANTS))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-verify", action="store_true", help="skip the xdsl == hand-written check")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--no-flops", action="store_true", help="skip counting FLOPs and aten ops")
    p.add_argument("--specs", default=None, help="comma-separated specs for spec -> graph timing "
                   "(default: every specs/*.xspec; 'none' to skip)")
    p.add_argument("--spec-repeats", type=int, default=d.spec_repeats)
    p.add_argument("--no-cold", action="store_true", help="skip the fresh-process compile timing")
    p.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    p.add_argument("--profile", type=Path, default=None,
                   help="torch.profiler: write a Chrome trace per variant into this directory and list the top ops")
    p.add_argument("--probe-compile", default=None, help=argparse.SUPPRESS)
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    specs = None if args.specs is None else (() if args.specs == "none" else tuple(args.specs.split(",")))
    cfg = Config(model=args.model, input=args.input, batch=args.batch, classes=args.classes, width=args.width,
                 depth=args.depth, optimizer=args.optimizer, device=args.device, compile=args.compile,
                 compile_mode=args.compile_mode, fullgraph=args.fullgraph, amp=args.amp,
                 channels_last=args.channels_last,
                 threads=args.threads, steps=args.steps, rounds=args.rounds, warmup=args.warmup,
                 variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()), seed=args.seed,
                 verify=not args.no_verify, memory=not args.no_memory, flops=not args.no_flops, specs=specs,
                 spec_repeats=args.spec_repeats, cold=not args.no_cold, profile=args.profile)
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in ("batch", "classes", "width", "depth", "threads", "steps", "rounds", "spec_repeats") \
                and value < 1:
            raise SystemExit(f"--{f.name.replace('_', '-')} must be >= 1, got {value}")
    return cfg


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """`python -m benchmarks.run [options]`: print the markdown report (and write --json)."""
    args = _parser().parse_args(argv)
    if args.probe_compile:
        _probe_compile(args.probe_compile)
        return None
    cfg = config_from_args(args)
    try:
        report = run(cfg, progress=lambda msg: print(f"[bench] {msg}", file=sys.stderr, flush=True))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"error: {e}") from None
    print(format_report(report), end="")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
