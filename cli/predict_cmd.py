"""``lungvit predict``: classify scans, one line (or JSON record / CSV row) per file."""
from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

from lungvit.cli import exit_codes

CSV_FIELDS = ("file", "status", "label", "confidence", "uncertain", "out_of_distribution",
              "reasons", "top_k", "error")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify scans (DICOM/PNG/JPEG) with calibrated probabilities",
        description="Classify each FILE. A file that cannot be read is reported on its own "
        "line and the others go on; the exit code is 1 if any file failed.")
    p.add_argument("files", nargs="+", metavar="FILE", help="scans to classify")
    p.add_argument("--model", metavar="MODEL",
                   help="checkpoint (.safetensors, or a reference-design .pth); "
                   "default: the bundled real-data model")
    p.add_argument("--json", action="store_true", help="print one JSON list of records")
    p.add_argument("--csv", metavar="OUT", help="also write a CSV table to OUT")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes to list (3)")
    p.add_argument("--batch-size", type=int, default=32, metavar="N", help="scans per batch")
    p.set_defaults(func=run)


def _record(path: str, result: Any) -> dict[str, Any]:
    from lungvit.core.errors import ScanReadError

    name = Path(path).name
    if isinstance(result, ScanReadError):
        return {"file": name, "status": "error", "error": str(result)}
    return {"file": name, "status": "ok", **result.to_dict()}


def _line(rec: dict[str, Any]) -> str:
    if rec["status"] == "error":
        return f"{rec['file']}: ERROR {rec['error']}"
    flags = []
    if rec["uncertain"]:
        flags.append("UNCERTAIN: " + "; ".join(rec["uncertain_reasons"]))
    if rec["out_of_distribution"]:
        flags.append("OUT OF SCOPE: " + "; ".join(rec["ood_reasons"]))
    top = ", ".join(f"{k} {v:.1%}" for k, v in rec["top_k"])
    return f"{rec['file']}: {rec['label']} ({rec['confidence']:.1%})  [{top}]" + \
        "".join(f"\n    {f}" for f in flags)


def _csv_row(rec: dict[str, Any]) -> dict[str, Any]:
    if rec["status"] == "error":
        return {"file": rec["file"], "status": "error", "error": rec["error"]}
    return {"file": rec["file"], "status": "ok", "label": rec["label"],
            "confidence": f"{rec['confidence']:.6f}", "uncertain": rec["uncertain"],
            "out_of_distribution": rec["out_of_distribution"],
            "reasons": "; ".join(rec["uncertain_reasons"] + rec["ood_reasons"]),
            "top_k": "; ".join(f"{k}={v:.4f}" for k, v in rec["top_k"])}


def run(args: argparse.Namespace) -> int:
    from lungvit.core.predict import Predictor

    predictor = Predictor.from_checkpoint(args.model, top_k=args.top_k,
                                          batch_size=args.batch_size)
    records = []
    for path, result in zip(args.files, predictor.predict_files(args.files)):
        rec = _record(path, result)
        records.append(rec)
        if not args.json:
            print(_line(rec), flush=True)
    if args.json:
        json.dump(records, sys.stdout, indent=2)
        print()
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(_csv_row(r) for r in records)
    failed = any(r["status"] == "error" for r in records)
    return exit_codes.SOME_FAILED if failed else exit_codes.OK
