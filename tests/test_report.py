"""``benchmarks/report.py``: the README's results tables are what the committed results files render."""
import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("lc_kernels_results_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture
def results(tmp_path, report):
    """A copy of benchmarks/results/ (results files only)."""
    dst = tmp_path / "results"
    shutil.copytree(report.RESULTS, dst, ignore=shutil.ignore_patterns("*.png"))
    return dst


def test_readme_matches_the_committed_results(report, capsys):
    assert report.problems() == []
    assert report.main(["--check"]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    text = report.README.read_text()
    assert len(report.MARKER.findall(text)) >= 8
    # every rendered table is followed by its source line, which names the results file and its date
    for m in report.MARKER.finditer(text):
        assert "<sub>Source: `benchmarks/results/" in m.group(0), m["name"]
    assert re.search(r"<sub>Source: `benchmarks/results/experiments/llm_ffn\.json` · \d{4}-\d\d-\d\d · commit ", text)


def test_a_number_edited_by_hand_fails_the_check(report, tmp_path, capsys):
    text = report.README.read_text()
    block = next(m for m in report.MARKER.finditer(text) if m["name"] == "llm_ffn")
    body = block["body"]
    row = next(line for line in body.splitlines() if line.startswith("| dense |"))
    edited = row.replace("74.5", "74.6")
    assert edited != row
    readme = tmp_path / "README.md"
    readme.write_text(text.replace(row, edited, 1))
    found = report.problems(readme)
    assert len(found) == 1 and "table 'llm_ffn' differs" in found[0]
    assert f"-{edited}" in found[0] and f"+{row}" in found[0]  # the diff shows the hand edit
    assert report.main(["--check", "--readme", str(readme)]) == 1
    assert "llm_ffn" in capsys.readouterr().err
    # Rendering in place puts the file's number back.
    assert report.main(["--readme", str(readme)]) == 0
    assert readme.read_text() == text


def test_a_results_file_naming_a_missing_script_fails_the_check(report, results):
    path = results / "experiments" / "llm_decode.json"
    data = json.loads(path.read_text())
    data["environment"]["command"] = "python benchmarks/experiments/llm_decode_gone.py --threads 2"
    path.write_text(json.dumps(data))
    found = report.problems(report.README, results)
    assert any("llm_decode_gone.py, which no longer exists" in f for f in found)
    assert any("table 'llm_decode' differs" in f for f in found)  # its source line names the command


def test_missing_results_file_and_unrecorded_provenance(report, results, tmp_path):
    (results / "experiments" / "onnx_latency.json").unlink()
    assert any("table 'onnx_latency'" in f and "no results file" in f for f in report.problems(report.README, results))
    line = report.render("experiments/llm_compress_cost", results).splitlines()[-1]
    assert "commit not recorded" in line and "CPU model not recorded" in line
    # A file written with today's environment() prints what it recorded.
    (results / "x.json").write_text(json.dumps({"rows": [{"a": 1.5}], "environment": {
        "date": "2026-12-07T10:00:00+00:00", "commit": "abc1234", "dirty": True, "cpu": "Some CPU", "threads": 2,
        "device": "cpu", "command": "python benchmarks/report.py"}}))
    assert report.render("x", results).splitlines()[-1] == (
        "<sub>Source: `benchmarks/results/x.json` · 2026-12-07 · commit abc1234 (uncommitted changes) · Some CPU, "
        "2 threads · `python benchmarks/report.py`</sub>")
