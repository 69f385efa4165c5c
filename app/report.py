"""A self-contained HTML report of one scan: image, prediction, explanations, model."""
from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
from PIL import Image


def png_data_uri(image: np.ndarray) -> str:
    """A ``data:`` URI of an (H, W) or (H, W, 3) uint8 image as PNG."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_CSS = """body{font-family:system-ui,sans-serif;max-width:960px;margin:2em auto;color:#1f2937}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}.warn{background:#fff4e5;
border-left:4px solid #f59e0b;padding:.6em 1em}.flag{color:#b45309;font-weight:600}
table{border-collapse:collapse}td,th{padding:.25em .7em;border-bottom:1px solid #e5e7eb;
text-align:left}.bar{background:#2563eb;height:.8em;display:inline-block}
figure{display:inline-block;margin:.5em}img{max-width:300px;image-rendering:pixelated}"""


def build_report(*, name: str, image: np.ndarray, prediction: Mapping[str, Any],
                 explanations: Sequence[Mapping[str, Any]], model: str, demo: bool,
                 version: str, report_id: str = "") -> str:
    """Render one scan's report as a standalone HTML page (images embedded).

    Args:
        name: the file name shown.
        image: what the model saw, (H, W) uint8.
        prediction: ``Prediction.to_dict()``.
        explanations: dicts with ``method``, ``overlay`` ((H, W, 3) uint8),
            ``faithfulness`` (name -> number) and optionally ``verdict`` (beside random).
        model: a line naming the model.
        demo: whether the model is the demonstration model.
        version: the LungViT version.
        report_id: an identifier printed on the report (each report is then a distinct
            file, which Gradio's content-addressed cache needs).

    Returns:
        The HTML text.
    """
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(label)}</td><td>{p:.1%}</td><td><span class='bar' "
        f"style='width:{200 * p:.0f}px'></span></td></tr>"
        for label, p in prediction["probabilities"].items())
    flags = [f"<p class='flag'>Uncertain: {esc('; '.join(prediction['uncertain_reasons']))}</p>"
             if prediction.get("uncertain") else "",
             f"<p class='flag'>Probably out of scope: {esc('; '.join(prediction['ood_reasons']))}"
             "</p>" if prediction.get("out_of_distribution") else ""]
    figures = "".join(
        f"<figure><img src='{png_data_uri(e['overlay'])}' alt='{esc(e['method'])}'>"
        f"<figcaption>{esc(e['method'])}"
        + (f" (<b>{esc(e['verdict'])}</b>)" if e.get("verdict") else "") + ": "
        + ", ".join(f"{esc(k)} {v:.3f}" for k, v in e.get("faithfulness", {}).items())
        + "</figcaption></figure>" for e in explanations)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    banner = ("<p class='warn'><b>Demonstration model: not for clinical use.</b> It was "
              "trained on synthetic images only.</p>" if demo else
              "<p class='warn'>Research software: a prediction is not a diagnosis.</p>")
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>LungViT report: {esc(name)}</title><style>{_CSS}</style></head><body>
<h1>LungViT report: {esc(name)}</h1>{banner}
<p>Model: {esc(model)} &middot; LungViT {esc(version)} &middot; {when}
{f"&middot; report {esc(report_id)}" if report_id else ""}</p>
<h2>What the model saw</h2><img src='{png_data_uri(image)}' alt='scan'>
<h2>Prediction: {esc(prediction['label'])} ({prediction['confidence']:.1%})</h2>{''.join(flags)}
<table><tr><th>class</th><th>probability</th><th></th></tr>{rows}</table>
<h2>Explanations</h2>{figures or '<p>No explanation was computed.</p>'}
<p><small>Faithfulness: lower deletion AUC and higher insertion AUC than a random map's
mean the map points at evidence the model uses.</small></p></body></html>"""
