"""The Predict & explain tab."""
from __future__ import annotations

from functools import partial
from typing import Any

import gradio as gr

from lungvit.app import handlers as h
from lungvit.app import windows as w
from lungvit.app.state import AppContext
from lungvit.app.viewer import build_viewer
from lungvit.core.explain.faithfulness import BETTER

MODEL = "model"  # concurrency group of the explanations (the heavy use of the network)
VIEW = "view"  # concurrency group of reading and predicting scans (decode, one forward)
SLOTS = len(h.METHOD_LABELS)  # one overlay panel per method the user can pick


def to_custom() -> str:
    """Editing the level or width switches the preset to Custom."""
    return w.CUSTOM


def fan_out(gallery: list[Any] | None) -> list[Any]:
    """Spread the explain API's (overlay, caption) list over the fixed overlay panels.

    Each panel shows its map whole (a gallery crops a lone image and truncates captions),
    labelled with its method and target class, its verdict and faithfulness numbers below
    it, and a download button. A map that is not better than random is marked: its panel
    gets the ``unfaithful`` class (a red frame) and its verdict a warning sign.

    Args:
        gallery: the explain endpoint's list of (overlay file, caption) pairs; a caption
            reads "<method> for <class>: <verdict>; <numbers>".

    Returns:
        One update per panel (shown or hidden), then one per image, then one per caption.
    """
    items = list(gallery or [])[:SLOTS]
    shown, images, captions = [], [], []
    for i in range(SLOTS):
        if i < len(items):
            image, caption = items[i]
            method, _, numbers = (caption or "").partition(": ")
            verdict, _, rest = numbers.partition("; ")
            good = verdict == BETTER
            text = (f"**{verdict}**" if good else f"**\u26a0 {verdict}**") + (
                f": {rest}" if rest else "")
            shown.append(gr.update(visible=True, elem_classes=[
                "overlay", "faithful" if good else "unfaithful"]))
            images.append(gr.update(value=image, label=method))
            captions.append(gr.update(value=text if numbers else method))
        else:
            shown.append(gr.update(visible=False))
            images.append(gr.update(value=None))
            captions.append(gr.update(value=""))
    return [*shown, *images, *captions]


def build_predict_tab(ctx: AppContext, model_limit: int, model_state: gr.State,
                      view_limit: int = 4) -> tuple[gr.Dropdown, gr.Markdown]:
    """Lay out the tab and wire its events; every event uses the session's model.

    Args:
        ctx: the app's context.
        model_limit: explanations that may run at once.
        model_state: the session's model choice (see :mod:`lungvit.app.state`).
        view_limit: reads and predictions of scans that may run at once (own group).

    Returns:
        The target-class dropdown and the covered-classes line (both follow the
        session's model).
    """
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=280):
            files = gr.File(label="Scans: DICOM, PNG, JPEG, or a zip of them",
                            file_count="multiple", type="filepath",
                            elem_id="scan-upload")
            run = gr.Button("Predict", variant="primary", elem_id="predict-button")
            selected = gr.Dropdown(label="Scan shown", choices=[], allow_custom_value=True,
                                   interactive=True)
            with gr.Group():
                # Every preset is accepted; after a scan is read only those that suit its
                # modality are offered (Hounsfield presets for CT only).
                preset = gr.Radio([w.FILE, *w.CT_PRESETS, w.AUTO, w.FULL, w.CUSTOM],
                                  value=w.FILE, label="Display window",
                                  info="Re-reads the scan: the model sees what is shown",
                                  elem_id="window-preset")
                with gr.Row():
                    center = gr.Number(label="Level (center)", precision=1, min_width=100,
                                       info="Enter to apply")
                    width = gr.Number(label="Width", precision=1, min_width=100,
                                      info="Enter to apply")
            # Offered only where the server may grant it (the handler refuses it anyway).
            show_phi = gr.Checkbox(False, label="Show patient identifiers (PHI)",
                                   visible=ctx.policy.phi_allowed)
        with gr.Column(scale=2):
            with gr.Row():
                # The /predict API returns the shown scan as a PNG (this hidden image); the
                # page shows it in the zoomable viewer, beside its map once explained.
                viewer = gr.Image(label="What the model saw (after windowing)", type="numpy",
                                  format="png", interactive=False, visible="hidden")
                with gr.Column(scale=1, min_width=300):
                    gr.Markdown("**What the model saw** (after windowing)")
                    zoomable = build_viewer(elem_id="scan-viewer")
                model_input = gr.Image(label="Model input", type="numpy", format="png",
                                       interactive=False, height=220, min_width=220,
                                       scale=0, elem_id="model-input")
            flags = gr.Markdown("Upload a scan to see the model's answer.", elem_id="prediction")
            probs = gr.Label(label="Calibrated probabilities", num_top_classes=9,
                             elem_id="probabilities")
            covered = gr.Markdown(elem_id="covered-classes")
    with gr.Accordion("Scan metadata (identifiers hidden unless shown above)", open=False):
        meta = gr.JSON(label="Metadata")
    with gr.Accordion("All uploaded scans", open=True):
        table = gr.Dataframe(headers=h.TABLE_HEADERS, interactive=False, wrap=True,
                             label="Results", column_widths=["16%", "16%", "10%", "10%",
                                                             "10%", "38%"])
        table_csv = gr.File(label="Results as CSV", interactive=False)

    gr.Markdown("### Explain")
    with gr.Row():
        methods = gr.CheckboxGroup(list(h.METHOD_LABELS), value=["Attention rollout"],
                                   label="Methods", scale=3)
        with gr.Column(scale=1, min_width=220):
            target = gr.Dropdown([h.PREDICTED], value=h.PREDICTED, label="Class to explain",
                                 allow_custom_value=True)
            opacity = gr.Slider(0.0, 1.0, value=0.5, step=0.05, label="Overlay opacity")
            explain = gr.Button("Explain", variant="primary", elem_id="explain-button")
    # The API returns the overlays as one list (this hidden gallery); the page shows each
    # in its own panel, whole, with its numbers.
    gallery = gr.Gallery(visible="hidden", format="png", label="Explanations")
    panels, images, captions = [], [], []
    with gr.Row(elem_id="explanations"):
        for _ in range(SLOTS):
            with gr.Column(visible=False, min_width=300, elem_classes=["overlay"]) as panel:
                panels.append(panel)
                images.append(gr.Image(type="filepath", interactive=False, height=360,
                                       buttons=["download", "fullscreen"]))
                captions.append(gr.Markdown(elem_classes=["overlay-caption"]))
    faith = gr.Dataframe(headers=h.FAITH_HEADERS, interactive=False,
                         label="Faithfulness: a map is better than random when removing its "
                               "cells first lowers, and adding them first raises, the "
                               "probability more than a random map's do (see README)")
    with gr.Row():
        make_files = gr.Button("Full-resolution overlays and report", size="sm",
                               elem_id="explain-files-button", scale=0, min_width=280)
        downloads = gr.File(label="Overlays at full resolution and the scan's report (HTML)",
                            file_count="multiple", interactive=False, elem_id="downloads")

    window_inputs = [preset, center, width]
    view_outputs = [viewer, model_input, probs, flags, meta, preset, center, width]
    view = partial(h.show_scan, ctx)
    common = {"concurrency_limit": model_limit, "concurrency_id": MODEL}
    # Reading and predicting a scan uses under one core (0.7 measured by bench_app
    # --user-path; an explanation 1.4-1.8), so more of them run at once than explanations
    # do, in their own group: a scan is never shown late because others are explaining.
    light = {"concurrency_limit": view_limit, "concurrency_id": VIEW}
    # Internal UI events stay off the API page and out of gradio_client's reach; the
    # public API is /predict and /explain here (see README). /predict_batch stays
    # callable (undocumented) for scripts that predict a folder.
    private = {"api_visibility": "private"}
    view_inputs = [files, selected, *window_inputs, show_phi, model_state]
    batch = partial(h.predict_batch, ctx)
    batch_io = ([files, *window_inputs, model_state], [table, table_csv, selected])
    # After each view, the zoomable viewer shows the scan (from the cache the view filled).
    zoom = (partial(h.view_scan, ctx), [files, selected, *window_inputs], zoomable)
    run.click(batch, *batch_io, api_name="predict_batch", api_visibility="undocumented",
              **light).success(view, view_inputs, view_outputs, api_name="predict", **light
                                ).success(*zoom, **private)
    files.upload(batch, *batch_io, **private, **light).success(
        view, view_inputs, view_outputs, **private, **light).success(*zoom, **private)
    for event in (selected.input, show_phi.input, preset.input):
        event(view, view_inputs, view_outputs, **private, **light).success(*zoom, **private)
    for box in (center, width):
        box.submit(to_custom, None, preset, queue=False, **private).then(
            view, view_inputs, view_outputs, **private, **light).success(*zoom, **private)
    explain_inputs = [files, selected, *window_inputs, methods, target, opacity, model_state]
    explain.click(partial(h.explain_scan, ctx), explain_inputs, [gallery, faith],
                  api_name="explain", **common
                  ).success(fan_out, gallery, [*panels, *images, *captions], queue=False,
                            **private
                            ).success(partial(h.view_maps, ctx), explain_inputs, zoomable,
                                      **private)
    make_files.click(partial(h.explain_files, ctx), explain_inputs, downloads, **private,
                     **common)
    return target, covered
