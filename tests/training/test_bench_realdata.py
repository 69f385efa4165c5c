"""bench/bench_realdata.py end to end on a tiny two-source data set (a few optimizer steps)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungvit.core.model.checkpoint import read_checkpoint_info

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_realdata.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_realdata", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    for label, sources, base in (("a", ("s1", "s2"), 60), ("b", ("s3",), 180)):
        (root / label).mkdir(parents=True)
        for src in sources:
            for i in range(12):
                px = np.clip(base + rng.normal(0, 20, (32, 32)), 0, 255).astype(np.uint8)
                Image.fromarray(px).save(root / label / f"{src}__img{i}.png")
    return root


def test_variants_evaluate_and_loso_run_and_store(data: Path, tmp_path: Path) -> None:
    bench = _bench()
    work = tmp_path / "work"
    common = ["--data", str(data), "--work", str(work), "--threads", "1", "--max-steps", "2"]
    assert bench.main(["variants", *common, "--epochs", "1", "--variants", "lungvit_tiny",
                       "--results", str(tmp_path / "v.md")]) == 0
    assert "| lungvit_tiny | 64 |" in (tmp_path / "v.md").read_text()
    model = work / "lungvit_tiny.safetensors"
    assert bench.main(["evaluate", "--data", str(data), "--model", str(model), "--split",
                       str(work / "lungvit_tiny" / "split.csv"), "--into", str(model),
                       "--results", str(tmp_path / "e.md")]) == 0
    within = read_checkpoint_info(model).metrics["within_source_test"]
    assert within["n"] > 0 and set(within["recall_by_source"]["a"]) == {"s1", "s2"}
    assert bench.main(["loso", *common, "--epochs", "1", "--variant", "lungvit_tiny",
                       "--into", str(model), "--results", str(tmp_path / "l.md"),
                       "--set", "augment=false"]) == 0
    pairs = read_checkpoint_info(model).metrics["cross_source"]["pairs"]
    # class a has two sources: one fold per source, each scored on all 12 of its scans
    assert {(p["class"], p["held_out_source"], p["n"]) for p in pairs} == {
        ("a", "s1", 12), ("a", "s2", 12)}
    assert '"augment": false' in (tmp_path / "l.md").read_text()
