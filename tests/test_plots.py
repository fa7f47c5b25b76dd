"""--plot: valid PNGs (per-Linear error by layer, sensitivity per candidate, bit map) and one self-contained HTML
page embedding each of them; rendered headless by Chromium when it is installed."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from chromium_render import CHROMIUM, colored_pixels, image_problems, png_size, screenshot
from typer.testing import CliRunner

from slimquant.cli import app

pytest.importorskip("matplotlib")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def check_png(path: Path) -> None:
    from matplotlib.image import imread

    assert path.read_bytes().startswith(PNG_SIGNATURE)
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 0.01  # something is drawn


def check_page(directory: Path, images: list[str]) -> str:
    page = (directory / "report.html").read_text(encoding="utf-8")
    for name in images:
        check_png(directory / name)
        embedded = re.search(rf'<img src="data:image/png;base64,([^"]+)" alt="[^"]*" data-file="{name}">', page)
        assert embedded, f"report.html does not show {name}"
        assert base64.b64decode(embedded.group(1)) == (directory / name).read_bytes()
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    return page


@pytest.fixture(scope="module")
def budget_run(tiny_model_dir, calib_text_file, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plots")
    recipe = tmp / "budget.yaml"
    recipe.write_text(yaml.safe_dump({"budget": {"avg_bits": 6, "candidates": [
        {"bits": 2, "group_size": 32, "symmetric": False}, {"bits": 4, "group_size": 32, "symmetric": False},
        {"bits": 8}]}}))
    result = run("quantize", recipe, "--model", tiny_model_dir, "--calib-file", calib_text_file, "--num-samples", 2,
                 "--seqlen", 16, "--kl-samples", 1, "--plot", tmp / "plots", "--output", tmp / "out")
    assert result.exit_code == 0, result.output
    return tmp, result.output


def test_quantize_plots_errors_sensitivity_and_bit_map(budget_run):
    tmp, output = budget_run
    assert "bits per weight used / allowed" in output
    page = check_page(tmp / "plots", ["linear_errors.png", "sensitivity.png", "bit_map.png"])
    assert "model.layers.1.mlp.down_proj" in page and "w4 g32 asym" in page
    budget = json.loads((tmp / "plots" / "budget.json").read_text())
    assert budget["used_bits"] <= budget["budget_bits"] and len(budget["linears"]) == 14


def test_eval_plots_a_saved_output(budget_run, tiny_model_dir):
    tmp, _ = budget_run
    result = run("eval", tmp / "out", "--model", tiny_model_dir, "--kl-samples", 1, "--plot", tmp / "eval-plots")
    assert result.exit_code == 0, result.output
    page = check_page(tmp / "eval-plots", ["linear_errors.png", "bit_map.png"])
    assert not (tmp / "eval-plots" / "sensitivity.png").exists()
    assert "model.layers.0.self_attn.q_proj" in page


def test_eval_plot_needs_an_output(tiny_model_dir, tmp_path):
    result = run("eval", "--model", tiny_model_dir, "--plot", tmp_path / "p")
    assert result.exit_code == 2 and "--plot needs a saved output" in result.output


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"Chromium is not installed ({CHROMIUM})")
def test_the_page_renders_headless(budget_run, tmp_path):
    """Chromium decodes every embedded PNG at its file's size and the screenshot shows the plots; the same checks
    fail on a copy of the page whose PNGs are broken."""
    tmp, _ = budget_run
    plots = tmp / "plots"
    page = plots / "report.html"
    expected = {n: png_size((plots / n).read_bytes()) for n in ("linear_errors.png", "sensitivity.png", "bit_map.png")}
    assert image_problems(page, expected) == []
    shot = screenshot(page, tmp_path / "shot.png")
    assert colored_pixels(shot) > 5000, "no plot shows in the screenshot"  # 35000 here, 96 when broken
    shutil.copy(shot, plots / "screenshot.png")

    broken = tmp_path / "broken.html"  # each PNG's signature zeroed: not an image any more
    broken.write_text(page.read_text(encoding="utf-8").replace("base64,iVBORw0KGgo", "base64,AAAAAAAAAAA"),
                      encoding="utf-8")
    assert sorted(image_problems(broken, expected)) == sorted(f"{n}: not decoded" for n in expected)
    assert colored_pixels(screenshot(broken, tmp_path / "broken.png")) < 1000
