"""``lungvit inspect``: what the model would see for each scan, and how it was read."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lungvit.cli.args import positive_int
from lungvit.cli import exit_codes



def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``inspect`` sub-command."""
    p = sub.add_parser(
        "inspect",
        help="decode scan files and show what the model would see",
        description="Decode each DICOM, PNG or JPEG file exactly as prediction and training "
        "do, and report how it was read: format, modality, photometric interpretation, "
        "rescale and window applied, frame used, pixel spacing, and every warning. With "
        "--save, write the decoded image at full resolution and at model resolution as PNG. "
        "Patient-identifying DICOM attributes are shown only with --show-phi. Exit code 0 "
        "when every file decodes, 1 when any does not (the others are still processed).")
    p.add_argument("files", nargs="+", metavar="FILE", type=Path, help="scan files to read")
    p.add_argument("--json", action="store_true",
                   help="print a JSON list with one object per file instead of text")
    p.add_argument("--save", metavar="DIR", type=Path,
                   help="write NAME.full.png and NAME.model<SIZE>.png (8-bit grayscale) here")
    p.add_argument("--input-size", type=positive_int, default=64, metavar="PX",
                   help="side of the model input in pixels (default 64, the reference model)")
    p.add_argument("--frame", type=int, metavar="N",
                   help="frame of a multi-frame DICOM to read, from 0 (default: the middle one)")
    p.add_argument("--show-phi", action="store_true",
                   help="also show patient-identifying DICOM attributes (off by default)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Inspect every file; one bad file never stops the others."""
    from lungvit.core.errors import ScanReadError
    from lungvit.core.io.ingest import load_scan

    if args.show_phi:
        print("lungvit inspect: --show-phi: the output below contains patient-identifying "
              "data", file=sys.stderr)
    if args.save is not None:
        args.save.mkdir(parents=True, exist_ok=True)
    reports: list[dict[str, Any]] = []
    used_stems: set[str] = set()
    failed = 0
    for path in args.files:
        report: dict[str, Any] = {"file": str(path)}
        try:
            scan = load_scan(path, frame=args.frame, include_phi=args.show_phi)
        except ScanReadError as exc:
            failed += 1
            report.update(ok=False, error_type=type(exc).__name__, error=str(exc))
            reports.append(report)
            if not args.json:
                print(f"{path}: ERROR ({type(exc).__name__}) {exc}", file=sys.stderr)
            continue
        report.update(ok=True, **_model_view(scan.pixels, args.input_size))
        if args.save is not None:
            stem = _unique_stem(path, used_stems)
            report["saved"] = [str(p) for p in _save(scan.pixels, args.save, stem,
                                                     args.input_size)]
        report["metadata"] = scan.meta.to_dict()
        reports.append(report)
        if not args.json:
            print(_as_text(report))
    if args.json:
        print(json.dumps(reports, indent=2, default=str))
    return exit_codes.SOME_FAILED if failed else exit_codes.OK


def _model_view(pixels: Any, size: int) -> dict[str, Any]:
    """The model-resolution image's summary (what the network's input is made from)."""
    from lungvit.core.model.preprocess import resize_pixels

    small = resize_pixels(pixels, size)
    return {"model_input": {"size": size, "min": round(float(small.min()), 4),
                            "max": round(float(small.max()), 4),
                            "mean": round(float(small.mean()), 4)}}


def _unique_stem(path: Path, used: set[str]) -> str:
    """A file stem not yet used in this run (two inputs may share a name)."""
    base = path.name.split(".")[0] or "scan"
    stem, n = base, 1
    while stem in used:
        n += 1
        stem = f"{base}-{n}"
    used.add(stem)
    return stem


def _save(pixels: Any, out_dir: Path, stem: str, size: int) -> list[Path]:
    """Write the full-resolution and model-resolution images as 8-bit grayscale PNG."""
    import numpy as np
    from PIL import Image

    from lungvit.core.model.preprocess import resize_pixels

    small = resize_pixels(pixels, size).numpy()
    paths = []
    for suffix, image in ((".full.png", np.asarray(pixels)), (f".model{size}.png", small)):
        out = out_dir / f"{stem}{suffix}"
        Image.fromarray(np.rint(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8),
                        mode="L").save(out)
        paths.append(out)
    return paths


def _as_text(report: dict[str, Any]) -> str:
    """A readable block for one decoded file."""
    m = report["metadata"]
    rows, cols = m["original_shape"]
    kind = m["source_format"].upper()
    head = f"{report['file']}: OK {kind}"
    if m["modality"]:
        head += f" {m['modality']}"
    head += f", {cols}x{rows}, {m['photometric_interpretation']}"
    if m["inverted"]:
        head += " (inverted to display convention)"
    if m["bits_stored"]:
        head += f", {m['bits_stored']} bits stored"
    lines = [head]
    if m["transfer_syntax"]:
        lines.append(f"  transfer syntax: {m['transfer_syntax']}")
    if m["sop_class"]:
        lines.append(f"  object: {m['sop_class']}")
    lines.append(f"  rescale: {_describe(m['rescale'])}; window: {_describe(m['window'])}")
    lines.append(f"  frame used: {m['frame_used']} of {m['number_of_frames']}")
    details = []
    if m["pixel_spacing"]:
        details.append(f"pixel spacing {m['pixel_spacing'][0]:g} x {m['pixel_spacing'][1]:g} mm")
    if m["view_position"]:
        details.append(f"view {m['view_position']}")
    if m["body_part"]:
        details.append(f"body part {m['body_part']}")
    if m["color_saturation"] is not None:
        details.append(f"colour saturation {m['color_saturation']:.2f}")
    if m["patient_key"]:
        details.append(f"patient key {m['patient_key']}")
    if details:
        lines.append("  " + "; ".join(details))
    mi = report["model_input"]
    lines.append(f"  model input {mi['size']}x{mi['size']}: min {mi['min']}, max {mi['max']}, "
                 f"mean {mi['mean']}")
    for w in m["warnings"]:
        lines.append(f"  warning: {w}")
    if m["phi"]:
        lines.append("  identifying attributes (--show-phi):")
        lines.extend(f"    {k}: {v}" for k, v in m["phi"].items())
    if report.get("saved"):
        lines.append("  saved: " + ", ".join(report["saved"]))
    return "\n".join(lines)


def _describe(step: dict[str, Any] | None) -> str:
    """One transform step in words."""
    if not step:
        return "none"
    kind = step.get("kind")
    if kind == "linear":
        return f"slope {step['slope']:g}, intercept {step['intercept']:g}"
    if kind == "window":
        return (f"centre {step['center']:g}, width {step['width']:g} ({step['function']}, "
                f"from {step.get('source', 'file')})")
    if kind in ("percentile", "minmax", "full_range"):
        return f"{kind} {step['low']:g} to {step['high']:g}"
    return ", ".join(f"{k} {v}" for k, v in step.items())
