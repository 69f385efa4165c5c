"""Thin handlers of the Fine-tune and Runs tabs (the Model tab's are in handlers_model).

They read the store directly and change it only through the job API
(:mod:`lungvit.training.jobs.runner`: launch, cancel, promote, resume); training itself
runs in its own process. "Use this
model" switches the model of the browser session that asks, never anyone else's.
"""
from __future__ import annotations

import html
import json
import math
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr

from lungvit.app import plots
from lungvit.app.handlers import user_errors
from lungvit.app.state import AppContext
from lungvit.app.uploads import extract_zip
from lungvit.app.verdict import job_verdict, warning_markdown

BASE_MODELS = ("Current model", "lungvit_tiny (from scratch)", "lungvit_ref64 (from scratch)",
               "lungvit_s128 (from scratch)")
ACTIVE = ("queued", "running")


def _store(ctx: AppContext):  # type: ignore[no-untyped-def]
    from lungvit.training.store import open_store

    return open_store(ctx.paths.db_url)


def _dataset_dir(ctx: AppContext, folder: str | None, archive: Any) -> Path:
    if archive:
        path = Path(archive if isinstance(archive, str) else archive.name)
        target = ctx.scratch("datasets")
        extract_zip(path, target)
        entries = [p for p in target.iterdir() if p.is_dir()]
        # A zip of one top folder holding the class folders: use that folder.
        if len(entries) == 1 and any(p.is_dir() for p in entries[0].iterdir()):
            return entries[0]
        return target
    if not folder or not folder.strip():
        raise gr.Error("Give the dataset folder (one sub-folder per class) or upload a zip")
    path = ctx.policy.check_folder(folder.strip())  # only under --data-root when exposed
    if not path.is_dir():
        raise gr.Error(f"No such folder: {html.escape(folder.strip())}")
    return path


@user_errors
def preview_dataset(ctx: AppContext, folder: str | None, archive: Any
                    ) -> tuple[str, list[list[Any]], str]:
    """What a fine-tune on this dataset would see, before anything starts.

    Returns:
        (summary Markdown, rows [class, images, train, val, test, note], resolved folder).
    """
    from lungvit.training.config import TrainConfig
    from lungvit.training.data.preview import preview

    root = _dataset_dir(ctx, folder, archive)
    defaults = TrainConfig(data=str(root), out="")
    info = preview(root, val_frac=defaults.val_frac, test_frac=defaults.test_frac,
                   seed=defaults.seed)
    rows = []
    for label, n in info["counts"].items():
        if label in info["too_small"]:
            rows.append([label, n, 0, 0, 0, "too few images: left out"])
        else:
            part = info["split"][label]
            rows.append([label, n, part["train"], part["val"], part["test"], ""])
    lines = [f"**{len(info['classes'])} classes, {info['total']} usable images**, split "
             f"{1 - defaults.val_frac - defaults.test_frac:.0%} train / "
             f"{defaults.val_frac:.0%} validation / {defaults.test_frac:.0%} test per class, "
             "by patient where known (the table shows the split the run will make)."]
    if info["unreadable"]:
        examples = ", ".join(html.escape(Path(p).name) for p, _ in info["unreadable_examples"][:5])
        lines.append(f"{info['unreadable']} files will be skipped as unreadable (e.g. {examples}).")
    if info["problem"]:
        lines.append(f"**Cannot start:** {html.escape(info['problem'])}")
    else:
        lines.append("Ready: press **Fine-tune**.")
    return "\n\n".join(lines), rows, str(root)


@user_errors
def start_finetune(ctx: AppContext, folder: str | None, archive: Any, epochs: float,
                   workers: float, use_gpu: bool, batch_size: float, lr: float,
                   base_model: str, max_steps: float | None = None,
                   choice: str | None = None) -> tuple[int, str]:
    """Queue a fine-tune job and start its process.

    "Current model" fine-tunes the session's model (``choice``; None: the app's default);
    a run from scratch is compared with it on its test split when it ends.

    Returns:
        (the job's id, a status line).
    """
    from lungvit.core.errors import CheckpointError
    from lungvit.training.data.preview import preview
    from lungvit.training.jobs.runner import launch_job

    root = _dataset_dir(ctx, folder, archive)
    problem = preview(root)["problem"]
    if problem:
        raise gr.Error(f"Cannot start: {html.escape(problem)}")
    train: dict[str, Any] = {"data": str(root), "epochs": int(epochs),
                             "batch_size": int(batch_size), "lr": float(lr)}
    if max_steps:
        train["max_steps"] = int(max_steps)
    try:
        current = ctx.model_for(choice).path
    except CheckpointError:  # no usable model: fine-tune from scratch, compare with nothing
        current = None
    if base_model == BASE_MODELS[0] or not base_model:
        if current is not None:
            train["from_checkpoint"] = str(current)
    else:
        train["variant"] = base_model.split(" ")[0]
        if current is not None:
            train["compare_to"] = str(current)
    # One worker without a named Ray cluster trains in the job process (Ray Train's local
    # mode): its first step comes seconds after the button instead of after a cluster start.
    request = {"train": train, "workers": max(1, int(workers)), "use_gpu": bool(use_gpu),
               "runtime": "auto"}
    job_id = launch_job(request, db_url=ctx.paths.db_url, name=f"fine-tune {root.name}")
    return job_id, f"Job {job_id} queued; its process is starting."


def _eta(job: Any, series: dict[str, list[tuple[int, float]]], total: int | None) -> str:
    steps = max((s for pts in series.values() for s, _ in pts), default=0)
    if not total or not job.started_at or steps <= 0:
        return ""
    started = job.started_at.replace(tzinfo=job.started_at.tzinfo or timezone.utc)
    elapsed = (datetime.now(timezone.utc) - started).total_seconds()
    left = max(0.0, elapsed / steps * (total - steps))
    return f", about {left / 60:.0f} min left" if left >= 90 else f", about {left:.0f} s left"


def _expected_total(job: Any) -> int | None:
    """The optimizer steps the job's attempt expects (recorded by the job process)."""
    resolved = job.resolved_config or {}
    value = resolved.get("expected_steps") or (resolved.get("train") or {}).get("max_steps")
    return int(value) if value else None


def progress_bar(steps: int, total: int | None, width: int = 20) -> str:
    """A text progress bar with percent and steps, e.g. ``▰▰▰▱▱ 60% (step 6 of 10)``;
    empty when the total is unknown."""
    if not total:
        return ""
    done = min(max(steps, 0), total)
    filled = round(width * done / total)
    return (f"{'▰' * filled}{'▱' * (width - filled)} {done / total:.0%} "
            f"(step {done} of {total})")


@user_errors
def job_status(ctx: AppContext, job_id: float | None) -> tuple[str, Any, str, dict[str, Any]]:
    """A job's live status, curves and the latest events.

    Returns:
        (status Markdown, curves figure, recent events text, timer update: stops
        polling once the job has ended).
    """
    if job_id is None or job_id <= 0:
        return "No job started yet.", None, "", gr.update(active=False)
    with _store(ctx) as store:
        job = store.get_job(int(job_id))
        series = store.metrics(job.id)
        events = store.events(job.id)
    last_epoch = ""
    step = max((s for pts in series.values() for s, _ in pts), default=0)
    acc = [v for _, v in series.get("val/acc", []) if not math.isnan(v)]
    if acc:
        last_epoch = f", validation accuracy {acc[-1]:.1%}"
    total = _expected_total(job)
    eta = _eta(job, series, total) if job.status == "running" else ""
    text = (f"**Job {job.id}: {job.status}** (attempt {job.attempt}), step {step}"
            f"{last_epoch}{eta}")
    bar = progress_bar(step, total) if job.status == "running" else ""
    if bar:
        text += f"\n\n`{bar}`"
    if job.error_text:
        text += "\n\n" + html.escape(job.error_text.strip().splitlines()[-1])
    log_text = "\n".join(f"{e.ts:%H:%M:%S} {e.message}" for e in events[-12:])
    return text, plots.training_curves(series), log_text, gr.update(
        active=job.status in ACTIVE)


CANCEL_WAIT_S = 5.0  # how long Cancel waits to say "cancelled" (a job stops in about 2 s)


@user_errors
def cancel_job(ctx: AppContext, job_id: float | None) -> str:
    """Ask a job to stop and wait, up to :data:`CANCEL_WAIT_S`, for it to have stopped.

    Returns:
        "Job N: cancelled." once the job process has stopped its workers and recorded it,
        else "Cancel requested for job N (now STATUS)." (a job that ended otherwise, or is
        still stopping).
    """
    from lungvit.training.jobs import runner as jobs

    if not job_id:
        raise gr.Error("No job to cancel")
    status = str(jobs.cancel_job(int(job_id), db_url=ctx.paths.db_url))
    with _store(ctx) as store:
        deadline = time.monotonic() + CANCEL_WAIT_S
        while status in ACTIVE and time.monotonic() < deadline:
            time.sleep(0.1)
            status = str(store.get_job(int(job_id)).status)
    if status == "cancelled":
        return f"Job {int(job_id)}: cancelled."
    return f"Cancel requested for job {int(job_id)} (now {status})."


def _result_report(ctx: AppContext, job: Any) -> dict[str, Any]:
    """The final evaluation kept in the job's resulting checkpoint (per class, matrix,
    the transfer policy and the comparison with the base model)."""
    if not job.result_checkpoint_path or not Path(job.result_checkpoint_path).is_file():
        return {}
    from lungvit.core.model.checkpoint import read_checkpoint_info

    metrics = read_checkpoint_info(job.result_checkpoint_path).metrics
    return {key: metrics.get(key) or {} for key in ("test", "val", "transfer", "comparison")}


def _verdict(ctx: AppContext, job: Any, final: dict[str, float]) -> Any:
    """The job's :class:`~lungvit.app.verdict.Verdict` (None while it has no model)."""
    if job.status != "succeeded" or not job.result_checkpoint_path:
        return None
    comparison = _result_report(ctx, job).get("comparison") or {}
    return job_verdict(final, comparison.get("base_model"), comparison)


@user_errors
def job_results(ctx: AppContext, job_id: float | None
                ) -> tuple[list[list[Any]], Any, str, dict[str, Any], str, dict[str, Any]]:
    """Per-class metrics, confusion matrix, calibration and verdict of a finished job.

    Returns:
        (per-class rows, confusion matrix figure, calibration Markdown, update of the
        "use this model" button, the verdict: better / worse than the current model by
        how much on how many test scans, with its warnings, and an update of the "use it
        anyway" box: shown, unticked, when the verdict warns).
    """
    if not job_id:
        return [], None, "", gr.update(interactive=False), "", gr.update(visible=False,
                                                                          value=False)
    with _store(ctx) as store:
        job = store.get_job(int(job_id))
        final = store.final_metrics(job.id)
    full = _result_report(ctx, job)
    report = full.get("test", {})
    rows = [[label, round(m.get("precision", 0), 3), round(m.get("recall", 0), 3),
             round(m.get("f1", 0), 3), m.get("support", 0)]
            for label, m in (report.get("per_class") or {}).items()]
    fig = (plots.confusion_matrix(report["confusion_matrix"], report["labels"])
           if report.get("confusion_matrix") else None)
    calib = []
    for key, name in (("test/acc", "Test accuracy"), ("test/macro_f1", "Test macro F1"),
                      ("test/ece", "Expected calibration error (test, after scaling)"),
                      ("temperature", "Softmax temperature")):
        if key in final and not math.isnan(final[key]):
            calib.append(f"- {name}: {final[key]:.3f}")
    policy = full.get("transfer") or {}
    if policy.get("name"):
        calib.append(f"- Transfer policy: {policy['name']}"
                     + (f" ({html.escape(policy['reason'])})" if policy.get("reason") else ""))
        kept = [f"distilled from the base (weight {policy['distill']:g})"
                if policy.get("distill") else "",
                f"kept weights {policy['base_mix']:g} x the base's" if policy.get("base_mix")
                else ""]
        if any(kept):
            calib.append("- Keeping what the base knew: " + "; ".join(k for k in kept if k))
    done = job.status == "succeeded" and bool(job.result_checkpoint_path)
    verdict = _verdict(ctx, job, final)
    text = warning_markdown(verdict) if verdict is not None else ""
    ack = gr.update(visible=bool(verdict and verdict.needs_confirmation), value=False)
    return (rows, fig, "\n".join(calib) or "No results yet.", gr.update(interactive=done),
            text, ack)


@user_errors
def use_job_model(ctx: AppContext, job_id: float | None, acknowledged: bool = False
                  ) -> tuple[str, str]:
    """Use a finished job's model in this browser session (other sessions keep theirs).

    A model that is not better than the current one on its test split, or whose
    comparison rests on fewer than 30 test scans, is used only once ``acknowledged``.

    Returns:
        (a status line, the session's new model choice: the model's path).
    """
    from lungvit.training.jobs.runner import promote_result

    if not job_id:
        raise gr.Error("Pick a finished job first")
    with _store(ctx) as store:
        job = store.get_job(int(job_id))
        if job.status != "succeeded" or not job.result_checkpoint_path:
            raise gr.Error(f"Job {job.id} is {job.status}; only a finished job's model can be used")
        verdict = _verdict(ctx, job, store.final_metrics(job.id))
        if verdict is not None and verdict.needs_confirmation and not acknowledged:
            raise gr.Error("Not switched. " + html.escape(" ".join(verdict.warnings))
                           + " Tick \"use it anyway\" to use it all the same.")
    ctx.sessions.load(job.result_checkpoint_path)
    promote_result(job.id, db_url=ctx.paths.db_url)  # if the store recorded its checkpoint
    served = ctx.model_for(job.result_checkpoint_path)
    return (f"This browser session now uses the model of job {job.id}: {served.describe()} "
            "(other users keep theirs; \"Back to the bundled model\" in the Model tab undoes "
            "it).", str(served.path))


# ----------------------------------------------------------------------------- runs tab
@user_errors
def list_runs(ctx: AppContext) -> tuple[list[list[Any]], dict[str, Any], dict[str, Any],
                                        dict[str, Any]]:
    """Every job in the store, newest first, and the run pickers' choices."""
    with _store(ctx) as store:
        jobs = store.list_jobs(limit=200)
        rows = []
        for j in jobs:
            acc = (j.final_metrics or {}).get("test/acc")
            rows.append([j.id, j.name or "", str(j.status), f"{j.created_at:%Y-%m-%d %H:%M}",
                         j.attempt, round(acc, 4) if isinstance(acc, float) else None])
    choices = [str(j.id) for j in jobs]
    first = choices[0] if choices else None
    second = choices[1] if len(choices) > 1 else first
    return (rows, gr.update(choices=choices, value=first),
            gr.update(choices=choices, value=first), gr.update(choices=choices, value=second))


@user_errors
def run_details(ctx: AppContext, job_id: str | None
                ) -> tuple[Any, Any, list[list[Any]], dict[str, Any], str, str]:
    """One run: curves, confusion matrix, per-class table, configuration, model card, and
    how its model compares with the one it started from on its test split."""
    if not job_id:
        return None, None, [], {}, "Select a run.", ""
    rows, cm = job_results(ctx, float(job_id))[:2]
    with _store(ctx) as store:
        job = store.get_job(int(job_id))
        series = store.metrics(job.id)
        verdict = _verdict(ctx, job, store.final_metrics(job.id))
    card = "This run has no model yet."
    if job.result_checkpoint_path and Path(job.result_checkpoint_path).is_file():
        from lungvit.core.model.checkpoint import read_checkpoint_info
        from lungvit.core.model.card import model_card

        card = model_card(read_checkpoint_info(job.result_checkpoint_path))
    config = json.loads(json.dumps(job.resolved_config or job.request_config, default=str))
    compared = ""
    if verdict is not None:
        compared = "\n".join([verdict.text, *(f"- {w}" for w in verdict.warnings)])
    return plots.training_curves(series), cm, rows, config, card, compared


@user_errors
def compare_runs(ctx: AppContext, job_a: str | None, job_b: str | None) -> list[list[Any]]:
    """Final metrics of two runs side by side."""
    if not job_a or not job_b:
        raise gr.Error("Pick two runs to compare")
    with _store(ctx) as store:
        table = store.compare(int(job_a), int(job_b))
    return [[name, _num(a), _num(b)] for name, (a, b) in table.items()]


def _num(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) else round(v, 4)


@user_errors
def resume_run(ctx: AppContext, job_id: str | None) -> str:
    """Continue an interrupted run from its last checkpoint."""
    from lungvit.training.jobs.runner import resume_job

    if not job_id:
        raise gr.Error("Select an interrupted run")
    resume_job(int(job_id), db_url=ctx.paths.db_url)
    return f"Run {int(job_id)} is resuming from its last checkpoint."
