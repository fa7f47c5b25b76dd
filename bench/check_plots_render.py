"""Headless render of a real `slimquant eval --plot` page (issue 16): SmolLM2-135M's per-Linear errors and bit map,
rendered by Chromium; every embedded PNG must decode at its file's size and the screenshot must show the plots.

    python bench/check_plots_render.py                        # quantize + save + eval --plot + render (below)
    python bench/check_plots_render.py --output DIR           # eval --plot an existing saved output, then render
    python bench/check_plots_render.py --page PAGE.html       # only render an existing page

Without --output, SmolLM2 fp32 (bench/common.py's cache) is quantized W4A16 g64 RTN data-free (about a second) and
saved to bench/out/plots-render/output. `slimquant eval OUTPUT --model <fp32 cache> --kl-samples 1 --plot ...` then
writes the page (per-Linear errors on one self-generated sample, and the bit map) to bench/out/plots-render/plots.
The screenshot (bench/out/plots-render/screenshot.png) and the decoded sizes (render.json) go beside it. Exit status
1 when an image does not show. Needs Chromium at /usr/bin/chromium (or $SLIMQUANT_CHROMIUM).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "tests"))
import common  # noqa: E402
from chromium_render import CHROMIUM, colored_pixels, decoded_images, image_problems, png_size, screenshot  # noqa: E402

OUT = common.OUT / "plots-render"
RECIPE = {"weights": {"bits": 4, "group_size": 64, "symmetric": False}, "runtime": {"progress": False}}


def quantize_and_save(output: Path) -> None:
    import slimquant
    from slimquant.export import save_quantized

    model, tokenizer = common.load_fp32()
    slimquant.quantize(model, RECIPE)  # data-free RTN
    save_quantized(model, output, tokenizer=tokenizer, overwrite=True)


def eval_plot(output: Path, plots: Path) -> None:
    exe = Path(sys.executable).with_name("slimquant")
    cmd = [str(exe) if exe.exists() else "slimquant", "eval", str(output), "--model", str(common.ensure_fp32_cache()),
           "--kl-samples", "1", "--plot", str(plots)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="a saved output to run `slimquant eval --plot` on")
    parser.add_argument("--page", type=Path, help="render this report.html only (no quantize, no eval)")
    parser.add_argument("--window-size", default="1200,6000",
                        help="Chromium window WIDTH,HEIGHT (the default shows the bit map below the 210-row table)")
    args = parser.parse_args()
    if not CHROMIUM.exists():
        sys.exit(f"Chromium not found at {CHROMIUM} (apt-get install chromium, or set SLIMQUANT_CHROMIUM)")
    if args.page:
        page = args.page
    else:
        output = args.output
        if output is None:
            output = OUT / "output"
            quantize_and_save(output)
        plots = OUT / "plots"
        shutil.rmtree(plots, ignore_errors=True)
        eval_plot(output, plots)
        page = plots / "report.html"
    images = decoded_images(page)
    pngs = {img["file"]: png_size((page.parent / img["file"]).read_bytes())
            for img in images if (page.parent / img["file"]).is_file()}
    problems = image_problems(page, pngs, images)
    OUT.mkdir(parents=True, exist_ok=True)
    width, height = (int(v) for v in args.window_size.split(","))
    shot = screenshot(page, OUT / "screenshot.png", width, height)
    colored = colored_pixels(shot)
    if colored <= 5000:
        problems.append(f"the screenshot shows no plot (only {colored} colored pixels)")
    result = {"page": str(page), "screenshot": str(shot), "images": images, "png_sizes": pngs,
              "colored_pixels": colored, "problems": problems}
    (OUT / "render.json").write_text(json.dumps(result, indent=1))
    for img in images:
        print(f"{img['file']}: decoded {img['width']} x {img['height']}, file {pngs.get(img['file'], '?')}")
    print(f"screenshot {shot}: {colored} colored pixels")
    print("OK: every image decoded at its file's size" if not problems else "FAILED: " + "; ".join(problems))
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
