"""StoreCallback: what a Lightning run writes into the store (one process, no Ray)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lungvit.core.model.checkpoint import load_checkpoint
from lungvit.training.config import TrainConfig
from lungvit.training.data.discover import file_sha256
from lungvit.training.learn.fit import fit
from lungvit.training.store import AttemptConflictError, JobStatus, open_store
from lungvit.training.jobs.store_callback import (StoreCallback, epoch_metrics, eval_metrics,
                                             step_metrics)

from .conftest import EPOCH_NAMES, VAL_NAMES

LOGGED = {"lr": torch.tensor(0.01), "train/loss": torch.tensor(2.0),
          "train/loss_step": torch.tensor(1.5), "train/loss_epoch": torch.tensor(1.8),
          "train/acc": torch.tensor(0.25), "val/loss": torch.tensor(1.9),
          "val/acc": torch.tensor(0.5), "val/per_class": torch.zeros(3)}


def test_metric_selection() -> None:
    assert step_metrics(LOGGED) == {"train/loss": 1.5, "lr": pytest.approx(0.01)}
    assert eval_metrics(LOGGED) == {"val/loss": pytest.approx(1.9), "val/acc": 0.5}
    assert epoch_metrics(LOGGED) == {"train/loss_epoch": pytest.approx(1.8),
                                     "train/acc_epoch": 0.25}


def test_every_n_steps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        StoreCallback("sqlite://", 1, every_n_steps=0)


@pytest.mark.timeout(300)
def test_a_lightning_run_lands_in_the_store(tmp_path: Path, png_data: Path,
                                            cache_dir: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job = store.create_job({"train": {"data": str(png_data)}})
        store.start_attempt(job, resolved_config={})
    cfg = TrainConfig(data=str(png_data), out=str(tmp_path / "model.safetensors"),
                      variant="lungvit_tiny", input_size=32, epochs=2, batch_size=16,
                      cache_dir=str(cache_dir), run_dir=str(tmp_path / "run"), augment=False,
                      early_stopping_patience=0, accelerator="cpu")
    callback = StoreCallback(url, job, every_n_steps=2)
    result = fit(cfg, callbacks=[callback], progress=False)
    # The resumable checkpoints fit kept stand in for the ones Ray would report.
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step*.ckpt"))
    assert ckpts
    callback.record_checkpoint(2, str(ckpts[0]), 2.5)
    callback.record_checkpoint(4, str(ckpts[-1]), 2.0)
    callback.record_result(result)

    per_epoch = result.steps // 2  # 50 training images, batches of 16
    with open_store(url) as store:
        series = store.metrics(job)
        keys = {(step, name) for name, points in series.items() for step, _ in points}
        expected = {(s, n) for s in range(2, result.steps + 1, 2) for n in ("train/loss", "lr")}
        expected |= {(e, n) for e in (per_epoch, 2 * per_epoch) for n in VAL_NAMES + EPOCH_NAMES}
        assert keys == expected
        versions = store.checkpoints(job)
        final = versions[-1]
        assert [c.version for c in versions] == [2, 4, result.steps + 1]
        assert [c.is_best for c in versions] == [False, False, True]  # the final model
        assert final.path == str(Path(result.checkpoint).resolve())
        assert final.sha256 == file_sha256(result.checkpoint)
        record = store.get_job(job)
        assert record.result_checkpoint_path == final.path
        assert record.final_metrics["steps"] == result.steps
        assert record.final_metrics["test/acc"] == pytest.approx(result.test_metrics["acc"])
        # A second result (the job resumed and finished again) replaces the first.
        callback.record_result(result)
        assert [c.version for c in store.checkpoints(job)] == [2, 4, result.steps + 1]
        assert record.status is JobStatus.RUNNING  # the job process sets the final status
    model, info = load_checkpoint(final.path)
    assert info.labels == tuple(result.data["classes"])


def test_new_attempt_counts_a_restart(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    with open_store(url) as store:
        job = store.create_job({"train": {"data": "d"}})
        store.start_attempt(job, resolved_config={"x": 1}, pid=4242, hostname="h",
                            run_dir="/r", dataset_fingerprint="f")
    callback = StoreCallback(url, job)
    assert callback.new_attempt("workers restarted", pid=4242, hostname="h") == 2
    with open_store(url) as store:
        record = store.get_job(job)
        messages = [e.message for e in store.events(job)]
    assert (record.status, record.attempt, record.pid, record.hostname, record.run_dir,
            record.dataset_fingerprint, record.resolved_config) == (
        JobStatus.RUNNING, 2, 4242, "h", "/r", "f", {"x": 1})
    # Never through "interrupted": no other process may take the job over meanwhile.
    assert messages[-2:] == ["workers restarted",
                             "attempt 2 started on h (pid 4242, workers restarted)"]
    # Workers of another process (or of a job no longer running) are refused.
    with pytest.raises(AttemptConflictError):
        callback.new_attempt("stale workers", pid=4243, hostname="h")
    with open_store(url) as store:
        store.set_status(job, "interrupted")
    with pytest.raises(AttemptConflictError):
        callback.new_attempt("late workers", pid=4242, hostname="h")
    callback.store.close()
    with open_store(url) as store:
        assert store.get_job(job).attempt == 2
