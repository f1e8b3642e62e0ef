"""The Python API: `xdsl.load(path)` runs every compile stage and returns an `Experiment`.

    exp = xdsl.load("spec.xspec")
    exp.forward("net1.up >> net2.down", x)   # logits of any path
    exp.objectives(x, y)                     # {"net1": loss, "net2": loss} of the current train block
    exp.train_step(x, y)                     # one optimisation step under the train block's order
    exp.train_step(x, y, i)                  # ... with the batch's sample indices, for stateful terms (crd)
"""

from __future__ import annotations

import dataclasses
import random
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import networkx as nx
import torch
from torch import nn
from torch._functorch import config as functorch_config

from xdsl.compile.assemble import Compiled, assemble
from xdsl.compile.data_fit import check_ranked_k
from xdsl.compile.graph import module_target, objective_node, term_leaves, term_node
from xdsl.compile.lower import Lowered, lower, path_module
from xdsl.compile.optim import make_optimizer, make_scheduler
from xdsl.compile.probe import probe_user_primitives
from xdsl.compile.stateful import bind_data
from xdsl.distributed import all_reduce_grads, is_distributed, wrap_objective
from xdsl.errors import SpecError, XdslError, XdslWarning
from xdsl.lang import ir
from xdsl.lang.check import check, path_of
from xdsl.lang.parser import parse_expr, parse_file
from xdsl.overrides import apply_overrides

__all__ = ["Experiment", "load", "compile_program", "COMPILE_MODES"]

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_program(path: str | Path, *, device: str | torch.device = "cpu", allow_imports: bool = False,
                    input_shape: tuple[int, ...] | None = None, overrides: dict[str, Any] | None = None,
                    strict: bool = False) -> Compiled:
    """parse -> check -> build -> cut -> shapes -> graph, for `xdsl check/compile/graph` and `load`.

    The spec's warnings are issued as `XdslWarning`s (the command line prints them located);
    `strict` makes them errors.
    """

    path = Path(path)
    program = check(apply_overrides(parse_file(path), overrides or {}), strict=strict, allow_imports=allow_imports)
    for w in program.warnings:
        warnings.warn(XdslWarning(w.render()), stacklevel=2)
    compiled = assemble(program, device=device, spec_dir=path.resolve().parent, allow_imports=allow_imports,
                        input_shape=input_shape)
    probe_user_primitives(compiled)
    check_ranked_k(compiled)
    return compiled


class Experiment:
    """Compiled spec plus the state of training: the current train block, its optimisers and schedules."""

    def __init__(self, compiled: Compiled, *, compile_mode: str | None = None, amp: torch.dtype | None = None,
                 channels_last: bool = False, fullgraph: bool = False, separable: bool | None = None):
        self.compiled = compiled
        self.program = compiled.program
        self.networks: dict[str, nn.Module] = compiled.networks
        self.parts: dict[str, dict[str, nn.Module]] = compiled.parts
        self.adapters: dict[str, nn.Module] = compiled.adapters
        self.graph: nx.DiGraph = compiled.graph
        self.device = compiled.device
        if compile_mode is not None and compile_mode not in COMPILE_MODES:
            raise XdslError(f"unknown torch.compile mode '{compile_mode}'", hint="one of " + ", ".join(COMPILE_MODES))
        self.compile_mode = compile_mode  # torch.compile mode, None = eager
        self.fullgraph = fullgraph        # torch.compile(fullgraph=True): a graph break raises
        # Objectives differentiable only in their own network (see xdsl.compile.lower): what a compiled
        # backward needs to skip the peers' gradients; eager autograd prunes them without it.
        self.separable = compile_mode is not None if separable is None else separable
        self.amp = amp                    # autocast dtype for forward passes (bf16 on CUDA), None = fp32
        # fp16 underflows small gradients: one GradScaler per optimiser scales each network's loss up
        # before backward and skips the step when the scaled gradients overflow (counted per network).
        self.scalers: dict[str, torch.amp.GradScaler] = {}
        self.skipped_steps: dict[str, int] = {}
        self.channels_last = channels_last
        if channels_last:
            compiled.root.to(memory_format=torch.channels_last)
        self.stage: ir.Stage | None = None
        self.step_count = 0
        self.epoch = 0  # 0-based within the train block; the runner sets it (schedules read it, with step_count)
        self.block_epochs: int | None = None  # the block's epochs, once the runner knows a `steps` budget's
        self.last_terms: dict[str, dict[str, torch.Tensor]] = {}
        # per network, per term: the value of every forward since `reset_term_sums`, kept as detached
        # 0-d tensors and added up once an epoch, so a step runs no extra op (and no host sync)
        self.term_values: dict[str, dict[str, list[torch.Tensor]]] = {}
        self._paths: dict[str, nn.Module] = {}
        self._parsed: dict[str, ir.Path] = {}
        # stateful loss terms (xdsl.compile.stateful): module name -> the network that owns it
        self.term_owners: dict[str, str] = {d["module"]: d["owner"] for _, d in self.graph.nodes(data=True)
                                            if d.get("kind") == "term" and "module" in d}
        if self.program.stages:
            self.use_stage(self.program.stages[0].name)

    def __repr__(self) -> str:
        parts = ", ".join(f"{n}[{', '.join(p)}]" for n, p in self.parts.items())
        stage = self.stage.name if self.stage else None
        return f"Experiment({self.program.file}: {parts}; adapters={list(self.adapters)}; stage={stage})"

    # ---- ownership ----
    def owned_modules(self, net: str) -> list[nn.Module]:
        """What `minimize ... wrt net` updates: the network, the adapters and the stateful terms it owns."""
        owned = [self.networks[net]]
        owned += [m for name, m in self.adapters.items() if net in self.program.adapters[name].owners]
        owned += [m for name, m in self.compiled.terms.items() if self.term_owners.get(name) == net]
        return owned

    @property
    def needs_index(self) -> bool:
        """Whether the spec's objectives read the sample indices `i` (then batches are (x, y, i))."""
        return any(d.get("kind") == "indices" for _, d in self.graph.nodes(data=True))

    def bind_data(self, train_labels: torch.Tensor, seed: int | None = None) -> None:
        """Size the stateful terms' per-sample state (CRD's memory banks) for a training set with these
        labels, one per sample in the order `i` counts them; `seed` (default: torch's initial seed) draws
        their initial values without touching the global random stream."""
        bind_data(self.compiled.terms, train_labels, torch.initial_seed() if seed is None else seed)

    def owned_params(self, net: str) -> list[nn.Parameter]:
        seen: dict[int, nn.Parameter] = {}
        for module in self.owned_modules(net):
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    # ---- stages ----
    def use_stage(self, name: str) -> None:
        """Make a train block current: freeze what it does not train, build optimisers and generated code."""
        stage = next((s for s in self.program.stages if s.name == name), None)
        if stage is None:
            raise XdslError(f"no train block '{name}'",
                            hint=f"blocks: {', '.join(s.name for s in self.program.stages)}")
        self.stage = stage
        trainable = set(stage.trained)
        for net in self.networks:
            train = net in trainable
            for module in self.owned_modules(net):
                module.requires_grad_(train)
                module.train(train)
        self.params = {net: self.owned_params(net) for net in stage.trained}
        self._params_shared = self._shares_params()
        self.optimizers = {net: make_optimizer(stage.optimizer, self.params[net], self.device)
                           for net in stage.trained}
        self.schedulers = {net: make_scheduler(stage.schedule, opt, stage.settings.get("steps") or stage.epochs)
                           for net, opt in self.optimizers.items()}
        self.scalers = {net: torch.amp.GradScaler(self.device.type) for net in stage.trained} \
            if self.amp == torch.float16 else {}
        self.skipped_steps = {net: 0 for net in self.scalers}
        # which primitive terms (by text) each network's objective is made of, for per-term metrics
        self.net_terms = {net: tuple(dict.fromkeys(term_node(t) for t in term_leaves(
            self.graph.nodes[objective_node(stage.name, net)]["term"]))) for net in stage.trained}
        self.reset_term_sums()
        root = self.compiled.root
        self._all = lower(self.graph, root, stage, stage.trained, trainable)  # every objective, one forward
        if stage.order == "simultaneous":
            self._joint = self._compile(lower(self.graph, root, stage, stage.trained, trainable,
                                              separable=self.separable) if self.separable else self._all)
            self._single = {}
        else:
            self._single = {net: self._compile(self._distribute(lower(self.graph, root, stage, (net,), trainable,
                                                                      separable=self.separable), net))
                            for net in stage.trained}
            self._joint = None
        self.step_count = 0
        self.epoch = 0
        self.block_epochs = None

    def _distribute(self, lowered: Lowered, net: str) -> Lowered:
        """Under torchrun: DDP over the objective, synchronising only `net`'s own parameters."""
        if not is_distributed():
            return lowered
        ddp = wrap_objective(lowered.module, self.params[net], self.device)
        return dataclasses.replace(lowered, module=ddp)

    def _compile(self, lowered: Lowered) -> Lowered:
        if self.compile_mode is None:
            return lowered
        # Static shapes: a full batch and the epoch's smaller last batch compile one graph each, and
        # later epochs reuse both (automatic dynamic shapes would switch every step to dynamic kernels).
        compiled = torch.compile(lowered.module, mode=None if self.compile_mode == "default" else self.compile_mode,
                                 fullgraph=self.fullgraph, dynamic=False)
        return dataclasses.replace(lowered, module=compiled)

    def set_train_mode(self, training: bool) -> None:
        """train() for the block's trained networks, eval() for everything else (frozen teachers)."""
        trained = set(self.stage.trained) if self.stage else set()
        for net in self.networks:
            for module in self.owned_modules(net):
                module.train(training and net in trained)

    def autocast(self):
        """Mixed-precision context for forward passes (a no-op without `amp`)."""
        if self.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp)

    # ---- the Python API of the README ----
    def path(self, text: str) -> ir.Path:
        """Parse and check a path such as `net1.up >> a12 >> net2.down` (once per text: forward is a hot path)."""
        if text not in self._parsed:
            self._parsed[text] = path_of(self.program, parse_expr(text))
        return self._parsed[text]

    def forward(self, path: str | ir.Path, x: torch.Tensor) -> torch.Tensor:
        """Output of any path (logits when it ends in a last part or a head) on the batch x."""
        p = self.path(path) if isinstance(path, str) else path
        key = str(p)
        if key not in self._paths:
            missing = [s for s in p.steps if isinstance(s, ir.AdapterStep) and s.name not in self.adapters]
            if missing:
                raise SpecError(f"adapter '{missing[0].name}' is not used by the spec, so it has no shape yet")
            self._check_path_shapes(p)
            self._paths[key] = path_module(self.compiled.root, p)
        self._check_batch(x)
        return self._paths[key](x)

    def _check_path_shapes(self, p: ir.Path) -> None:
        """Run the path on a meta batch first, so parts that do not join are an error naming them."""
        from xdsl.shapes import infer_shapes

        modules = [self.compiled.root.get_submodule(module_target(s)) for s in p.steps]
        names = [str(s) for s in p.steps]
        try:
            infer_shapes(modules, torch.empty((2, *self.compiled.input_shape), device="meta"), names)
        except XdslError as e:
            raise XdslError(f"path {p} cannot run: {e.message}",
                            hint="join parts of different widths through an adapter the spec declares") from None

    def _check_batch(self, x: Any, y: Any = None) -> None:
        """A batch of the wrong shape or type is an XdslError, not an error from deep inside a module."""
        want = self.compiled.input_shape  # channels are fixed by the models; sizes may vary with the data
        if not isinstance(x, torch.Tensor) or x.dim() != len(want) + 1 or x.shape[1] != want[0]:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise XdslError(f"x must be a batch of {want[0]}-channel inputs shaped like "
                            f"(B, {', '.join(map(str, want))}), got {got}")
        hard = isinstance(y, torch.Tensor) and y.dim() == 1 and not y.is_floating_point()
        soft = isinstance(y, torch.Tensor) and y.dim() == 2 and y.is_floating_point()  # mixup/cutmix: (B, C)
        if y is not None and not ((hard or soft) and y.shape[0] == x.shape[0]):
            got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise XdslError(f"y must be integer labels of shape ({x.shape[0]},) or class probabilities of shape "
                            f"({x.shape[0]}, num_classes), got {got}")

    def _require_stage(self) -> ir.Stage:
        if self.stage is None:
            raise XdslError("the spec has no train block, so there is no objective to compute or step")
        return self.stage

    def objectives(self, x: torch.Tensor, y: torch.Tensor, i: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Every trained network's objective on (x, y[, i]) under the current weights (no update: the
        stateful terms' buffers, such as CRD's memory, and the networks' buffers, such as BatchNorm's
        running statistics, which a training-mode forward moves, are put back as they were)."""
        self._require_stage()
        self._check_batch(x, y)
        saved = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in self.compiled.terms.items()}
        root = self.compiled.root  # the networks' buffers; the terms' (some reassigned in forward) come back above
        buffers = [(b, b.clone()) for m in (root.parts, root.adapters) for b in m.buffers()]
        losses, terms = self._call(self._all, x, y, i)
        for name, state in saved.items():
            self.compiled.terms[name].load_state_dict(state)
        for buffer, value in buffers:  # swapped in, not copied: the graph of these objectives may have saved the
            buffer.data = value         # buffer (BatchNorm does), and an in-place copy would fail its backward
        return dict(zip(self._all.networks, losses))

    def _call(self, lowered: Lowered, x: torch.Tensor, y: torch.Tensor, i: torch.Tensor | None):
        """Run a generated objective module on a batch (with its sample indices when a term reads them)."""
        if not lowered.uses_index:
            return lowered.module(x, y, self.clock(lowered))
        if not isinstance(i, torch.Tensor) or i.dim() != 1 or i.shape[0] != y.shape[0]:
            raise XdslError("this objective reads the sample indices i (a stateful term such as crd), so a batch "
                            "is (x, y, i): i the position of each sample in the training set",
                            hint="pass them: train_step(x, y, i); DataBundle.train_loader(..., with_index=True) "
                                 "yields them")
        return lowered.module(x, y, self.clock(lowered), i)

    def clock(self, lowered: Lowered) -> torch.Tensor | None:
        """[epoch, epochs, step] as a float tensor on the device, for objectives with schedules (else None):
        a tensor input, so a compiled objective is not recompiled when the values change. `epochs` is the
        block's total: under a `steps N` budget, the epochs the runner found it needs (`block_epochs`)."""
        if not lowered.uses_clock:
            return None
        epochs = self.block_epochs if self.block_epochs is not None else self.stage.epochs
        return torch.tensor([self.epoch, epochs, self.step_count], dtype=torch.float32,
                            device=self.device)

    def update_order(self) -> list[str]:
        """Networks in the order they are updated on this batch (DML Algorithm 1 and variants)."""
        nets = list(self.stage.trained)
        if self.stage.order == "round_robin":
            k = self.step_count % len(nets)
            return nets[k:] + nets[:k]
        if self.stage.order == "random":
            order = nets[:]
            random.Random(self.step_count + 7919 * torch.initial_seed()).shuffle(order)
            return order
        return nets

    def train_step(self, x: torch.Tensor, y: torch.Tensor, i: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One optimisation step of the current train block; returns each network's (detached) loss.
        `i`: the batch's sample indices, needed when a stateful term (crd) reads them."""
        return self.accumulate_step([(x, y) if i is None else (x, y, i)])

    def accumulate_step(self, batches: list[tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
        """One optimisation step on several micro-batches (`accumulate N`): each network's gradient is
        the sample-weighted mean of its micro-batch gradients, i.e. the gradient of its objective on
        the concatenated batch (exact up to BatchNorm statistics, which see each micro-batch alone).
        Under `order alternating` a network's micro-batches all see the peers' weights of this step."""
        stage = self._require_stage()
        batches = [(b[0], b[1], b[2] if len(b) > 2 else None) for b in batches]
        for x, y, _ in batches:
            self._check_batch(x, y)
        total = sum(len(y) for _, y, _ in batches)
        weights = [len(y) / total for _, y, _ in batches]
        out: dict[str, torch.Tensor] = {}
        if stage.order == "simultaneous":
            grads = self._accumulated_joint_grads(batches, weights, out)
            for net in self._joint.networks:
                for p, g in zip(self.params[net], grads[net]):
                    p.grad = g
                if is_distributed():
                    all_reduce_grads(self.params[net])
                self._step(net)
        else:
            for net in self.update_order():
                lowered = self._single[net]
                self.optimizers[net].zero_grad(set_to_none=True)
                for (x, y, i), w in zip(batches, weights):
                    with self.autocast():
                        (loss,), terms = self._call(lowered, x, y, i)
                    self._record_terms(lowered, terms)
                    scaled = loss * w if len(batches) > 1 else loss
                    self._scale(net, scaled).backward(inputs=self.params[net])
                    out[net] = out[net] + scaled.detach() if net in out else scaled.detach()
                self._step(net)
        self.step_count += 1
        return out

    def _accumulated_joint_grads(self, batches: list[tuple], weights: list[float],
                                 out: dict[str, torch.Tensor]) -> dict[str, tuple]:
        """`_joint_grads` of each micro-batch, summed with the micro-batches' sample weights."""
        if len(batches) == 1:
            x, y, i = batches[0]
            return self._joint_grads(x, y, out, 1.0, i)
        total: dict[str, list] = {}
        for (x, y, i), w in zip(batches, weights):
            part: dict[str, torch.Tensor] = {}
            grads = self._joint_grads(x, y, part, w, i)
            for net, gs in grads.items():
                acc = total.setdefault(net, [None] * len(gs))
                for i, g in enumerate(gs):
                    if g is not None:
                        acc[i] = g if acc[i] is None else acc[i] + g
            for net, v in part.items():
                out[net] = out[net] + v * w if net in out else v * w
        return {net: tuple(gs) for net, gs in total.items()}

    def _scale(self, net: str, loss: torch.Tensor) -> torch.Tensor:
        """The loss as backward sees it: multiplied by the network's fp16 loss scale, if any."""
        scaler = self.scalers.get(net)
        return loss if scaler is None else scaler.scale(loss)

    def _joint_grads(self, x: torch.Tensor, y: torch.Tensor, out: dict[str, torch.Tensor],
                     weight: float = 1.0, i: torch.Tensor | None = None) -> dict[str, tuple]:
        """One forward of every objective, then each network's gradient of its own objective.

        Separable objectives (under torch.compile) share one backward of their sum. Otherwise, or
        when an adapter has two owners (each owner steps it with its own objective's gradient),
        there is one backward per objective. The backwards after the first need retain_graph, which
        AOTAutograd's donated buffers forbid, so under torch.compile this graph is compiled (and
        its backward run) without them.
        """
        no_donation = functorch_config.patch(donated_buffer=False) if self.compile_mode else nullcontext()
        with no_donation:
            with self.autocast():
                losses, terms = self._call(self._joint, x, y, i)
            self._record_terms(self._joint, terms)
            nets = self._joint.networks
            for net, loss in zip(nets, losses):
                out[net] = loss.detach()
            if weight != 1.0:
                losses = [loss * weight for loss in losses]
            losses = [self._scale(net, loss) for net, loss in zip(nets, losses)]
            if self._joint.separable and not self._params_shared:
                # each objective is differentiable only in its own network: one backward serves all
                flat = torch.autograd.grad(sum(losses), [p for net in nets for p in self.params[net]],
                                           allow_unused=True)
                grads, i = {}, 0
                for net in nets:
                    grads[net], i = flat[i:i + len(self.params[net])], i + len(self.params[net])
                return grads
            last = len(losses) - 1
            return {net: torch.autograd.grad(loss, self.params[net], retain_graph=i < last, allow_unused=True)
                    for i, (net, loss) in enumerate(zip(nets, losses))}

    def _shares_params(self) -> bool:
        """Does a parameter belong to two trained networks (an adapter with two owners)?"""
        ids = [id(p) for params in self.params.values() for p in params]
        return len(ids) != len(set(ids))

    def _step(self, net: str) -> None:
        """Clip (on unscaled gradients) and step; under fp16 a step whose gradients overflowed is skipped."""
        clip = self.stage.settings.get("grad_clip")
        opt, scaler = self.optimizers[net], self.scalers.get(net)
        if scaler is not None:
            scaler.unscale_(opt)
        if clip:
            torch.nn.utils.clip_grad_norm_(self.params[net], clip)
        if scaler is None:
            opt.step()
            return
        before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.get_scale() < before:  # the scale backs off exactly when inf/NaN gradients skipped the step
            self.skipped_steps[net] += 1

    def _record_terms(self, lowered: Lowered, terms) -> None:
        values = dict(zip(lowered.terms, terms))
        for net in lowered.networks:
            self.last_terms[net] = {t: values[t] for t in self.net_terms.get(net, ()) if t in values}
            history = self.term_values.setdefault(net, {})
            for t, v in self.last_terms[net].items():
                history.setdefault(t, []).append(v.detach())

    def reset_term_sums(self) -> None:
        self.term_values = {}

    def term_means(self) -> dict[str, dict[str, float]]:
        """Each network's loss terms averaged over the forwards since `reset_term_sums` (one host sync
        per term: call once per epoch, not per step)."""
        return {net: {t: float(torch.stack(vs).float().mean()) for t, vs in terms.items()}
                for net, terms in self.term_values.items()}

    @property
    def schedule_per_step(self) -> bool:
        """Under a `steps N` budget schedules count optimisation steps (`step(every=...)` in steps), else epochs."""
        return bool(self.stage.settings.get("steps"))

    def scheduler_step(self) -> None:
        for sched in self.schedulers.values():
            if sched is not None:
                sched.step()


def load(path: str | Path, *, device: str | torch.device = "cpu", compile_mode: str | None = None,
         allow_imports: bool = False, overrides: dict[str, Any] | None = None) -> Experiment:
    """parse + check + build + cut + shapes + graph + lower: a ready-to-train Experiment."""
    compiled = compile_program(path, device=device, allow_imports=allow_imports, overrides=overrides)
    return Experiment(compiled, compile_mode=compile_mode)
