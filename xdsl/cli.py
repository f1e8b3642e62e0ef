"""The `xdsl` command line: check | expand | compile | graph | run | eval | bench.

Errors in specs, data or checkpoints print as one located message and exit with code 2;
a Python traceback appears only with `--debug`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from xdsl.errors import XdslError

__all__ = ["app", "main"]

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="xdsl: declarative knowledge distillation and mutual learning experiments.")
_state = {"debug": False}

SpecArg = typer.Argument(..., help="the .xspec file", exists=False)


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="show Python tracebacks")) -> None:
    _state["debug"] = debug


def _fail(e: BaseException) -> None:
    if _state["debug"]:
        raise e
    typer.echo(e.render() if isinstance(e, XdslError) else f"error: {e}", err=True)
    raise typer.Exit(2)


def _compile(spec: Path, device: str = "meta", allow_imports: bool = False, overrides=None):
    from xdsl.experiment import compile_program

    return compile_program(spec, device=device, allow_imports=allow_imports, overrides=overrides)


@app.command("check")
def check_cmd(spec: Path = SpecArg,
              allow_imports: bool = typer.Option(False, help="allow 'package.module:callable' models from anywhere")
              ) -> None:
    """Parse, check names/types, build models on the meta device, cut them and infer shapes."""
    try:
        c = _compile(spec, allow_imports=allow_imports)
    except XdslError as e:
        _fail(e)
    p = c.program
    n_parts = sum(len(v) for v in p.parts.values())
    n_terms = sum(1 for _, d in c.graph.nodes(data=True) if d["kind"] == "term")
    typer.echo(f"ok: {spec}: {len(p.networks)} networks, {n_parts} parts, {len(p.adapters)} adapters, "
               f"{len(p.stages)} train blocks, {n_terms} loss terms")


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
              out: Path | None = typer.Option(None, "--out", "-o", help="output file (default: beside the spec)")
              ) -> None:
    """Draw the computation graph: inputs, parts, adapters, loss terms, objectives."""
    from xdsl.viz.graph_render import render_image, to_dot, to_mermaid

    try:
        c = _compile(spec)
    except XdslError as e:
        _fail(e)
    if fmt in ("dot", "mermaid"):
        text = to_dot(c.graph) if fmt == "dot" else to_mermaid(c.graph)
        if out:
            out.write_text(text)
        else:
            typer.echo(text, nl=False)
        return
    if fmt not in ("svg", "png"):
        _fail(XdslError(f"unknown format '{fmt}'", hint="dot, mermaid, svg or png"))
    target = out or spec.with_suffix(f".{fmt}")
    render_image(c.graph, target, fmt)
    typer.echo(f"wrote {target}")


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
            seeds: int = typer.Option(1, "--seeds", help="run N seeds and report mean +/- std"),
            seed: int = typer.Option(0, "--seed", help="first seed"),
            device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N"),
            compile_: bool | None = typer.Option(None, "--compile/--no-compile",
                                                    help="torch.compile the objectives (default: on CUDA)"),
            compile_mode: str = typer.Option("default", "--compile-mode",
                                             help="torch.compile mode: default | reduce-overhead | max-autotune"
                                                  " | max-autotune-no-cudagraphs"),
            amp: str = typer.Option("auto", "--amp", help="auto | bf16 | none (auto = bf16 on CUDA)"),
            sets: list[str] = typer.Option([], "--set", help="override a setting: data.batch_size=32, epochs=3"),
            allow_imports: bool = typer.Option(False, help="allow 'package.module:callable' models from anywhere"),
            nproc: int = typer.Option(0, "--nproc", help="launch N data-parallel processes with torchrun"),
            threads: int | None = typer.Option(None, "--threads", help="CPU threads (default: 1 for small models)"),
            quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bars or tables"),
            ) -> None:
    """Train every train block of the spec, evaluate, and write metrics, checkpoints and plots."""
    from xdsl.train.runner import RunOptions, run

    if nproc > 1:
        from xdsl.train.distributed import launch_torchrun

        raise typer.Exit(launch_torchrun(nproc, sys.argv))
    try:
        opts = RunOptions(out=out, resume=resume, epochs=epochs, seeds=seeds, seed=seed, device=device,
                          compile=compile_, compile_mode=compile_mode, amp=amp, overrides=_parse_sets(sets),
                          allow_imports=allow_imports, threads=threads, quiet=quiet)
        run(spec, opts)
    except XdslError as e:
        _fail(e)
    except KeyboardInterrupt:
        typer.echo("interrupted: the last checkpoint is intact; continue with --resume", err=True)
        raise typer.Exit(130) from None


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


@app.command("bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True,
                                        "help_option_names": []})
def bench_cmd(ctx: typer.Context) -> None:
    """Time xdsl's training steps against hand-written PyTorch (options: `xdsl bench --help`; see BENCHMARKS.md).

    The harness lives in the repository's `benchmarks/` package, so run this from a checkout.
    """
    try:
        from benchmarks.run import main as bench_main
    except ImportError:
        _fail(XdslError("the benchmark harness is not importable",
                        hint="run `xdsl bench` (or `python -m benchmarks.run`) from the root of an xdsl checkout"))
    bench_main(list(ctx.args))


def main() -> None:
    """Entry point of the `xdsl` script."""
    app()


if __name__ == "__main__":
    main()
