"""The Runs tab (every job in the store) and the Model tab (what is served)."""
from __future__ import annotations

from functools import partial

import gradio as gr

from lungvit.app import handlers_train as t
from lungvit.app.state import AppContext


def build_runs_tab(ctx: AppContext) -> list[gr.components.Component]:
    """Lay out the Runs tab and wire its events. Returns what listing the runs updates."""
    refresh = gr.Button("Refresh", size="sm")
    runs = gr.Dataframe(headers=["job", "name", "status", "created", "attempt", "test acc"],
                        interactive=False, label="Runs", elem_id="runs-table")
    with gr.Row():
        run = gr.Dropdown([], label="Run", allow_custom_value=True, scale=1)
        resume = gr.Button("Resume (interrupted runs)", scale=0, min_width=240)
        resumed = gr.Markdown()
    with gr.Row():
        # The figures carry their own titles; a floating label would cover their axes.
        curves = gr.Plot(label="Curves", show_label=False, scale=3)
        cm = gr.Plot(label="Confusion matrix", elem_id="run-confusion", show_label=False,
                     scale=2)
    per_class = gr.Dataframe(headers=["class", "precision", "recall", "F1", "images"],
                             interactive=False, label="Per class (test split)")
    with gr.Accordion("Configuration", open=False):
        config = gr.JSON()
    with gr.Accordion("Model card", open=False):
        card = gr.Markdown()
    gr.Markdown("### Compare two runs")
    with gr.Row():
        a = gr.Dropdown([], label="Run A", allow_custom_value=True)
        b = gr.Dropdown([], label="Run B", allow_custom_value=True)
        compare = gr.Button("Compare", scale=0)
    table = gr.Dataframe(headers=["metric", "A", "B"], interactive=False)

    refresh.click(partial(t.list_runs, ctx), None, [runs, run, a, b], api_name="list_runs")
    run.change(partial(t.run_details, ctx), run, [curves, cm, per_class, config, card],
               api_name="run_details")
    compare.click(partial(t.compare_runs, ctx), [a, b], table, api_name="compare_runs")
    resume.click(partial(t.resume_run, ctx), run, resumed, api_name="resume_run")
    return [runs, run, a, b]


def build_model_tab(ctx: AppContext) -> tuple[gr.Markdown, gr.Button, gr.File, gr.Checkbox,
                                              gr.Textbox]:
    """Lay out the Model tab. Returns the card and the load controls (wired in ui.py)."""
    card = gr.Markdown("Loading the model...", elem_id="model-card")
    with gr.Accordion("Load another model", open=True):
        upload = gr.File(label="A LungViT checkpoint (.safetensors) or a reference-design "
                               "state dict (.pth)", file_types=[".safetensors", ".pth", ".pt"],
                         type="filepath", height=90)
        reference = gr.Checkbox(False, label="It is a reference-design .pth (import it)")
        labels = gr.Textbox(label="Class names in head order, comma separated (import only; "
                                  "blank: the nine standard classes)")
        load = gr.Button("Load and serve", variant="primary")
    return card, load, upload, reference, labels
