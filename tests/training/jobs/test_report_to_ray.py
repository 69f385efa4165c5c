"""When ReportToRay hands a checkpoint to Ray: never before its step's metrics are logged.

A fake trainer stands in for Lightning's (only the attributes the callback reads); the
real ordering under Ray, with a kill right after the checkpoint, is the slow SIGKILL test.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from lungvit.training.jobs import ray_report
@pytest.fixture
def reported(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    steps: list[int] = []
    monkeypatch.setattr(ray_report.ReportToRay, "_report",
                        lambda self, trainer: steps.append(trainer.global_step))
    return steps


def _trainer(step: int, *, last_batch: bool, sanity: bool = False) -> SimpleNamespace:
    progress = SimpleNamespace(is_last_batch=last_batch)
    return SimpleNamespace(sanity_checking=sanity, global_step=step,
                           fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                               batch_progress=progress)))


def test_an_epoch_end_validation_is_reported_at_the_epoch_end(reported: list[int]) -> None:
    callback = ray_report.ReportToRay(None)
    trainer = _trainer(4, last_batch=True)
    callback.on_validation_end(trainer, None)
    assert reported == []  # the epoch's averages are not logged (nor stored) yet
    callback.on_train_epoch_end(trainer, None)
    assert reported == [4]
    callback.on_train_epoch_end(_trainer(8, last_batch=True), None)
    assert reported == [4]  # an epoch without a validation has nothing to report


def test_a_mid_epoch_validation_is_reported_at_once(reported: list[int]) -> None:
    callback = ray_report.ReportToRay(None)
    callback.on_validation_end(_trainer(6, last_batch=False), None)
    assert reported == [6]
    callback.on_train_epoch_end(_trainer(8, last_batch=True), None)
    assert reported == [6]


def test_the_sanity_check_is_never_reported(reported: list[int]) -> None:
    callback = ray_report.ReportToRay(None)
    callback.on_validation_end(_trainer(0, last_batch=True, sanity=True), None)
    callback.on_train_epoch_end(_trainer(0, last_batch=True), None)
    assert reported == []

