"""``lungvit explain``: why the model says what it says, with a faithfulness score per map."""
from __future__ import annotations

import argparse
import json
import sys
from lungvit.cli import exit_codes
from pathlib import Path
from typing import Any



def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain", help="draw attention rollout / Captum maps over a scan, each with a faithfulness score",
        description="Explain the model's answer on FILE with one or more methods. Each map is "
        "scored by deletion and insertion AUC (the target probability as the most-attributed "
        "pixels are removed / added): a faithful map has a LOWER deletion AUC and a HIGHER "
        "insertion AUC than a random map, shown beside it.",
        epilog="methods: rollout (attention rollout), grad_rollout (class-specific rollout), "
        "ig (Integrated Gradients), gradient_shap, smoothgrad (saliency + SmoothGrad), "
        "occlusion, gradcam (Grad-CAM on the conv stem's feature map, LayerCAM weighting); "
        "'all' for every one.")
    p.add_argument("file", metavar="FILE", help="the scan (DICOM, PNG or JPEG)")
    p.add_argument("--model", metavar="MODEL",
                   help="checkpoint (.safetensors, or a reference-design .pth); default: the bundled real-data model")
    p.add_argument("--method", default="rollout", metavar="M[,M...]",
                   help="comma-separated methods (default: rollout)")
    p.add_argument("--target", metavar="CLASS",
                   help="class to explain, by label or index (default: the predicted class)")
    p.add_argument("--out", metavar="DIR", help="save overlay PNGs and .npy maps in DIR")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--opacity", type=float, default=0.5, metavar="A", help="overlay opacity 0..1 (0.5)")
    p.add_argument("--no-faithfulness", action="store_true", help="skip the deletion/insertion scoring")
    p.set_defaults(func=run)


def _methods(spec: str, known: tuple[str, ...]) -> list[str]:
    names = [m.strip() for m in spec.split(",") if m.strip()]
    if names == ["all"]:
        return list(known)
    unknown = [m for m in names if m not in known]
    if unknown or not names:
        raise ValueError(f"unknown method(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(known)} or all")
    return names


def _target(spec: str | None, labels: tuple[str, ...]) -> int | None:
    if spec is None:
        return None
    if spec in labels:
        return labels.index(spec)
    if spec.isdigit() and int(spec) < len(labels):
        return int(spec)
    raise ValueError(f"unknown class {spec!r}; give one of {', '.join(labels)} or an index 0..{len(labels) - 1}")


def _save(out: Path, stem: str, es: Any, full: Any = None, opacity: float = 0.5
          ) -> dict[str, dict[str, str]]:
    """Write each method's overlay, map and raw map; with ``full`` (the scan read at full
    size, when the explanation used a smaller read) the overlay and map are drawn at its
    size."""
    import numpy as np
    from PIL import Image

    from lungvit.core.explain.api import map_at, render_overlay

    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, str]] = {}
    for e in es:
        paths = {"overlay": out / f"{stem}.{e.method}.png", "map": out / f"{stem}.{e.method}.map.npy",
                 "raw": out / f"{stem}.{e.method}.raw.npy"}
        image = e.overlay if full is None else render_overlay(e, full.pixels, opacity=opacity)
        Image.fromarray(image).save(paths["overlay"])
        np.save(paths["map"], e.map if full is None else map_at(e, full.pixels.shape))
        np.save(paths["raw"], e.raw)
        files[e.method] = {k: str(v) for k, v in paths.items()}
    return files


def _table(es: Any, labels: tuple[str, ...]) -> str:
    t = es.target
    lines = [f"explaining {labels[t]} (p = {es.probabilities[t]:.1%})",
             f"{'method':<14}{'seconds':>8}  {'deletion AUC':>18}  {'insertion AUC':>18}  notes",
             f"{'':<14}{'':>8}  {'map / random':>18}  {'map / random':>18}"]
    for e in es:
        f = e.faithfulness
        dele = f"{f['deletion_auc']:.3f} / {f['random_deletion_auc']:.3f}" if f else "-"
        ins = f"{f['insertion_auc']:.3f} / {f['random_insertion_auc']:.3f}" if f else "-"
        note = ""
        if "delta" in e.extras:
            x = e.extras
            note = (f"IG delta {x['relative_delta']:.2%} of logit, "
                    f"{x['evaluations']} gradient evaluations")
            if not x["converged"]:
                note += ", NOT converged (delta above 1%: read the map with care)"
        lines.append(f"{e.method:<14}{e.seconds:>8.2f}  {dele:>18}  {ins:>18}  {note}")
    lines.append("(faithful maps: deletion AUC below random, insertion AUC above)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from lungvit.core.errors import ScanReadError
    from lungvit.core.explain import METHODS, explain
    from lungvit.core.io.ingest import WORKING_SIDE, load_scan
    from lungvit.core.predict import Predictor

    try:
        methods = _methods(args.method, tuple(METHODS))
    except ValueError as exc:
        print(f"lungvit explain: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    if not 0.0 <= args.opacity <= 1.0:
        print(f"lungvit explain: --opacity must be between 0 and 1, got {args.opacity}", file=sys.stderr)
        return exit_codes.USAGE
    # The predictor resolves the model exactly as `lungvit predict` does (bundled default,
    # preprocessing and temperature from the checkpoint header).
    predictor = Predictor.from_checkpoint(args.model, device="cpu")
    labels = predictor.labels
    try:
        target = _target(args.target, labels)
    except ValueError as exc:
        print(f"lungvit explain: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    try:
        # Read as `lungvit predict` and the app read it (a large JPEG 2000 smaller), so the
        # three give one answer; the files written are drawn on the full-size read.
        scan = load_scan(args.file, min_side=WORKING_SIDE)
        full = (load_scan(args.file) if args.out and scan.meta.resolution_level else None)
    except ScanReadError as exc:
        print(f"{Path(args.file).name}: ERROR {exc}", file=sys.stderr)
        return exit_codes.SOME_FAILED

    es = explain(predictor.model, scan.pixels, preprocess=predictor.preprocess, methods=methods, target=target,
                 faithfulness=not args.no_faithfulness, opacity=args.opacity, temperature=predictor.temperature)
    summary = es.summary(labels)
    summary["file"] = Path(args.file).name
    if args.out:
        files = _save(Path(args.out), Path(args.file).stem, es, full, args.opacity)
        for m in summary["methods"]:
            m["files"] = files[m["method"]]
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(_table(es, labels))
        if args.out:
            print(f"overlays and maps saved in {args.out}")
    return exit_codes.OK
