"""Headless Chromium for the --plot page: which <img> it decoded (and at what size), and a screenshot.

Shared by tests/test_plots.py and bench/check_plots_render.py. Each call starts Chromium with a fresh profile
and the flags that work in a container (no sandbox, no GPU, no network services).
"""

from __future__ import annotations

import html
import json
import os
import re
import struct
import subprocess
import tempfile
from pathlib import Path

CHROMIUM = Path(os.environ.get("SLIMQUANT_CHROMIUM", "/usr/bin/chromium"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]
ATTRIBUTE = "data-render-check"
# Runs on the load event (every image fetched and decoded, or failed): a broken image has naturalWidth 0.
PROBE = f"""<script>window.addEventListener("load", () => {{
  const images = Array.from(document.images, i => ({{file: i.dataset.file || i.getAttribute("src").slice(0, 40),
    complete: i.complete, width: i.naturalWidth, height: i.naturalHeight}}));
  document.body.setAttribute("{ATTRIBUTE}", JSON.stringify(images));
}});</script>"""


def chromium(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="slimquant-chromium-") as profile:
        proc = subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited with {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def decoded_images(page: Path, timeout: float = 120) -> list[dict]:
    """Every <img> of `page` as Chromium loaded it: {file (its data-file), complete, width, height} with the
    natural (decoded) size, 0 x 0 for an image that failed to decode. The page is copied beside itself with a probe
    script added (so relative links still resolve), loaded with --dump-dom, and the copy removed."""
    page = Path(page).resolve()
    text = page.read_text(encoding="utf-8")
    probed = text.replace("</body>", PROBE + "</body>") if "</body>" in text else text + PROBE
    with tempfile.NamedTemporaryFile("w", suffix=".html", prefix=".render-check-", dir=page.parent,
                                     encoding="utf-8", delete=False) as f:
        f.write(probed)
    copy = Path(f.name)
    try:
        dom = chromium(["--dump-dom", copy.as_uri()], timeout).stdout
    finally:
        copy.unlink()
    found = re.search(rf'{ATTRIBUTE}="([^"]*)"', dom)
    if found is None:
        raise RuntimeError(f"the probe did not run in {page} (no load event before the DOM was dumped?)")
    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, shot: Path, width: int = 1200, height: int = 2000, timeout: float = 120) -> Path:
    page, shot = Path(page).resolve(), Path(shot).resolve()
    shot.unlink(missing_ok=True)
    chromium([f"--screenshot={shot}", f"--window-size={width},{height}", page.as_uri()], timeout)
    if not shot.exists():
        raise RuntimeError(f"chromium wrote no screenshot {shot}")
    return shot


def png_size(png: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    if png[:8] != b"\x89PNG\r\n\x1a\n" or png[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return struct.unpack(">II", png[16:24])


def colored_pixels(shot: Path) -> int:
    """How many of the screenshot's pixels are clearly colored (not white, grey or black): the plots' lines and
    color maps are, the page's text and tables are not (a broken-image icon has about a hundred)."""
    from matplotlib.image import imread

    rgb = imread(shot)[..., :3]
    spread = rgb.max(axis=-1) - rgb.min(axis=-1)
    return int((spread > 0.25).sum())


def image_problems(page: Path, expected: dict[str, tuple[int, int]] | None = None,
                   images: list[dict] | None = None) -> list[str]:
    """What is wrong with the page's images as Chromium decoded them (empty when every one shows); with `expected`
    ({data-file: (width, height)}), also those missing or of another size. `images`: decoded_images(page), when
    already known."""
    images = decoded_images(page) if images is None else images
    problems = [f"{i['file']}: not decoded" for i in images if not (i["complete"] and i["width"] and i["height"])]
    if not images:
        problems.append("no <img> on the page")
    for name, size in (expected or {}).items():
        shown = [(i["width"], i["height"]) for i in images if i["file"] == name]
        if not shown:
            problems.append(f"{name}: not on the page")
        elif shown[0] != tuple(size) and shown[0] != (0, 0):
            problems.append(f"{name}: decoded as {shown[0][0]} x {shown[0][1]}, the file is {size[0]} x {size[1]}")
    return problems
