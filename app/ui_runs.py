"""The Runs tab (every job in the store) and the Model tab (the session's model)."""
from __future__ import annotations

from dataclasses import dataclass
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
    compared = gr.Markdown(elem_id="run-verdict")
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
    run.change(partial(t.run_details, ctx), run,
               [curves, cm, per_class, config, card, compared], api_name="run_details")
    compare.click(partial(t.compare_runs, ctx), [a, b], table, api_name="compare_runs",
                  api_visibility="undocumented")
    resume.click(partial(t.resume_run, ctx), run, resumed, api_name="resume_run",
                 api_visibility="undocumented")
    return [runs, run, a, b]


@dataclass(frozen=True)
class ModelTab:
    """The Model tab's components that ui.py wires."""

    card: gr.Markdown
    covered: gr.Markdown
    load: gr.Button
    back: gr.Button
    upload: gr.File
    reference: gr.Checkbox
    labels: gr.Textbox


def build_model_tab(ctx: AppContext) -> ModelTab:
    """Lay out the Model tab (its events are wired in ui.py)."""
    gr.Markdown("The model you choose here (or with **Use this model** after a fine-tune) is "
                "used by this browser session only; other users keep theirs.")
    covered = gr.Markdown(elem_id="model-classes")
    back = gr.Button("Back to the bundled model" if ctx.holder.source is None
                     else f"Back to the app's default model ({ctx.holder.source.name})",
                     size="sm", elem_id="back-to-bundled")
    card = gr.Markdown("Loading the model...", elem_id="model-card")
    with gr.Accordion("Load another model", open=True):
        upload = gr.File(label="A LungViT checkpoint (.safetensors) or a reference-design "
                               "state dict (.pth)", file_types=[".safetensors", ".pth", ".pt"],
                         type="filepath")
        reference = gr.Checkbox(False, label="It is a reference-design .pth (import it)")
        labels = gr.Textbox(label="Class names in head order, comma separated (import only; "
                                  "blank: the nine standard classes)")
        load = gr.Button("Load and use in this session", variant="primary")
    return ModelTab(card=card, covered=covered, load=load, back=back, upload=upload,
                    reference=reference, labels=labels)
