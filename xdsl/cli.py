"""The `xdsl` command line: check | expand | compile | graph | run | sweep | compare | eval | models.

Errors in specs, data or checkpoints print as one located message and exit with code 2;
a Python traceback appears only with `--debug`.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import typer

from xdsl.errors import XdslError, XdslWarning

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="xdsl: declarative knowledge distillation and mutual learning experiments.")
_state = {"debug": False}

SpecArg = typer.Argument(..., help="the .xspec file", exists=False)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Spec warnings print as the located text they carry; others as Python prints them."""
    if issubclass(category, XdslWarning):
        typer.echo(str(message), err=True)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _version(value: bool) -> None:
    if value:
        from xdsl import __version__

        typer.echo(f"xdsl {__version__}")
        raise typer.Exit()


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks"),
             version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print the version and exit")) -> None:
    _state["debug"] = debug
    warnings.showwarning = _show_warning


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        raise e
    typer.echo(e.render() if isinstance(e, XdslError) else f"error: {e}", err=True)
    raise typer.Exit(2)


def _compile(spec: Path, device: str = "meta", allow_imports: bool = False, overrides=None, strict: bool = False):
    from xdsl.experiment import compile_program

    with warnings.catch_warnings():
        warnings.simplefilter("always", XdslWarning)
        return compile_program(spec, device=device, allow_imports=allow_imports, overrides=overrides,
                               strict=strict)


STRICT = typer.Option(False, "--strict", help="treat warnings (loss terms that cannot train, ...) as errors")


@app.command("check")
def check_cmd(spec: Path = SpecArg,
              allow_imports: bool = typer.Option(False, help="allow 'package.module:callable' models from anywhere"),
              strict: bool = STRICT) -> None:
    """Parse, check names/types, build models on the meta device, cut them and infer shapes."""
    try:
        c = _compile(spec, allow_imports=allow_imports, strict=strict)
    except XdslError as e:
        _fail(e)
    p = c.program
    n_parts = sum(len(v) for v in p.parts.values())
    n_terms = sum(1 for _, d in c.graph.nodes(data=True) if d["kind"] == "term")
    typer.echo(f"ok: {spec}: {len(p.networks)} networks, {n_parts} parts, {len(p.adapters)} adapters, "
               f"{len(p.stages)} train blocks, {n_terms} loss terms")
    for line in c.notes:  # pretrained weights found or still to be fetched, classifiers replaced
        typer.echo(f"note: {line}")


@app.command("expand")
def expand_cmd(spec: Path = SpecArg) -> None:
    """Print the spec with every macro (dml, xml, kd, ...) replaced by the core statements it stands for."""
    from xdsl.lang.format import format_spec
    from xdsl.lang.macros import expand_macros
    from xdsl.lang.parser import parse_file

    try:
        typer.echo(format_spec(expand_macros(parse_file(spec))), nl=False)
    except XdslError as e:
        _fail(e)


@app.command("compile")
def compile_cmd(spec: Path = SpecArg, as_json: bool = typer.Option(False, "--json", help="machine-readable"),
                code: bool = typer.Option(False, "--code", help="print the generated objective code"),
                separable: bool = typer.Option(False, "--separable",
                                               help="with --code: the separable objectives torch.compile gets")
                ) -> None:
    """Show parts (params, output shapes), paths and loss terms of the compiled graph."""
    from xdsl.compile.summary import summarize

    try:
        c = _compile(spec)
        summary = summarize(c)
    except XdslError as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    from xdsl.compile.summary import print_summary

    print_summary(summary)
    if code:
        from xdsl.compile.lower import lower

        for stage in c.program.stages:
            lowered = lower(c.graph, c.root, stage, stage.trained, set(stage.trained), separable=separable)
            typer.echo(f"# train block {stage.name}\n{lowered.module.code}")


@app.command("graph")
def graph_cmd(spec: Path = SpecArg,
              fmt: str = typer.Option("dot", "--format", help="dot | mermaid | svg | png"),
              blocks: list[str] = typer.Option([], "--block", help="only this train block (repeatable)"),
              out: Path | None = typer.Option(None, "--out", "-o",
                                              help="output file (default: dot/mermaid to stdout, "
                                                   "svg/png to runs/<spec>-graph.<format>)")
              ) -> None:
    """Explain the experiment: per train block, networks as clusters of their parts, crossed edges
    highlighted, detached targets dashed, every term's weight, every objective with its network."""
    from xdsl.viz.explain import block_graphs, render, to_dot, to_mermaid

    try:
        if fmt not in ("dot", "mermaid", "svg", "png"):
            raise XdslError(f"unknown format '{fmt}'", hint="dot, mermaid, svg or png")
        graphs = block_graphs(_compile(spec), blocks)
        if out is None and fmt in ("dot", "mermaid"):
            typer.echo(to_dot(graphs) if fmt == "dot" else to_mermaid(graphs), nl=False)
            return
        written, note = render(graphs, out or Path("runs") / f"{spec.stem}-graph.{fmt}", fmt)
    except XdslError as e:
        _fail(e)
    if note:
        typer.echo(f"note: {note}", err=True)
    typer.echo("wrote " + ", ".join(str(w) for w in written))


def _parse_sets(sets: list[str]) -> dict[str, str]:
    out = {}
    for item in sets:
        if "=" not in item:
            raise XdslError(f"--set takes key=value, got '{item}'", hint="e.g. --set data.batch_size=32")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@app.command("run")
def run_cmd(spec: Path = SpecArg,
            out: Path | None = typer.Option(None, "--out", help="run directory (default runs/<spec>-<time>)"),
            resume: bool = typer.Option(False, "--resume", help="continue the run in --out from its last checkpoint"),
            epochs: int | None = typer.Option(None, "--epochs", help="override every train block's epochs"),
            seeds: int = typer.Option(1, "--seeds", min=1, help="run N seeds and report mean +/- std"),
            seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="first seed"),
            device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
            compile_: bool | None = typer.Option(None, "--compile/--no-compile",
                                                    help="torch.compile the objectives (default: on CUDA)"),
            compile_mode: str = typer.Option("default", "--compile-mode",
                                             help="torch.compile mode: default | reduce-overhead | max-autotune"
                                                  " | max-autotune-no-cudagraphs"),
            amp: str = typer.Option("auto", "--amp", help="auto | bf16 | fp16 | none (auto = bf16 on CUDA; "
                                                          "fp16 scales losses, one GradScaler per optimiser)"),
            deterministic: bool = typer.Option(False, "--deterministic",
                                               help="deterministic kernels: reruns give bit-identical weights"),
            sets: list[str] = typer.Option([], "--set", help="override a setting: data.batch_size=32, epochs=3"),
            allow_imports: bool = typer.Option(False, help="allow 'package.module:callable' models from anywhere"),
            nproc: int = typer.Option(0, "--nproc", min=0, help="launch N data-parallel processes with torchrun"),
            threads: int | None = typer.Option(None, "--threads", min=1,
                                               help="CPU threads (default: 1 for small models)"),
            quiet: bool = typer.Option(False, "--quiet", "-q",
                                       help="no progress bars or per-block tables (the results table stays)"),
            mlflow: str | None = typer.Option(None, "--mlflow", help="log to MLflow at this tracking URI "
                                                                      "(e.g. file:./mlruns)"),
            wandb: str | None = typer.Option(None, "--wandb", help="log to this Weights & Biases project "
                                                                    "(WANDB_MODE=offline works offline)"),
            ) -> None:
    """Train every train block of the spec, evaluate, and write metrics, checkpoints and plots."""
    from xdsl.train.runner import RunOptions, run

    if nproc > 1:
        from xdsl.distributed import launch_torchrun

        raise typer.Exit(launch_torchrun(nproc, sys.argv))
    try:
        opts = RunOptions(out=out, resume=resume, epochs=epochs, seeds=seeds, seed=seed, device=device,
                          compile=compile_, compile_mode=compile_mode, amp=amp, overrides=_parse_sets(sets),
                          allow_imports=allow_imports, threads=threads, quiet=quiet, mlflow=mlflow, wandb=wandb,
                          deterministic=deterministic)
        run(spec, opts)
    except XdslError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo("interrupted: the last checkpoint is intact; continue with --resume", err=True)
        raise typer.Exit(130) from None


@app.command("sweep")
def sweep_cmd(spec: Path = SpecArg,
              grid: list[str] = typer.Option([], "--grid", help="KEY=v1,v2,...: a --set key and its values "
                                                                "(repeat for a grid)"),
              grid_file: Path | None = typer.Option(None, "--grid-file", help="KEY=v1,v2 lines, or a JSON "
                                                                             "object of value lists"),
              seeds: int = typer.Option(1, "--seeds", help="seeds per configuration"),
              seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="first seed"),
              out: Path | None = typer.Option(None, "--out", help="sweep directory (default sweeps/<spec>-<time>)"),
              resume: bool = typer.Option(False, "--resume", help="skip finished runs, continue the others"),
              launcher: str = typer.Option("local", "--launcher", help="local | submitit"),
              jobs: int = typer.Option(1, "--jobs", help="local: runs at a time (one GPU each when several)"),
              nproc: int = typer.Option(1, "--nproc", help="processes (GPUs) per run, under torchrun"),
              partition: str | None = typer.Option(None, "--partition", help="submitit: SLURM partition"),
              time_min: int = typer.Option(60, "--time", help="submitit: time limit per run (minutes)"),
              gpus: int = typer.Option(0, "--gpus", help="submitit: GPUs per run"),
              cpus: int | None = typer.Option(None, "--cpus", help="submitit: CPUs per run"),
              cluster: str | None = typer.Option(None, "--cluster",
                                                 help="submitit: slurm | local | debug (default: slurm when "
                                                      "available, else local)"),
              sets: list[str] = typer.Option([], "--set", help="a setting shared by every configuration"),
              device: str | None = typer.Option(None, "--device", help="passed to every run"),
              threads: int | None = typer.Option(None, "--threads", min=1, help="CPU threads per run"),
              metric: str = typer.Option("mean", "--metric",
                                         help="column ranking the configurations (default: mean network "
                                              "accuracy)"),
              allow_imports: bool = typer.Option(False, help="allow 'package.module:callable' models"),
              mlflow: str | None = typer.Option(None, "--mlflow", help="every run logs to this MLflow URI"),
              wandb: str | None = typer.Option(None, "--wandb", help="every run logs to this W&B project"),
              ) -> None:
    """Run every configuration of a --grid of --set values, for --seeds seeds, and tabulate mean +/- std."""
    from xdsl.sweep import SweepOptions, sweep
    from xdsl.sweep.grid import parse_grid, read_grid_file
    from xdsl.sweep.launch import SlurmOptions

    try:
        table = read_grid_file(grid_file) if grid_file else {}
        for key, values in parse_grid(grid).items():
            if key in table:
                raise XdslError(f"--grid {key} is also in the grid file {grid_file}")
            table[key] = values
        run_options = (["--device", device] if device else []) + (["--threads", str(threads)] if threads else [])
        run_options += (["--mlflow", mlflow] if mlflow else []) + (["--wandb", wandb] if wandb else [])
        opts = SweepOptions(grid=table, seeds=seeds, seed=seed, out=out, resume=resume, launcher=launcher,
                            jobs=jobs, nproc=nproc, fixed=_parse_sets(sets), run_options=run_options,
                            allow_imports=allow_imports, metric=metric,
                            slurm=SlurmOptions(partition=partition, time_min=time_min, gpus=gpus, cpus=cpus,
                                               cluster=cluster))
        sweep(spec, opts, echo=typer.echo)
    except XdslError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo("interrupted: finished runs are kept; continue with --resume --out DIR", err=True)
        raise typer.Exit(130) from None


@app.command("compare")
def compare_cmd(runs: list[Path] = typer.Argument(..., help="run directories and sweep directories"),
                plot: Path | None = typer.Option(None, "--plot", help="also draw the learning curves of every "
                                                                      "run on shared axes into this PNG"),
                ) -> None:
    """One results table across runs and sweeps: same train blocks and columns aligned, missing cells blank."""
    from xdsl.compare import compare_table, entry_curves, load_entries
    from xdsl.console import make_console, print_table

    try:
        entries = load_entries(runs)
    except XdslError as e:
        _fail(e)
    print_table(make_console(), compare_table(entries))
    if plot is not None:
        from xdsl.viz.plots import plot_compare_curves

        try:
            written = plot_compare_curves({e.label: entry_curves(e) for e in entries}, plot)
        except OSError as e:
            _fail(XdslError(f"cannot write '{plot}': {e.strerror or e}"))
        if written is None:
            _fail(XdslError("--plot needs matplotlib and per-epoch metrics (metrics.jsonl) in the runs",
                            hint="pip install 'xdsl-distill[viz]'"))
        typer.echo(f"wrote {written}")


@app.command("eval")
def eval_cmd(spec: Path = SpecArg,
             checkpoint: Path = typer.Option(..., "--checkpoint", "-c", help="a checkpoint written by xdsl run"),
             device: str = typer.Option("auto", "--device"),
             allow_imports: bool = typer.Option(False, help="allow 'package.module:callable' models")) -> None:
    """Evaluate a checkpoint under the spec's `evaluate` clause and print the tables."""
    from xdsl.train.eval_checkpoint import evaluate_checkpoint

    try:
        evaluate_checkpoint(spec, checkpoint, device=device, allow_imports=allow_imports)
    except XdslError as e:
        _fail(e)


def _parse_shape(text: str) -> tuple[int, ...]:
    import re

    text = text.replace(" ", "")
    shape = tuple(int(v) for v in re.split(r"[,x]", text)) if re.fullmatch(r"\d+([,x]\d+)*", text) else ()
    if not shape or any(d < 1 for d in shape):
        raise XdslError(f"--input takes positive integers like 3,224,224, got '{text}'")
    return shape


@app.command("models")
def models_cmd(pattern: str | None = typer.Argument(None, help="a glob (*resnet*) or a substring of the name"),
               spec: Path | None = typer.Option(None, "--spec", help="also list the user models beside this spec"),
               directory: Path | None = typer.Option(None, "--dir", help="also list the user models in this folder"),
               params: bool = typer.Option(True, "--params/--no-params", help="count parameters (meta device)"),
               cuts: str | None = typer.Option(None, "--cuts", help="print the cut points of this model and the "
                                                                     "output shape at each"),
               input_shape: str | None = typer.Option(None, "--input", help="input shape for --cuts, e.g. 3,224,224 "
                                                      "(default: a builtin's own, else 3,224,224)"),
               ) -> None:
    """List the models a spec can name (builtin, torchvision, timm, user modules) with their parameter counts."""
    from rich.table import Table

    from xdsl.compile.catalog import cut_shapes, list_models
    from xdsl.console import make_console, print_table

    user_dir = directory if directory is not None else spec.resolve().parent if spec is not None else None
    console = make_console()
    try:
        if user_dir is not None and not Path(user_dir).is_dir():
            raise XdslError(f"'{user_dir}' is not a directory")
        if cuts is not None:
            shape = _parse_shape(input_shape) if input_shape else None
            _, shape, rows = cut_shapes(cuts, shape, user_dir=user_dir)
            table = Table(title=f"cut points of {cuts} (input {shape}): cut ... at \"<point>\"")
            table.add_column("cut point", no_wrap=True)
            table.add_column("output shape", no_wrap=True)
            for point, out in rows:
                table.add_row(point, str(out))
            print_table(console, table)
            return
        entries, notes = list_models(pattern, user_dir=user_dir, params=params)
    except XdslError as e:
        _fail(e)
    if not entries:
        _fail(XdslError(f"no model matches '{pattern}'", hint="a glob like '*resnet*' or a part of the name"))
    table = Table(title=f"{len(entries)} models" + (f" matching '{pattern}'" if pattern else ""))
    table.add_column("model", no_wrap=True)
    table.add_column("source", no_wrap=True)
    if params:
        table.add_column("params", justify="right", no_wrap=True)
    table.add_column("keywords / weights")
    for e in entries:
        count = f"{e.params:,}" if e.params is not None else ("?" if e.error else "")
        table.add_row(e.ref, e.source, *([count] if params else []), "; ".join(t for t in (e.takes, e.error) if t))
    print_table(console, table)
    for note in notes:
        typer.echo(f"note: {note}")


def main() -> None:
    """Entry point of the `xdsl` script."""
    app()


if __name__ == "__main__":
    main()
