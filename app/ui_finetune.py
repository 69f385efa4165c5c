"""The Fine-tune tab: check a dataset, start one job, follow it, use its model."""
from __future__ import annotations

from functools import partial

import gradio as gr

from lungvit.app import handlers_train as t
from lungvit.app.state import AppContext

POLL_S = 2.0


def build_finetune_tab(ctx: AppContext, model_state: gr.State,
                       data_dir_hint: str = "") -> gr.events.Dependency:
    """Lay out the tab and wire its events.

    Args:
        ctx: the app's context.
        model_state: the session's model choice: "Current model" fine-tunes it, and "Use
            this model" switches it (this session only).
        data_dir_hint: placeholder of the dataset folder box.

    Returns:
        The "use this model" event (the caller refreshes what names the session's model
        after it).
    """
    gr.Markdown("Fine-tune the model on your own labelled scans: a folder with one "
                "sub-folder per class (e.g. `lung-normal/`, `lung-covid/`). Nothing starts "
                "until you press **Fine-tune**.")
    with gr.Row(equal_height=True):
        folder = gr.Textbox(label="Dataset folder on this computer", placeholder=data_dir_hint
                            or "/path/to/dataset", scale=3, elem_id="dataset-folder")
        archive = gr.File(label="...or upload a zip", file_types=[".zip"], type="filepath",
                          scale=2)
        check = gr.Button("Check dataset", scale=1)
    summary = gr.Markdown(elem_id="dataset-summary")
    counts = gr.Dataframe(headers=["class", "images", "train", "validation", "test", "note"],
                          interactive=False, label="What the run would see")
    resolved = gr.Textbox(visible=False)
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            epochs = gr.Number(5, label="Epochs", precision=0, minimum=1)
            max_steps = gr.Number(0, label="Stop after N steps (0: no limit)", precision=0,
                                  minimum=0)
            batch = gr.Number(32, label="Batch size", precision=0, minimum=1)
            lr = gr.Number(3e-4, label="Learning rate", minimum=0)
        with gr.Row():
            workers = gr.Number(1, label="Ray workers", precision=0, minimum=1,
                                info="1: trains in the job's own process, first step in "
                                     "seconds; more (or RAY_ADDRESS set): on a Ray cluster, "
                                     "over 20 s to start one locally")
            gpu = gr.Checkbox(False, label="Use GPUs (one per worker)")
            base = gr.Dropdown(list(t.BASE_MODELS), value=t.BASE_MODELS[0],
                               label="Start from")
    with gr.Row():
        start = gr.Button("Fine-tune", variant="primary", elem_id="finetune-button")
        cancel = gr.Button("Cancel", variant="stop")
        job = gr.Number(0, label="Job", precision=0, interactive=False, min_width=80,
                        elem_id="job-id")
    status = gr.Markdown("No job started yet.", elem_id="job-status")
    curves = gr.Plot(label="Loss and accuracy", show_label=False)
    events = gr.Textbox(label="Job log", lines=5, max_lines=8, interactive=False)
    with gr.Accordion("Results", open=True):
        with gr.Row():
            per_class = gr.Dataframe(headers=["class", "precision", "recall", "F1", "images"],
                                     interactive=False, label="Per class (test split)")
            cm = gr.Plot(label="Confusion matrix", show_label=False)
        calibration = gr.Markdown()
        # Better / worse than the current model on the job's test split, and the warnings
        # the user must acknowledge (the box) before a model that is not better, or was
        # compared on fewer than 30 scans, can be used.
        verdict = gr.Markdown(elem_id="job-verdict")
        anyway = gr.Checkbox(False, label="I have read the warning: use it anyway",
                             visible=False, elem_id="use-anyway")
        with gr.Row():
            use = gr.Button("Use this model (this browser session)", variant="primary",
                            interactive=False, elem_id="use-model")
            used = gr.Markdown(elem_id="use-model-status")
    timer = gr.Timer(POLL_S, active=False)

    dataset = [folder, archive]
    check.click(partial(t.preview_dataset, ctx), dataset, [summary, counts, resolved],
                api_name="preview_dataset", api_visibility="undocumented")
    status_fn = partial(t.job_status, ctx)
    results_fn = partial(t.job_results, ctx)
    start.click(partial(t.start_finetune, ctx),
                [*dataset, epochs, workers, gpu, batch, lr, base, max_steps, model_state],
                [job, status], api_name="start_finetune", concurrency_limit=1,
                ).success(status_fn, job, [status, curves, events, timer], api_name="job_status")
    # The API polls with /job_status; the timer's own events are the page's.
    timer.tick(status_fn, job, [status, curves, events, timer], api_visibility="private",
               show_progress="hidden").then(results_fn, job,
                                           [per_class, cm, calibration, use, verdict, anyway],
                                           api_name="job_results", api_visibility="undocumented",
                                           show_progress="hidden")
    cancel.click(partial(t.cancel_job, ctx), job, status, api_name="cancel_job")
    return use.click(partial(t.use_job_model, ctx), [job, anyway], [used, model_state],
                     api_name="use_job_model", api_visibility="undocumented",
                     concurrency_limit=1)
