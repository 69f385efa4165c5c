"""Thin handlers of the Model tab and of what names a session's model everywhere.

Each browser session has its own model choice (a ``gr.State``: the model file's path, or
None for the app's default; see :mod:`lungvit.app.state`). Loading a file here switches
that session only; "Back to the bundled model" returns it to the default.
"""
from __future__ import annotations

import html
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import gradio as gr

from lungvit.app.handlers import user_errors
from lungvit.app.state import AppContext

SummaryT = tuple[str, str, dict[str, Any], str, str]


@user_errors
def model_summary(ctx: AppContext, choice: str | None = None) -> SummaryT:
    """What names the session's model (``choice``: its path; None: the app's default).

    Returns:
        (banner Markdown, model card Markdown, target class choices, the classes it
        covers (Markdown, shown by the prediction), the same for the Model tab).
    """
    from lungvit.app.handlers import PREDICTED
    from lungvit.core.errors import CheckpointError
    from lungvit.core.model.card import model_card

    try:
        served = ctx.model_for(choice)
    except CheckpointError as exc:
        banner = ("**No model is loaded.** " + html.escape(str(exc))
                  + " Load a checkpoint in the Model tab.")
        none = "No model is loaded: no classes covered."
        return (banner, "No model loaded.", gr.update(choices=[PREDICTED], value=PREDICTED),
                none, none)
    banner = (f"Serving **{html.escape(served.describe())}**." if served.default else
              f"This browser session uses **{html.escape(served.describe())}** (other users "
              "are not affected; the Model tab has the way back).")
    if served.is_demo():
        banner = ("**Demo model: not for clinical use.** It was trained on synthetic "
                  "phantoms only. " + banner)
    else:
        banner = "Research software, not a medical device. " + banner
    covered = served.covered_classes()
    return (banner, model_card(served.predictor.info),
            gr.update(choices=[PREDICTED, *served.labels], value=PREDICTED), covered, covered)


@user_errors
def load_model_file(ctx: AppContext, upload: Any, reference: bool, labels: str | None
                    ) -> tuple[str, str, str, dict[str, Any], str, str]:
    """Use an uploaded LungViT checkpoint (or an imported reference-design ``.pth``) in
    this browser session only.

    Returns:
        (the session's new model choice, then :func:`model_summary`'s outputs for it).
    """
    import uuid

    if not upload:
        raise gr.Error("Upload a checkpoint file first")
    src = Path(upload if isinstance(upload, str) else upload.name)
    ctx.paths.models_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    if reference:
        from lungvit.core.model.checkpoint import import_reference, save_checkpoint

        names = [x.strip() for x in (labels or "").split(",") if x.strip()] or None
        model, info = import_reference(src, labels=names)
        dest = ctx.paths.models_dir / f"imported-{stamp}.safetensors"
        save_checkpoint(dest, model, info)
    else:
        dest = ctx.paths.models_dir / f"{stamp}-{Path(src.name).name}"
        shutil.copyfile(src, dest)
    try:
        ctx.sessions.load(dest)
    except Exception:
        dest.unlink(missing_ok=True)
        raise
    choice = str(dest.resolve())
    return (choice, *model_summary(ctx, choice))


@user_errors
def use_default_model(ctx: AppContext) -> tuple[None, str, str, dict[str, Any], str, str]:
    """Back to the app's default (bundled) model in this browser session.

    Returns:
        (the session's model choice: None, then :func:`model_summary`'s outputs).
    """
    return (None, *model_summary(ctx, None))
