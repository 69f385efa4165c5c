"""A model choice belongs to one browser session; the verdict and warning before switching.

Two gradio_client sessions of one running app: session A switches model (a loaded file,
then a finished job's model), session B keeps predicting with the app's default; "Back to
the bundled model" restores A's. The verdict handler is also tested on stored metrics.
"""
from __future__ import annotations

from pathlib import Path

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from lungvit.app import windows  # noqa: E402
from lungvit.app.verdict import MIN_TEST_SCANS, job_verdict, warning_markdown  # noqa: E402

OTHER_LABELS = ("alpha-class", "beta-class", "gamma-class")


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint whose labels no other model has (so its answers are recognisable)."""
    import torch

    from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
    from lungvit.core.model.network import create_model

    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_checkpoint(path, create_model("lungvit_tiny", num_classes=3).eval(),
                    CheckpointInfo(labels=OTHER_LABELS, notes="another test model"))
    return path


def _labels(client: Client, scan: Path) -> set[str]:
    """The labels of the probabilities the session's model gives for one scan."""
    probs = client.predict([handle_file(str(scan))], None, windows.FILE, None, None, False,
                           api_name="/predict")[2]
    return {c["label"] for c in probs["confidences"]}


def _finished_job(db_url: str, model: Path, final: dict[str, float]) -> int:
    """A succeeded job in the store whose result is ``model``, with these final metrics."""
    from lungvit.training.store import JobStatus, open_store

    with open_store(db_url) as store:
        job = store.create_job({"train": {"data": "/d"}}, name="recorded")
        store.start_attempt(job, resolved_config={})
        store.record_checkpoint(job, version=1, path=str(model), sha256="0" * 64)
        store.set_result(job, str(model), final)
        store.set_status(job, JobStatus.SUCCEEDED.value)
    return job


def _comparison(base: float, tuned: float, n: int, recall_delta: float = 0.0
                ) -> dict[str, float]:
    return {"compare/n_test": n, "compare/n_test_total": n, "compare/base_acc": base,
            "compare/tuned_acc": tuned, "compare/delta_acc": tuned - base,
            "compare/base_macro_recall": base, "compare/tuned_macro_recall": base + recall_delta,
            "compare/delta_macro_recall": recall_delta, "test/acc": tuned}


def test_a_loaded_model_serves_only_its_session(running_app: tuple[str, object],
                                                other_checkpoint: Path,
                                                scans: dict[str, Path]) -> None:
    url, ctx = running_app
    default = set(ctx.holder.get().labels)  # type: ignore[attr-defined]
    a, b = Client(url, verbose=False), Client(url, verbose=False)
    assert _labels(a, scans["png"]) == _labels(b, scans["png"]) == default
    banner, _, target, covered, _ = a.predict(handle_file(str(other_checkpoint)), False, "",
                                              api_name="/load_model")
    assert "other.safetensors" in banner and "3 classes" in covered
    assert {c[0] for c in target["choices"]} >= set(OTHER_LABELS)
    assert _labels(a, scans["png"]) == set(OTHER_LABELS)
    assert _labels(b, scans["png"]) == default  # B never switched
    assert "tiny.safetensors" in b.predict(api_name="/model_summary")[0]
    # Explanations use the session's model too: a class only A's model has is accepted.
    a.predict([handle_file(str(scans["png"]))], None, windows.FILE, None, None,
              ["Attention rollout"], OTHER_LABELS[1], 0.5, api_name="/explain")
    with pytest.raises(AppError, match="has no class"):
        b.predict([handle_file(str(scans["png"]))], None, windows.FILE, None, None,
                  ["Attention rollout"], OTHER_LABELS[1], 0.5, api_name="/explain")
    banner, _, _, covered, _ = a.predict(api_name="/use_default_model")
    assert "tiny.safetensors" in banner and "9 classes" in covered
    assert _labels(a, scans["png"]) == default


def test_use_this_model_warns_and_switches_one_session(running_app: tuple[str, object],
                                                      other_checkpoint: Path,
                                                      scans: dict[str, Path]) -> None:
    url, ctx = running_app
    db = ctx.paths.db_url  # type: ignore[attr-defined]
    default = set(ctx.holder.get().labels)  # type: ignore[attr-defined]
    worse = _finished_job(db, other_checkpoint, _comparison(0.60, 0.55, 40))
    thin = _finished_job(db, other_checkpoint, _comparison(0.50, 0.75, MIN_TEST_SCANS - 1))
    good = _finished_job(db, other_checkpoint, _comparison(0.50, 0.75, 40, 0.1))
    a, b = Client(url, verbose=False), Client(url, verbose=False)

    *_, verdict, anyway = a.predict(worse, api_name="/job_results")
    assert "Worse than the current model by 5.0 points" in verdict and "on 40 test" in verdict
    assert "not better" in verdict and anyway["visible"] is True
    with pytest.raises(AppError, match="Not switched"):
        a.predict(worse, False, api_name="/use_job_model")
    assert _labels(a, scans["png"]) == default  # refused: nothing changed

    *_, verdict, anyway = a.predict(thin, api_name="/job_results")
    assert "Better than the current model by 25.0 points" in verdict
    assert f"only {MIN_TEST_SCANS - 1} test scans" in verdict and anyway["visible"] is True
    with pytest.raises(AppError, match="Not switched"):
        a.predict(thin, False, api_name="/use_job_model")

    *_, verdict, anyway = a.predict(good, api_name="/job_results")
    assert "Better than the current model by 25.0 points" in verdict
    assert "Before you use" not in verdict and anyway["visible"] is False
    message = a.predict(good, False, api_name="/use_job_model")
    assert f"job {good}" in message and "other users keep theirs" in message
    assert _labels(a, scans["png"]) == set(OTHER_LABELS)
    assert _labels(b, scans["png"]) == default
    a.predict(api_name="/use_default_model")
    assert _labels(a, scans["png"]) == default
    # Acknowledged, the worse model can be used after all.
    a.predict(worse, True, api_name="/use_job_model")
    assert _labels(a, scans["png"]) == set(OTHER_LABELS)


def test_a_session_cannot_serve_a_file_it_was_not_given(running_app: tuple[str, object],
                                                       other_checkpoint: Path,
                                                       tmp_path: Path) -> None:
    from lungvit.core.errors import CheckpointError

    ctx = running_app[1]
    stray = tmp_path / "stray.safetensors"
    stray.write_bytes(other_checkpoint.read_bytes())
    with pytest.raises(CheckpointError, match="not a model this app loaded"):
        ctx.model_for(str(stray))  # type: ignore[attr-defined]


def test_verdict_from_stored_metrics() -> None:
    good = job_verdict(_comparison(0.412, 0.5, 120, 0.02), "base.safetensors")
    assert good.better and not good.needs_confirmation
    assert "Better than the current model (base.safetensors) by 8.8 points" in good.text
    assert "41.2% -> 50.0%" in good.text and "on 120 test scans" in good.text
    recall_drop = job_verdict(_comparison(0.5, 0.6, 120, -0.05))
    assert recall_drop.better is False and "macro recall is lower" in recall_drop.warnings[0]
    same = job_verdict(_comparison(0.5, 0.5, 100))
    assert "No better than" in same.text and same.needs_confirmation
    none = job_verdict({"test/acc": 0.9})
    assert none.better is None and none.needs_confirmation and "No comparison" in none.text
    thin = job_verdict(_comparison(0.4, 0.9, MIN_TEST_SCANS - 1, 0.5))
    assert thin.better and len(thin.warnings) == 1
    assert "use it anyway" in warning_markdown(thin)
    enough = job_verdict(_comparison(0.4, 0.9, MIN_TEST_SCANS, 0.5))
    assert not enough.needs_confirmation
    partial = job_verdict({**_comparison(0.4, 0.5, 40), "compare/n_test_total": 55})
    assert "15 test scan(s) of classes" in partial.text


def test_verdict_names_a_class_the_model_still_mostly_misses() -> None:
    """A better average can hide a class never learnt (the new hospital's normals, still
    all called a disease): such a class is named and the user asked before switching."""
    report = {"base": {"recall": {"lung-covid": 0.9, "lung-normal": 0.0}},
              "tuned_all": {"recall": {"lung-covid": 1.0, "lung-normal": 0.4, "new": 0.2,
                                       "lung-tuberculosis": 0.5}}}
    v = job_verdict(_comparison(0.6, 0.7, 120, 0.05), "base.safetensors", report)
    assert v.better and v.needs_confirmation
    assert v.warnings == [
        "It gets only 40% of the test scans of lung-normal right; the current model "
        "(base.safetensors) got 0%.",
        "It gets only 20% of the test scans of new right."]
    fine = {"tuned_all": {"recall": {"lung-covid": 0.5, "lung-normal": 1.0}}}
    assert not job_verdict(_comparison(0.6, 0.7, 120, 0.05), None, fine).needs_confirmation


def test_app_threshold_matches_training() -> None:
    from lungvit.training.learn.compare import MIN_TEST_SCANS as TRAINING_MIN

    assert MIN_TEST_SCANS == TRAINING_MIN
