"""``build_app(...) -> gr.Blocks``: the LungViT app, and the options it is launched with."""
from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from lungvit.app import handlers_model as m
from lungvit.app import handlers_train as t
from lungvit.app.security import HostCheckMiddleware, allowed_host_names
from lungvit.app.state import AppContext, make_context
from lungvit.app.ui_finetune import build_finetune_tab
from lungvit.app.ui_predict import build_predict_tab
from lungvit.app.ui_runs import build_model_tab, build_runs_tab

MAX_UPLOAD = "1gb"
CSS = """
#banner {padding: 0.5em 1em; border-radius: 6px; background: var(--block-background-fill);
         border-left: 5px solid #d97706; margin-bottom: 0.3em}
#prediction h3 {margin: 0.2em 0}
#scan-viewer img, #model-input img, .overlay img {width: 100%; height: 100%;
                                                   object-fit: contain}
#model-input img {image-rendering: pixelated}
.overlay {max-width: 560px; border: 3px solid transparent; border-radius: 6px}
.overlay.unfaithful {border-color: #dc2626}
.overlay.unfaithful .overlay-caption strong {color: #dc2626}
.overlay-caption {font-size: var(--text-sm); padding: 0 0.4em}
"""


def build_app(context: AppContext | None = None, *, model: str | Path | None = None,
              db_url: str | None = None, data_dir: str | Path | None = None,
              model_concurrency: int = 2, view_concurrency: int = 4,
              max_queue: int = 64) -> gr.Blocks:
    """Build the LungViT Blocks app (nothing heavy is loaded until first use).

    Args:
        context: the default model and folders; built from the other arguments if None.
        model: the default checkpoint to serve (None: the bundled model); each browser
            session may switch to another for itself.
        db_url: the tracking store's URL.
        data_dir: the app's data directory.
        model_concurrency: explanations that may run at once.
        view_concurrency: reads and predictions of uploaded scans (a decode and a
            forward pass, under one core each) that may run at once, in a group of their
            own, so a scan is shown without waiting behind other users' explanations.
        max_queue: queued events at most; more are refused with a "busy" message.

    Returns:
        The Blocks app; launch it with ``app.launch(**launch_options(context, ...))``.
    """
    ctx = context or make_context(model, db_url=db_url, data_dir=data_dir)
    # No telemetry: Gradio would otherwise report to api.gradio.app (its version check and
    # usage analytics, with the server's address); a hospital's app talks to no one.
    with gr.Blocks(title="LungViT", delete_cache=(3600, 86400), analytics_enabled=False) as app:
        app.lungvit_context = ctx  # type: ignore[attr-defined]  # for launch_options
        # This browser session's model: a checkpoint path, or None for the app's default.
        # Switching it changes the model of this session only.
        model_state = gr.State(None)
        with gr.Row():
            gr.Markdown("## LungViT: chest X-ray and retinal OCT classifier", scale=0,
                        min_width=420)
            banner = gr.Markdown("Loading the model...", elem_id="banner")
        with gr.Tabs():
            with gr.Tab("Predict & explain", id="predict"):
                target, covered = build_predict_tab(ctx, model_concurrency, model_state,
                                                     view_concurrency)
            with gr.Tab("Fine-tune", id="finetune"):
                used = build_finetune_tab(ctx, model_state)
            with gr.Tab("Runs", id="runs"):
                run_outputs = build_runs_tab(ctx)
            with gr.Tab("Model", id="model"):
                tab = build_model_tab(ctx)
        shown = [banner, tab.card, target, covered, tab.covered]
        summary = partial(m.model_summary, ctx)
        # The public API is predict, explain, start_finetune, job_status, cancel_job,
        # list_runs, run_details and load_model; a few more user actions stay callable
        # but unlisted ("undocumented"), and the page's own events are private.
        app.load(summary, model_state, shown, api_name="model_summary",
                 api_visibility="undocumented", show_progress="hidden")
        used.success(summary, model_state, shown, api_visibility="private",
                     show_progress="hidden")
        tab.load.click(partial(m.load_model_file, ctx), [tab.upload, tab.reference, tab.labels],
                       [model_state, *shown], api_name="load_model", concurrency_limit=1)
        tab.back.click(partial(m.use_default_model, ctx), None, [model_state, *shown],
                       api_name="use_default_model", api_visibility="undocumented")
        app.load(partial(t.list_runs, ctx), None, run_outputs, api_visibility="private")
    app.queue(max_size=max_queue, default_concurrency_limit=4)
    return app


def launch_options(app: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None,
                   auth: list[tuple[str, str]] | None = None, extra_hosts: tuple[str, ...] = ()
                   ) -> dict[str, Any]:
    """Keyword arguments for ``app.launch``: limits, blocked paths, the Host check, theme.

    Args:
        app: an app from :func:`build_app`.
        host: the address the server binds.
        port: its port (None: Gradio picks one).
        auth: (user, password) pairs, or None.
        extra_hosts: further Host names to accept (e.g. a reverse proxy's).

    Returns:
        The options.
    """
    from starlette.middleware import Middleware

    ctx: AppContext = app.lungvit_context  # type: ignore[attr-defined]
    p = ctx.paths
    blocked = [p.models_dir, p.data_dir / "runs"]
    if p.db_file is not None:
        blocked += [p.db_file, p.db_file.parent / "runs"]
        blocked += [p.db_file.with_name(p.db_file.name + s) for s in ("-wal", "-shm")]
    if ctx.holder.source is not None:
        blocked.append(ctx.holder.source.resolve())
    middleware = [Middleware(HostCheckMiddleware, allowed=allowed_host_names(host, extra_hosts))]
    return {
        "server_name": host, "server_port": port, "auth": auth,
        "max_file_size": MAX_UPLOAD, "allowed_paths": [],
        "blocked_paths": [str(b) for b in blocked], "show_error": False,
        "app_kwargs": {"middleware": middleware}, "theme": gr.themes.Soft(primary_hue="blue"),
        "css": CSS, "footer_links": ["api"], "run_history": False, "quiet": True, "ssr_mode": False,
    }


def serve(app: gr.Blocks, options: dict[str, Any], attempts: int = 3) -> None:
    """``app.launch(prevent_thread_lock=True, **options)``, retried when Gradio's own
    reachability probe (3 s per try) times out on a heavily loaded machine.

    Raises:
        ValueError: the server still could not reach itself after ``attempts`` tries.
    """
    for attempt in range(attempts):
        try:
            app.launch(prevent_thread_lock=True, **options)
            return
        except ValueError as exc:
            if "localhost is not accessible" not in str(exc) or attempt == attempts - 1:
                raise
            app.close()
