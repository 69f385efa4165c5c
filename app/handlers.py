"""Thin handlers of the Predict & explain tab: read scans, predict, explain, report.

Scans are decoded once per upload and window (:class:`~lungvit.app.scans.ScanCache`), and
what is shown is drawn at display size; full-resolution files are made on request.

Torch and the model load on first use (imports inside the functions), so the app
starts serving its page in seconds.
"""
from __future__ import annotations

import csv
import functools
import html
import logging
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import gradio as gr
import numpy as np

from lungvit.app.state import AppContext
from lungvit.app.uploads import display_name, expand_uploads
from lungvit.app.windows import Windowed, load_windowed, numbers_of, presets_for
from lungvit.core.errors import LungViTError
from lungvit.core.model.preprocess import denormalize

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")

METHOD_LABELS = {"Attention rollout": "rollout", "Gradient rollout": "grad_rollout",
                 "Integrated Gradients": "ig", "Gradient SHAP": "gradient_shap",
                 "SmoothGrad": "smoothgrad", "Occlusion": "occlusion", "Grad-CAM": "gradcam"}
METHOD_NAMES = {key: name for name, key in METHOD_LABELS.items()}
PREDICTED = "Predicted class"
DISPLAY_MAX = 1024  # longest side of the scan and overlays as shown (downloads: full size)
TABLE_HEADERS = ["file", "prediction", "confidence", "uncertain", "out of scope", "notes"]


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Show LungViT's errors as readable messages; hide anything else behind a short one.

    A user's error (a ``gr.Error`` or a :class:`LungViTError`) is one line in the log; only
    bugs log a traceback.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except gr.Error as exc:
            exc.print_exception = False  # gradio would print a traceback
            log.info("%s: refused: %s", fn.__name__, " ".join(str(exc.message).split()))
            raise
        except LungViTError as exc:
            log.info("%s: refused: %s", fn.__name__, " ".join(str(exc).split()))
            raise gr.Error(html.escape(str(exc)), print_exception=False) from None
        except Exception:  # the user gets no traceback, path or PHI; the log gets it all
            log.exception("%s failed", fn.__name__)
            raise gr.Error("Something went wrong on the server; the details are in its log.",
                           print_exception=False) from None

    return wrapper


def _files(ctx: AppContext, files: Sequence[Any] | None) -> list[Path]:
    paths = [Path(f if isinstance(f, str) else getattr(f, "name", f)) for f in files or []]
    if not paths:
        raise gr.Error("Upload one or more scans (DICOM, PNG, JPEG) or a zip of them first")
    found = expand_uploads(paths, ctx.unpack_dir())
    if not found:
        raise gr.Error("The upload holds no DICOM, PNG or JPEG files")
    return found


def _pick(ctx: AppContext, files: list[Path], selected: str | None) -> Path:
    names = {display_name(p, ctx.unpack_dir()): p for p in files}
    return names.get(selected or "", files[0])


def to_uint8(pixels: np.ndarray) -> np.ndarray:
    """(H, W) float [0, 1] -> uint8."""
    return (np.clip(pixels, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: Path, image: np.ndarray, *, fast: bool = False, **text: str) -> str:
    """Write an image as PNG with text chunks, including a one-off request id.

    Gradio caches an output file under a hash of its content and rewrites that file in
    place when the same content is returned again, so two requests returning the same
    image at once could be served a half-written file; the id makes every output unique.

    Args:
        path: where to write.
        image: (H, W) or (H, W, 3) uint8.
        fast: light compression (a shown image: encoded in a third of the time).
        **text: further text chunks (e.g. the method); never identifying data.

    Returns:
        The path, as a string.
    """
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in {"Software": "LungViT", "lungvit-request": uuid.uuid4().hex,
                       **text}.items():
        info.add_text(key, value)
    Image.fromarray(image).save(path, pnginfo=info, compress_level=1 if fast else 6)
    return str(path)


def _model_input_image(predictor: Any, scan: Any) -> np.ndarray:
    """The network's actual input, de-normalised for display: (S, S) uint8."""
    x = predictor.prepare(scan)[0].numpy()  # (S, S), normalised
    return to_uint8(denormalize(x, predictor.preprocess))


def _flags(pred: Any, warnings: Sequence[str]) -> str:
    lines = [f"### {pred.label} ({pred.confidence:.0%})"]
    if pred.out_of_distribution:
        lines.append("**Probably out of scope:** " + html.escape("; ".join(pred.ood_reasons)))
    if pred.uncertain:
        lines.append("**Uncertain:** " + html.escape("; ".join(pred.uncertain_reasons)))
    if not (pred.out_of_distribution or pred.uncertain):
        lines.append("No uncertainty or out-of-scope flag was raised.")
    lines += [f"- note: {html.escape(w)}" for w in warnings]
    return "\n\n".join(lines)


def _metadata(scan: Any, show_phi: bool) -> dict[str, Any]:
    meta = scan.meta.to_dict()
    if not show_phi:
        meta.pop("phi", None)
    return meta


def _windowed(ctx: AppContext, path: Path, preset: str, center: float | None,
              width: float | None, include_phi: bool = False) -> Windowed:
    """The scan read with a window, through the app's cache (one decode per window)."""
    return load_windowed(path, preset, center, width, include_phi=include_phi,
                         read=ctx.scans.scan)


def _model_key(served: Any) -> tuple[str, int]:
    """What names a served model in the cache (its file, and the loaded object)."""
    return str(served.path), id(served.predictor)


def _prediction(ctx: AppContext, served: Any, scan: Any) -> Any:
    """The scan's prediction by the served model, computed once per scan and model."""
    return ctx.scans.derived(scan, ("predict", _model_key(served)),
                             lambda: served.predictor.predict(scan))


def _display(pixels: np.ndarray) -> np.ndarray:
    """The scan as shown: uint8, longest side at most :data:`DISPLAY_MAX`."""
    from lungvit.core.explain.api import display_shape, shrink

    return to_uint8(shrink(pixels, display_shape(pixels.shape, DISPLAY_MAX)))


@user_errors
def show_scan(ctx: AppContext, files: Sequence[Any] | None, selected: str | None,
              preset: str, center: float | None, width: float | None, show_phi: bool,
              choice: str | None = None
              ) -> tuple[str, str, dict[str, float], str, dict[str, Any],
                         dict[str, Any], float | None, float | None]:
    """Read one scan with the chosen window and predict it with the session's model.

    The decoded scan and its prediction come from the app's cache when an earlier event
    (the batch table, another view) made them.

    Args:
        choice: the session's model (a path; None: the app's default), from its gr.State.

    Returns:
        (PNGs of what the model saw, at display size, and of its input, probabilities,
        flags Markdown, metadata, the window presets that suit the scan's modality
        (choices and the one used), and the level and width it was shown with).
    """
    ctx.policy.check_phi(bool(show_phi))
    served = ctx.model_for(choice)
    predictor = served.predictor
    path = _pick(ctx, _files(ctx, files), selected)
    shown = _windowed(ctx, path, preset, center, width, bool(show_phi))
    scan = shown.scan
    pred = _prediction(ctx, served, scan)
    level, span = numbers_of(scan.meta)
    out = ctx.scratch("views")
    stem = Path(display_name(path, ctx.unpack_dir())).stem
    shown_png = save_png(out / f"{stem}-shown.png", _display(scan.pixels), fast=True)
    input_png = save_png(out / f"{stem}-model-input.png", _model_input_image(predictor, scan))
    return (shown_png, input_png, pred.probabilities,
            _flags(pred, shown.notes + scan.meta.warnings), _metadata(scan, bool(show_phi)),
            gr.update(choices=presets_for(scan.meta), value=shown.preset), level, span)


@user_errors
def predict_batch(ctx: AppContext, files: Sequence[Any] | None, preset: str,
                  center: float | None, width: float | None, choice: str | None = None
                  ) -> tuple[list[list[Any]], str, dict[str, Any]]:
    """Predict every uploaded scan with the session's model (``choice``, see show_scan).

    Returns:
        (table rows, CSV file path, a dropdown update listing the scans).
    """
    from lungvit.core.errors import ScanReadError

    served = ctx.model_for(choice)
    paths = _files(ctx, files)
    rows: list[list[Any]] = []
    names = [display_name(p, ctx.unpack_dir()) for p in paths]
    for name, path in zip(names, paths):
        try:
            shown = _windowed(ctx, path, preset, center, width)
        except ScanReadError as exc:
            rows.append([name, "", None, "", "", f"not read: {exc}"])
            continue
        scan = shown.scan
        pred = _prediction(ctx, served, scan)
        notes = "; ".join(pred.ood_reasons + pred.uncertain_reasons + shown.notes
                          + scan.meta.warnings)
        rows.append([name, pred.label, round(pred.confidence, 4), "yes" if pred.uncertain else "",
                     "yes" if pred.out_of_distribution else "", notes])
    # A unique name: Gradio caches outputs by content and rewrites same-content files.
    out = ctx.scratch("tables") / f"lungvit-predictions-{uuid.uuid4().hex[:8]}.csv"
    with open(out, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(TABLE_HEADERS)
        writer.writerows(rows)
    return rows, str(out), gr.update(choices=names, value=names[0])


def _explained(ctx: AppContext, files: Sequence[Any] | None, selected: str | None,
               preset: str, center: float | None, width: float | None,
               methods: Sequence[str] | None, target: str | None, choice: str | None
               ) -> tuple[Any, Path, Windowed, Any]:
    """(served model, file, the windowed scan, ExplanationSet): explained once per scan,
    model, methods and class; the overlays are drawn at display size (longest side
    DISPLAY_MAX)."""
    from lungvit.core.explain import explain

    chosen = [METHOD_LABELS.get(m, m) for m in methods or []]
    if not chosen:
        raise gr.Error("Pick at least one explanation method")
    served = ctx.model_for(choice)
    predictor = served.predictor
    path = _pick(ctx, _files(ctx, files), selected)
    shown = _windowed(ctx, path, preset, center, width)
    scan = shown.scan
    target_index = None
    if target and target != PREDICTED:
        if target not in predictor.labels:
            raise gr.Error(f"The model has no class {html.escape(target)}")
        target_index = predictor.labels.index(target)
    # No predictor lock: explain() serialises its own captures per model and its hooks
    # record only its own thread, so predictions keep flowing during a long explanation.
    # Overlays are drawn with opacity 0.5 here and redrawn at the asked one (cheap).
    result = ctx.scans.derived(
        scan, ("explain", _model_key(served), tuple(chosen), target_index),
        lambda: explain(predictor.model, scan.pixels, preprocess=predictor.preprocess,
                        methods=chosen, target=target_index, temperature=predictor.temperature,
                        max_side=DISPLAY_MAX))
    return served, path, shown, result


def verdict_of(faithfulness: dict[str, float]) -> str:
    """The map's verdict beside the random maps ("not scored" when it was not)."""
    from lungvit.core.explain import faithfulness_verdict

    return faithfulness_verdict(faithfulness) or "not scored"


@user_errors
def explain_scan(ctx: AppContext, files: Sequence[Any] | None, selected: str | None,
                 preset: str, center: float | None, width: float | None,
                 methods: Sequence[str] | None, target: str | None, opacity: float,
                 choice: str | None = None
                 ) -> tuple[list[tuple[str, str]], list[list[Any]]]:
    """Explain one scan with the chosen methods, for the predicted or a chosen class, with
    the session's model (``choice``, see show_scan).

    Each map is drawn at display size and judged against the random maps (its verdict
    leads its caption). Full-resolution overlays and the HTML report are made by
    :func:`explain_files`, when asked for.

    Returns:
        (gallery of (overlay PNG, caption: verdict and faithfulness), faithfulness rows).
    """
    from lungvit.core.explain import render_overlay
    from lungvit.core.explain.api import display_shape, shrink

    served, path, shown_as, result = _explained(ctx, files, selected, preset, center, width,
                                                methods, target, choice)
    scan = shown_as.scan
    label = served.labels[result.target]
    name = display_name(path, ctx.unpack_dir())
    out_dir = ctx.scratch("explanations")
    gallery, rows = [], []
    small = None
    for e in result:
        f = e.faithfulness
        verdict = verdict_of(f)
        caption = (f"{METHOD_NAMES.get(e.method, e.method)} for {label}: {verdict}; deletion "
                   f"AUC {f.get('deletion_auc', float('nan')):.3f} (random "
                   f"{f.get('random_deletion_auc', float('nan')):.3f}, lower is better), "
                   f"insertion AUC {f.get('insertion_auc', float('nan')):.3f} (random "
                   f"{f.get('random_insertion_auc', float('nan')):.3f}, higher is better)")
        image = e.overlay
        if float(opacity) != 0.5:
            if small is None:
                small = shrink(scan.pixels, display_shape(scan.pixels.shape, DISPLAY_MAX))
            image = render_overlay(e, small, opacity=float(opacity))
        png = out_dir / f"{Path(name).stem}-{e.method}.png"
        save_png(png, image, fast=True, method=e.method, target=label)
        gallery.append((str(png), caption))  # the file's name is the download's name
        rows.append([e.method, label, verdict, *(round(f.get(k, float("nan")), 4) for k in (
            "deletion_auc", "random_deletion_auc", "insertion_auc", "random_insertion_auc")),
            round(e.seconds, 2), round(result.faithfulness_seconds, 2)])
    return gallery, rows


@user_errors
def explain_files(ctx: AppContext, files: Sequence[Any] | None, selected: str | None,
                  preset: str, center: float | None, width: float | None,
                  methods: Sequence[str] | None, target: str | None, opacity: float,
                  choice: str | None = None) -> list[str]:
    """The downloads of an explanation, made on request: one full-resolution overlay PNG
    per method and the scan's HTML report (the explanation itself is reused when
    :func:`explain_scan` made it for the same inputs).

    Returns:
        The files' paths.
    """
    from lungvit.app.report import build_report
    from lungvit.core.explain import render_overlay

    served, path, shown_as, result = _explained(ctx, files, selected, preset, center, width,
                                                methods, target, choice)
    scan = shown_as.scan
    # The files are full size: a JPEG 2000 scan that was read smaller to be shown is read
    # again in full, with the very window it was shown with.
    full = scan if scan.meta.resolution_level == 0 else ctx.scans.scan(
        path, window=shown_as.window, min_side=None)
    label = served.labels[result.target]
    name = display_name(path, ctx.unpack_dir())
    out_dir = ctx.scratch("downloads")
    downloads, parts = [], []
    for e in result:
        image = render_overlay(e, full.pixels, opacity=float(opacity))
        png = out_dir / f"{Path(name).stem}-{e.method}.png"
        save_png(png, image, method=e.method, target=label)
        downloads.append(str(png))
        parts.append({"method": e.method, "overlay": image,
                      "faithfulness": {**e.faithfulness}, "verdict": verdict_of(e.faithfulness)})
    pred = _prediction(ctx, served, scan)
    report = out_dir / f"{Path(name).stem}-report.html"
    report.write_text(build_report(
        name=name, image=to_uint8(full.pixels), prediction=pred.to_dict(), explanations=parts,
        model=served.describe(), demo=served.is_demo(),
        version=_version(), report_id=uuid.uuid4().hex[:12]), encoding="utf-8")
    downloads.append(str(report))
    return downloads


@user_errors
def view_scan(ctx: AppContext, files: Sequence[Any] | None, selected: str | None,
              preset: str, center: float | None, width: float | None) -> dict[str, Any]:
    """The zoomable viewer's value for the scan shown (no map yet); the scan comes from
    the cache that :func:`show_scan` filled."""
    from lungvit.app.viewer import viewer_value

    path = _pick(ctx, _files(ctx, files), selected)
    shown = _windowed(ctx, path, preset, center, width)
    return viewer_value(_display(shown.scan.pixels), _caption(ctx, path, shown))


@user_errors
def view_maps(ctx: AppContext, files: Sequence[Any] | None, selected: str | None,
              preset: str, center: float | None, width: float | None,
              methods: Sequence[str] | None, target: str | None, opacity: float,
              choice: str | None = None) -> dict[str, Any]:
    """The viewer's value after Explain: the scan beside each map's colour layer (the
    explanation comes from the cache that :func:`explain_scan` filled; the browser blends
    the layer at the slider's opacity)."""
    from lungvit.app.viewer import viewer_value
    from lungvit.core.explain import render_overlay

    served, path, shown_as, result = _explained(ctx, files, selected, preset, center, width,
                                                methods, target, choice)
    shown = _display(shown_as.scan.pixels)
    small = shown.astype(np.float32) / 255.0
    label = served.labels[result.target]
    layers = [(f"{METHOD_NAMES.get(e.method, e.method)} for {label}: {verdict_of(e.faithfulness)}",
               render_overlay(e, small, opacity=1.0)) for e in result]
    return viewer_value(shown, _caption(ctx, path, shown_as), layers, float(opacity))


def _caption(ctx: AppContext, path: Path, shown: Windowed) -> str:
    return f"{display_name(path, ctx.unpack_dir())}: {shown.preset}"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lungvit")
    except PackageNotFoundError:
        return "unknown"


FAITH_HEADERS = ["method", "class", "verdict", "deletion AUC", "random deletion", "insertion AUC",
                 "random insertion", "map seconds", "scoring seconds (all maps)"]
