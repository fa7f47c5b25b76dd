"""The job behind `slimquant eval`: perplexity, KL / top-1 against float, and per-Linear errors of a saved output."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimquant.calibration import generate_samples, load_dataset_text, read_text
from slimquant.config.recipe import CalibrationSpec, ModelSpec
from slimquant.errors import RecipeError
from slimquant.eval.divergence import divergence, logits_of
from slimquant.eval.layer_errors import errors_table, linear_errors, save_errors
from slimquant.eval.perplexity import perplexity
from slimquant.export.fit import check_output_fits
from slimquant.model.checks import check_sequence_length
from slimquant.model.loading import check_tokenizer_files, load_config, load_model, load_tokenizer
from slimquant.plots import write_report
from slimquant.quant.fake_linear import FakeQuantLinear
from slimquant.workflow import check_report_path

EVAL_SEED = 1_000_003


@dataclass
class EvalJob:
    output: Path | None  # a saved slimquant output; None = evaluate the float model alone
    model: ModelSpec
    text: Path | None = None
    dataset: str | None = None
    dataset_config: str | None = None
    split: str = "test"
    window: int = 2048
    windows: int = 8
    kl_samples: int = 4
    kl_seqlen: int = 128
    layer_errors: bool = False
    report: Path | None = None
    verify: bool = True  # check every weight file against the sha256 the description records
    plot_dir: Path | None = None  # PNGs and report.html (per-Linear errors by layer, bit map); needs `output`

    def check(self) -> None:
        """The job's own arguments, checked before the model is loaded."""
        if self.window < 2:
            raise RecipeError(f"--window must be at least 2 tokens (one to predict from, one to score), "
                              f"got {self.window}")
        if self.windows < 1:
            raise RecipeError(f"--windows must be at least 1, got {self.windows}")
        if self.kl_samples < 0:
            raise RecipeError(f"--kl-samples must be >= 0, got {self.kl_samples}")
        if self.text is not None:
            read_text(str(self.text), what="evaluation text file")
        if self.report is not None:
            check_report_path(self.report, "--report")
        if self.plot_dir is not None and self.output is None:
            raise RecipeError("--plot needs a saved output to plot (the float model has no per-Linear errors)")


def _eval_ids(job: EvalJob, tokenizer):
    if job.text:
        text = read_text(str(job.text), what="evaluation text file")
    elif job.dataset:
        text = load_dataset_text(CalibrationSpec(source="dataset", dataset=job.dataset,
                                                 dataset_config=job.dataset_config, split=job.split))
    else:
        return None
    return tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def run_eval_job(job: EvalJob, console: Console) -> dict:
    job.check()
    check_tokenizer_files(job.model)
    config = load_config(job.model)
    if job.text is not None or job.dataset is not None:
        check_sequence_length(config, job.window, "--window")
    if job.output is not None:
        check_output_fits(job.output, job.model, config, job.verify)
    with console.status("loading model"):
        float_model = load_model(job.model, config)
        tokenizer = load_tokenizer(job.model)
    quantized = None
    if job.output is not None:
        from slimquant.loader import load_quantized

        with console.status(f"loading quantized output {job.output}"):
            quantized = load_quantized(copy.deepcopy(float_model), job.output, verify=job.verify)
    results: dict = {}
    ids = _eval_ids(job, tokenizer)
    if ids is not None:
        results["ppl_float"] = perplexity(float_model, ids, job.window, job.windows)
        if quantized is not None:
            results["ppl_quantized"] = perplexity(quantized, ids, job.window, job.windows)
    want_errors = job.layer_errors or job.plot_dir is not None
    if quantized is not None and (job.kl_samples or want_errors):
        with console.status("writing evaluation text with the float model"):
            samples = generate_samples(float_model, tokenizer, max(job.kl_samples, 1), job.kl_seqlen, EVAL_SEED)
        if job.kl_samples:
            d = divergence(logits_of(float_model, samples), quantized, samples)
            results.update(kl=d.kl, top1=d.top1, kl_tokens=d.tokens)
        if want_errors:
            errors = linear_errors(float_model, quantized, samples)
            results["linear_errors"] = errors
            Console().print(errors_table(errors))
            if job.report:
                save_errors(errors, job.report.with_suffix(".layers.json"))
    if job.plot_dir is not None and quantized is not None:
        page = write_report(job.plot_dir, linear_errors=results.get("linear_errors"), bits=model_bits(quantized),
                            title=f"slimquant eval {job.output}")
        console.print(f"plots: {page}")
    _print(results)
    if job.report:
        job.report.write_text(json.dumps({k: v for k, v in results.items() if k != "linear_errors"}, indent=1))
    return results


def model_bits(model) -> dict[str, float]:
    """Weight bits of every fake-quantized Linear of a loaded output."""
    return {n: m.bits for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


def _print(results: dict) -> None:
    table = Table("measure", "value", title="evaluation")
    if "ppl_float" in results:
        table.add_row("perplexity (float)", f"{results['ppl_float']:.3f}")
    if "ppl_quantized" in results:
        table.add_row("perplexity (quantized)", f"{results['ppl_quantized']:.3f}")
    if "kl" in results:
        table.add_row("KL(float || quantized) per token", f"{results['kl']:.5f}")
        table.add_row("top-1 agreement with float", f"{results['top1']:.2%}")
    Console().print(table)
