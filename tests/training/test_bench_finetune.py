"""bench/bench_finetune.py: recall by source, the figure that shows a fine-tune on a new source."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from lungvit.training.data.discover import Sample

BENCH = Path(__file__).resolve().parents[2] / "bench" / "bench_finetune.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_finetune", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sample(label: str, source: str, i: int) -> Sample:
    return Sample(path=f"/x/{label}/{source}__{i}.png", label=label, patient_key=f"{source}{i}",
                  source=source)


def test_recall_by_source_counts_each_source_and_skips_single_source_classes() -> None:
    bench = _bench()
    samples = ([_sample("normal", "adults", i) for i in range(4)]
               + [_sample("normal", "children", i) for i in range(2)]
               + [_sample("covid", "adults", i) for i in range(3)])
    predicted = ["normal", "normal", "normal", "covid",   # adults: 3 of 4
                 None, "normal",                          # children: unreadable counts wrong
                 "covid", "covid", "normal"]
    out = bench.recall_by_source(samples, predicted)
    assert set(out) == {"normal"}, "a class from one source has nothing to compare"
    assert out["normal"]["adults"] == (pytest.approx(0.75), 4)
    assert out["normal"]["children"] == (pytest.approx(0.5), 2)


def test_holdout_none_keeps_every_source_in_the_fine_tune() -> None:
    bench = _bench()
    samples = [_sample("normal", src, i) for src in ("adults", "children") for i in range(40)]
    sets = bench.build_sets(samples, ["normal"], {}, per_class=10, val=5, test=5,
                            eval_per_class=20, seed=0)
    assert not sets["held_out"]
    used = {s.source for s in sets["train"] + sets["unseen"]}
    assert used == {"adults", "children"}
    seen = {s.path for k in ("train", "val", "test") for s in sets[k]}
    assert not seen & {s.path for s in sets["unseen"]}, "unseen scans must be unseen"
