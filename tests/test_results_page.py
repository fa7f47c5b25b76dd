"""bench/RESULTS.md is generated from bench/results.json by bench/results_page.py (no model, data or torch needed)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "results_page.py"


def results_page(*args):
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=ROOT)


def test_the_results_page_is_what_results_json_renders():
    proc = results_page("--check")
    assert proc.returncode == 0, proc.stderr


def test_check_fails_when_a_number_in_the_json_changed(tmp_path):
    rows = json.loads((ROOT / "bench" / "results.json").read_text(encoding="utf-8"))
    rows[0]["metrics"]["ppl"] = "99.99"
    changed = tmp_path / "results.json"
    changed.write_text(json.dumps(rows), encoding="utf-8")
    proc = results_page("--check", "--json", changed, "--page", ROOT / "bench" / "RESULTS.md")
    assert proc.returncode == 1
    assert "is not what" in proc.stderr


def row(command, **extra):
    return {"topic": "GPTQ", "case": "W4A16 g64 RTN", "command": command, "source_section": "old section",
            "metrics": {"ppl": "27.19", "vs_fp32": "+30.59%", "peak_vs_fp32_model": "1.94"}, **extra}


def test_update_replaces_the_rows_of_that_case_and_script_only(tmp_path):
    table = tmp_path / "results.json"
    page = tmp_path / "RESULTS.md"
    ours = row('python bench/bench_gptq.py --only "W4A16 g64 RTN"', note="measured under load")
    other_script = row('python bench/bench_contract.py --only "W4A16 g64 RTN"')
    table.write_text(json.dumps([ours, other_script]), encoding="utf-8")
    run = tmp_path / "gptq_results.json"  # the name bench_gptq.py writes under bench/out/
    run.write_text(json.dumps([
        {"case": "W4A16 g64 RTN", "ppl": 27.0, "quant_seconds": 1.5, "peak_rss_quant_mb": 1000.0, "model_mb": 500.0},
        {"case": "a case with no row", "ppl": 30.0}]), encoding="utf-8")

    proc = results_page("--update", run, "--section", "new section", "--json", table, "--page", page)

    assert proc.returncode == 0, proc.stderr
    assert "a case with no row" in proc.stderr
    updated, untouched = json.loads(table.read_text(encoding="utf-8"))
    assert updated["metrics"] == {"ppl": "27.0", "vs_fp32": "+29.68%", "seconds": "1.5", "peak_rss_mb": "1000.0",
                                  "peak_vs_fp32_model": "2.00"}
    assert updated["source_section"] == "new section" and "note" not in updated
    assert untouched == other_script
    assert results_page("--check", "--json", table, "--page", page).returncode == 0
