"""Command line: `slimquant quantize | eval | export | plugins | inspect`. Exit codes: 0 ok, 1 failure, 2 bad input."""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from slimquant.errors import SlimquantError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Post-training quantization of Hugging Face causal LMs, built from plugins.")
console = Console(stderr=True)
BAD_INPUT, FAILURE = 2, 1


INTERRUPTED = 130


def _interrupted(hint: str = "") -> None:
    console.print("interrupted: nothing was written (an output directory appears whole or not at all)" + hint)
    raise typer.Exit(INTERRUPTED)


def _interrupted_after_output(output: Path, checkpoint: str | None) -> None:
    left = f"; the checkpoint {checkpoint} was not removed: delete it" if checkpoint and Path(checkpoint).exists() \
        else ""
    console.print(f"interrupted after the output {escape(str(output))} was written (it is complete){escape(left)}",
                  soft_wrap=True, highlight=False)
    raise typer.Exit(INTERRUPTED)


def _terminate(signum, frame) -> None:
    """SIGTERM unwinds like Ctrl-C, so that temporary output is removed on the way out."""
    raise KeyboardInterrupt


def install_signal_handlers() -> None:
    signal.signal(signal.SIGTERM, _terminate)


def _fail(exc: BaseException) -> None:
    if isinstance(exc, (SlimquantError, FileNotFoundError)):
        console.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True, highlight=False)
        raise typer.Exit(BAD_INPUT)
    console.print(f"[bold red]failed:[/] {type(exc).__name__}: {escape(str(exc))}", soft_wrap=True, highlight=False)
    raise typer.Exit(FAILURE)


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s")
    for noisy in ("transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@app.command("plugins")
def plugins_command() -> None:
    """List installed plugins: algorithms and output formats, with their roles, whether they need data, and the
    distribution each comes from."""
    from slimquant import plugins as registry
    from slimquant.roles import ROLE_LABELS, roles_of

    for group, title in ((registry.ALGORITHMS, "algorithms"), (registry.EXPORTERS, "output formats")):
        table = Table("name", "roles", "needs data", "distribution", title=f"slimquant {title}")
        for name, info in registry.installed(group).items():
            try:
                cls = registry.load_plugin_class(name, group)
                roles = ", ".join(ROLE_LABELS[role] for role in roles_of(cls))
                data = "yes" if registry.requires_calibration_data(cls) else "no"
            except SlimquantError as exc:
                roles, data = f"[red]broken: {escape(str(exc))}[/]", "?"
            table.add_row(name, roles, data if group == registry.ALGORITHMS else "",
                          f"{info.distribution} {info.version}")
        Console().print(table)


@app.command("quantize")
def quantize_command(
    recipe: Annotated[Optional[Path], typer.Argument(help="recipe file (YAML or JSON); flags override it")] = None,
    model: Annotated[Optional[str], typer.Option(help="model folder or .gguf; default: embedded SmolLM2-135M")] = None,
    scheme: Annotated[Optional[str], typer.Option(help="W8A16, W4A16, W8A8, W8A8_DYNAMIC, W4A8_DYNAMIC")] = None,
    w_bits: Annotated[Optional[int], typer.Option(help="weight bits (2-8)")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="weight group size (0 = per channel)")] = None,
    w_sym: Annotated[Optional[bool], typer.Option("--w-sym/--w-asym", help="symmetric weights")] = None,
    algorithm: Annotated[Optional[list[str]], typer.Option("--algorithm", "-a", help="algorithm name (repeat)")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Linear to keep in float: name, glob or re:regex")] = None,
    calib_file: Annotated[Optional[Path], typer.Option(help="calibration text file (default: self-generated)")] = None,
    num_samples: Annotated[Optional[int], typer.Option(help="calibration samples")] = None,
    seqlen: Annotated[Optional[int], typer.Option(help="tokens per calibration sample")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda[:i], npu[:i]")] = None,
    lazy: Annotated[bool, typer.Option(
        help="read the safetensors checkpoint a decoder layer at a time and write the output as it goes")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="output directory")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    save_type: Annotated[Optional[list[str]], typer.Option(
        "--save-type", "--format", help="output format (repeat): safe_tensor, numpy, or an installed one")] = None,
    part_file_size: Annotated[float, typer.Option(help="shard size in GB (0 = one file)")] = 0.0,
    eval_text: Annotated[Optional[Path], typer.Option(help="text file for perplexity before/after")] = None,
    eval_windows: Annotated[int, typer.Option(help="perplexity windows")] = 8,
    eval_window: Annotated[int, typer.Option(help="tokens per perplexity window")] = 2048,
    kl_samples: Annotated[Optional[int], typer.Option(
        help="self-generated samples for KL / top-1 (0 = skip; default 4, or 0 on a data-free run)")] = None,
    layer_report: Annotated[Optional[Path], typer.Option(help="write per-Linear errors (JSON) here")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="write PNGs and report.html here: per-Linear errors, sensitivity (budget), bit map")] = None,
    resume: Annotated[bool, typer.Option(help="continue a killed run from its checkpoint")] = False,
    checkpoint_dir: Annotated[Optional[Path], typer.Option(
        help="checkpoint after each decoder layer here (default with --output: <output>.checkpoint)")] = None,
    keep_checkpoint: Annotated[bool, typer.Option(help="keep the checkpoint after a successful save")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log each layer")] = False,
) -> None:
    """Quantize a model: print the plan, calibrate and quantize layer by layer, save, report accuracy."""
    from slimquant.workflow import QuantizeJob, run_quantize_job

    _setup_logging(verbose)
    job = None
    try:
        job = QuantizeJob.from_cli(
            recipe=recipe, model=model, scheme=scheme, w_bits=w_bits, group_size=group_size, w_sym=w_sym,
            algorithms=algorithm, ignore=ignore, calib_file=calib_file, num_samples=num_samples, seqlen=seqlen,
            device=device, lazy=lazy, output=output, overwrite=overwrite, save_type=save_type,
            part_file_size=part_file_size, eval_text=eval_text, eval_windows=eval_windows,
            eval_window=eval_window, kl_samples=kl_samples, layer_report=layer_report, plot_dir=plot, resume=resume,
            checkpoint_dir=checkpoint_dir, keep_checkpoint=keep_checkpoint)
        run_quantize_job(job, console)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        if job is not None and job.output_complete:
            _interrupted_after_output(job.output, job.recipe.runtime.checkpoint_dir)
        checkpointed = job is not None and job.recipe.runtime.checkpoint_dir  # none without -o, none on torchrun
        _interrupted("; run the same command with --resume to continue from the last checkpointed layer"
                     if checkpointed else "")
    except Exception as exc:  # noqa: BLE001 - every failure becomes a one-line message and an exit code
        _fail(exc)


@app.command("eval")
def eval_command(
    output: Annotated[Optional[Path], typer.Argument(help="a saved output; omit to evaluate the float model")] = None,
    model: Annotated[Optional[str], typer.Option(help="the float model (folder or .gguf); default: SmolLM2")] = None,
    text: Annotated[Optional[Path], typer.Option(help="text file for perplexity")] = None,
    dataset: Annotated[Optional[str], typer.Option(help="a `datasets` name for perplexity, e.g. wikitext")] = None,
    dataset_config: Annotated[Optional[str], typer.Option(help="the dataset's configuration")] = None,
    split: Annotated[str, typer.Option(help="dataset split")] = "test",
    window: Annotated[int, typer.Option(help="tokens per perplexity window")] = 2048,
    windows: Annotated[int, typer.Option(help="number of perplexity windows")] = 8,
    kl_samples: Annotated[int, typer.Option(help="self-generated samples for KL / top-1 (0 = skip)")] = 4,
    layer_errors: Annotated[bool, typer.Option(help="per-Linear error table (LayerWiseQuantError)")] = False,
    report: Annotated[Optional[Path], typer.Option(help="write the results as JSON here")] = None,
    plot: Annotated[Optional[Path], typer.Option(
        help="write PNGs and report.html here: per-Linear errors by layer and the bit map (needs an output)")] = None,
    verify: Annotated[bool, typer.Option("--verify/--no-verify",
                                         help="check every weight file against its recorded sha256")] = True,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log each step")] = False,
) -> None:
    """Measure a model: perplexity, and for a saved output KL / top-1 against float and per-Linear errors."""
    from slimquant.config.recipe import ModelSpec
    from slimquant.evaluate import EvalJob, run_eval_job

    _setup_logging(verbose)
    try:
        if output is not None and not output.is_dir():
            raise FileNotFoundError(f"no saved output at {output}")
        job = EvalJob(output=output, model=ModelSpec(path=model), text=text, dataset=dataset,
                      dataset_config=dataset_config, split=split, window=window, windows=windows,
                      kl_samples=kl_samples, layer_errors=layer_errors, report=report, verify=verify,
                      plot_dir=plot)
        run_eval_job(job, console)
    except typer.Exit:
        raise
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command("export")
def export_command(
    saved: Annotated[Path, typer.Argument(help="an output written by `slimquant quantize` (msModelSlim layout)")],
    to: Annotated[list[str], typer.Option("--to", help="output format (repeat); see `slimquant plugins`")],
    output: Annotated[Path, typer.Option("--output", "-o", help="output directory")],
    model: Annotated[Optional[str], typer.Option(help="the float model it was quantized from (folder or .gguf); "
                                                      "default: embedded SmolLM2-135M")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing output directory")] = False,
    part_file_size: Annotated[float, typer.Option(help="shard size in GB (0 = one file)")] = 0.0,
    verify: Annotated[bool, typer.Option("--verify/--no-verify", help="check the saved files' sha256")] = True,
) -> None:
    """Rewrite a saved output in other formats (compressed-tensors, gguf, ... as installed)."""
    from slimquant.config.recipe import ModelSpec
    from slimquant.export.convert import convert_output

    _setup_logging(False)
    try:
        files = convert_output(saved, to, output, ModelSpec(path=model), overwrite=overwrite,
                               part_file_size=part_file_size, verify=verify)
        console.print(f"wrote {len(files)} file(s) to {escape(str(output))}")
    except KeyboardInterrupt:
        _interrupted()
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


@app.command("inspect")
def inspect_command(
    output: Annotated[Path, typer.Argument(help="a saved slimquant output directory")],
    layers: Annotated[bool, typer.Option(help="list every quantized tensor")] = False,
) -> None:
    """Show what a saved output holds: scheme, layers, bits, group sizes, files and sizes."""
    from slimquant.inspect_output import describe

    try:
        describe(output, Console(), list_layers=layers)
    except Exception as exc:  # noqa: BLE001
        _fail(exc)


def main() -> None:
    install_signal_handlers()
    try:
        app()
    except KeyboardInterrupt:  # outside a command (while typer parses arguments)
        console.print("interrupted")
        sys.exit(INTERRUPTED)
