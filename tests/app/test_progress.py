"""The fine-tune panel's progress bar: percent and steps from the steps the job expects."""
from __future__ import annotations

from types import SimpleNamespace

from lungvit.app.handlers_train import _expected_total, progress_bar


def test_bar_shows_percent_and_steps() -> None:
    assert progress_bar(6, 10, width=10) == "▰▰▰▰▰▰▱▱▱▱ 60% (step 6 of 10)"
    assert progress_bar(0, 200, width=4) == "▱▱▱▱ 0% (step 0 of 200)"
    assert progress_bar(250, 200, width=4) == "▰▰▰▰ 100% (step 200 of 200)"  # never past full
    assert progress_bar(5, None) == "" and progress_bar(5, 0) == ""  # unknown total: no bar


def test_total_comes_from_the_attempt_record() -> None:
    job = SimpleNamespace(resolved_config={"expected_steps": 120, "train": {"max_steps": 50}})
    assert _expected_total(job) == 120
    assert _expected_total(SimpleNamespace(resolved_config={"train": {"max_steps": 50}})) == 50
    assert _expected_total(SimpleNamespace(resolved_config=None)) is None
