"""bench/bench_variants.py: the rule that picks the default variant, and one budgeted run."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from lungvit.cli.main import main as cli_main
from lungvit.core.model.network import count_parameters, create_model

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_variants.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_variants_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(name: str, acc: float, ms: float) -> dict:
    return {"variant": name, "test_acc": acc, "latency_ms": ms}


def test_the_most_accurate_wins_unless_a_faster_one_is_within_the_tie(bench: ModuleType) -> None:
    rows = [_row("a", 0.90, 50.0), _row("b", 0.885, 10.0), _row("c", 0.70, 1.0)]
    assert bench.choose(rows, tie_points=2.0)["variant"] == "b"
    assert bench.choose(rows, tie_points=1.0)["variant"] == "a"
    assert bench.choose(rows, tie_points=25.0)["variant"] == "c"


def test_a_budgeted_run_stops_on_cpu_time_and_scores_the_test_split(bench: ModuleType,
                                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    assert cli_main(["demo-data", str(data), "--per-class", "8", "--size", "64",
                     "--classes", "lung-normal", "lung-oct-cnv"]) == 0
    row = bench.train_one("lungvit_tiny", data, tmp_path / "work", budget=2.0, threads=1,
                          accelerator="cpu", seed=0)
    # 2 CPU-seconds of a tiny model: a few hundred steps at most (it does about 5-10 per
    # CPU-second here), never the 1,000 epochs (12,000 steps) asked for.
    assert 1 <= row["steps"] < 400, row
    assert row["latency_ms"] > 0
    assert row["input"] == 64
    assert row["params"] == count_parameters(create_model("lungvit_tiny", num_classes=2))
    assert sum(row["split_counts"]["test"].values()) > 0
