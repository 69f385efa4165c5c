"""The worker-hooks seam (tests only: production never sets it) and the tests' fault hooks,
without Ray; ``test_job_faults`` (slow) runs them in real workers."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from lungvit.training.jobs import runner as jobs
from lungvit.training.jobs import worker_hooks
from lungvit.training.jobs.runner import JobError, JobRequest
from lungvit.training.store import JobStatus, open_store

from . import fault_hooks

BAD_NAMES = ["", "../evil", "/tmp/x", "os.path;rm", "a..b", ".relative", "1abc", "pkg.class",
             "pkg-name", "a b"]


@pytest.mark.parametrize("name", ["fault_hooks", "pkg.sub.module", "_private"])
def test_plain_dotted_names_are_module_names(name: str) -> None:
    assert worker_hooks.is_module_name(name)
    JobRequest(train={"data": "d"}, worker_hooks=name).validate()


@pytest.mark.parametrize("name", BAD_NAMES + [None, 3])
def test_anything_else_is_refused(name: object) -> None:
    assert not worker_hooks.is_module_name(name)
    with pytest.raises(ValueError, match="dotted module name"):
        worker_hooks.apply(name, rank=0, spec=None, callbacks=[],  # type: ignore[arg-type]
                           on_checkpoint=None)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_a_request_or_spec_with_a_bad_name_is_refused(name: str) -> None:
    from lungvit.training.jobs.ray_train import TrainSpec

    with pytest.raises(JobError, match="worker_hooks must be a dotted module name"):
        JobRequest(train={"data": "d"}, worker_hooks=name).validate()
    with pytest.raises(ValueError, match="dotted module name"):
        TrainSpec(train_config={}, job_id=1, db_url="sqlite://", owner_pid=os.getpid(),
                  owner_host="h", worker_hooks=name)


def test_users_requests_do_not_carry_the_seam() -> None:
    plain = JobRequest(train={"data": "d"})
    assert "worker_hooks" not in plain.to_dict()
    assert JobRequest.from_dict(plain.to_dict()) == plain
    hooked = JobRequest(train={"data": "d"}, worker_hooks="fault_hooks",
                        worker_hooks_args={"rank": 1, "step": 6})
    assert JobRequest.from_dict(hooked.to_dict()) == hooked
    # Requests stored by earlier versions hold "fault_injection": null.
    assert JobRequest.from_dict({**plain.to_dict(), "fault_injection": None}) == plain
    with pytest.raises(JobError, match="unknown job request keys: fault_injection"):
        JobRequest.from_dict({**plain.to_dict(), "fault_injection": {"rank": 1, "step": 6}})


def test_a_hooks_module_the_job_process_cannot_import_fails_the_job(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'lungvit.db'}"
    job_id = jobs.create_job({"train": {"data": str(tmp_path)},
                              "worker_hooks": "no_such_lungvit_hooks.module"}, db_url=url)
    with pytest.raises(JobError, match="no_such_lungvit_hooks.module cannot be imported"):
        jobs.run_job(job_id, db_url=url)
    with open_store(url) as store:
        assert store.get_job(job_id).status is JobStatus.FAILED


def test_apply_calls_the_modules_install(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "lungvit_probe_hooks.py").write_text(
        "def install(*, rank, spec, callbacks, on_checkpoint):\n"
        "    return callbacks + [('seen', rank, spec)], on_checkpoint\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    worker_hooks.check_importable("lungvit_probe_hooks")
    record = object()
    callbacks, on_checkpoint = worker_hooks.apply("lungvit_probe_hooks", rank=1, spec="s",
                                                  callbacks=["store"], on_checkpoint=record)
    assert (callbacks, on_checkpoint) == (["store", ("seen", 1, "s")], record)
    sys.modules.pop("lungvit_probe_hooks", None)
    with pytest.raises(ValueError, match="cannot be imported"):
        worker_hooks.check_importable("lungvit_no_such_hooks")


def _spec(tmp_path: Path, **args: int) -> SimpleNamespace:
    return SimpleNamespace(worker_hooks_args=args, train_config={"run_dir": str(tmp_path)},
                           owner_pid=os.getpid())


def test_fault_hooks_install_what_they_are_asked_for(tmp_path: Path) -> None:
    calls: list[tuple[int, str, float | None]] = []

    def record(*a: object) -> None:
        calls.append(a)  # type: ignore[arg-type]

    callbacks, on_checkpoint = fault_hooks.install(rank=0, spec=_spec(tmp_path),
                                                   callbacks=["store"], on_checkpoint=record)
    assert (callbacks, on_checkpoint) == (["store"], record)  # nothing asked: nothing added

    for rank in (0, 1):
        callbacks, on_checkpoint = fault_hooks.install(
            rank=rank, spec=_spec(tmp_path, rank=1, step=6), callbacks=["store"],
            on_checkpoint=record if rank == 0 else None)
        assert callbacks[0] == "store" and isinstance(callbacks[1], fault_hooks.FailOnce)
        assert callbacks[1].active is (rank == 1) and callbacks[1].step == 6

    _, on_checkpoint = fault_hooks.install(
        rank=0, spec=_spec(tmp_path, kill_job_at_checkpoint=4), callbacks=[],
        on_checkpoint=record)
    assert on_checkpoint is not record
    on_checkpoint(2, "p2", 1.0)  # not the step: recorded, nobody killed
    (tmp_path / fault_hooks.MARKER).write_text("already done\n")
    on_checkpoint(4, "p4", 0.5)  # the step, but once only: the marker says it happened
    assert calls == [(2, "p2", 1.0), (4, "p4", 0.5)]


def test_the_environment_puts_the_hooks_first_on_the_path() -> None:
    env = fault_hooks.environment({"PYTHONPATH": "/a" + os.pathsep + "/b"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(fault_hooks.FOLDER), "/a", "/b"]
    assert (fault_hooks.FOLDER / f"{fault_hooks.MODULE}.py").is_file()
