"""The benchmarks' results layout: what every result records, where it goes, and that BENCHMARKS.md cites
exactly the results in the tree (no timing here: benchmarks are scripts, see BENCHMARKS.md)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import _results

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = (ROOT / "BENCHMARKS.md").read_text()
RECORDED = ("benchmark", "commit", "dirty", "date", "command", "machine")


def result_files() -> list[Path]:
    return sorted(p for p in RESULTS.rglob("*") if p.is_file())


def cited() -> set[str]:
    """Result files BENCHMARKS.md names: `results/<machine>/<file>` paths, or `<machine> \\`<name>\\`` in a
    table (a JSON file)."""
    paths = set(re.findall(r"results/([\w.-]+/[\w.-]+\.(?:json|png))", DOC))
    in_tables = {f"{m}/{name}.json" for m, name in re.findall(r"\b(zen[\w-]*) `([\w.-]+)`", DOC)}
    return paths | in_tables


def test_every_result_records_commit_machine_command_and_date():
    jsons = [p for p in result_files() if p.suffix == ".json"]
    assert jsons
    for path in jsons:
        report = json.loads(path.read_text())
        assert list(report)[: len(RECORDED)] == list(RECORDED), path
        assert report["machine"]["folder"] == path.parent.name, path
        if "recovered" not in report:  # written by _results.record: nothing left unknown
            assert report["commit"] != "unknown" and report["machine"]["cpu"], path


def test_benchmarks_md_cites_exactly_the_results_in_the_tree():
    present = {str(p.relative_to(RESULTS)) for p in result_files()}
    assert cited() == present, (sorted(cited() - present), sorted(present - cited()))
    for image in re.findall(r"!\[[^]]*\]\(([^)]+)\)", DOC):
        assert (ROOT / image).is_file(), image


def test_no_benchmark_imports_a_test_module():
    for script in (ROOT / "benchmarks").glob("*.py"):
        text = script.read_text()
        assert not re.search(r"^\s*(from tests\b|import tests\b)", text, re.M), script.name


@pytest.mark.parametrize(
    ("vendor", "family", "model", "flags", "folder"),
    [
        ("AuthenticAMD", "26", "2", ["avx2", "avx512f"], "zen5"),
        ("AuthenticAMD", "25", "17", ["avx2", "avx512f"], "zen4"),
        ("AuthenticAMD", "25", "1", ["avx2"], "zen3-avx2"),
        ("AuthenticAMD", "25", "97", ["avx2"], "zen4-avx2"),  # AVX-512 hidden from the guest
        ("AuthenticAMD", "23", "49", ["avx2"], "zen2-avx2"),
        ("GenuineIntel", "6", "143", ["avx2", "avx512f"], "intel-f6m143"),
        (None, None, None, [], "cpu-sse"),
    ],
)
def test_machine_folder(vendor, family, model, flags, folder):
    info = {"vendor": vendor, "cpu_family": family, "cpu_model": model, "flags": flags}
    assert _results.machine_folder(info) == folder


def test_out_path_takes_a_name_a_path_or_none(tmp_path):
    report, zen5 = {"machine": {"folder": "zen5"}}, RESULTS / "zen5"
    assert _results.out_path(None, "engine_gpt2", report) == zen5 / "engine_gpt2.json"
    assert _results.out_path("engine_gpt2_run2", "engine_gpt2", report) == zen5 / "engine_gpt2_run2.json"
    assert _results.out_path(str(tmp_path / "x.json"), "engine_gpt2", report) == tmp_path / "x.json"
    assert _results.out_path("-", "engine_gpt2", report) is None


def test_record_puts_what_every_result_records_first(tmp_path):
    command = "python benchmarks/bench_prefill.py --reps 1"
    report = _results.record(command, {"results": [1]}, read_gbps=12.345)
    assert list(report) == [*RECORDED, "results"]
    assert report["benchmark"] == "bench_prefill" and report["command"] == command
    assert re.fullmatch(r"[0-9a-f]{7,}", report["commit"])
    assert report["machine"]["read_GBps"] == 12.35 and report["machine"]["cores"] >= 1
    path = _results.save(report, str(tmp_path / "r.json"), "unused")
    assert json.loads(path.read_text()) == report
