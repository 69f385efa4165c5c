"""``lungvit demo-data``: write a labelled folder of synthetic phantom scans."""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

from lungvit.cli.args import positive_int
from lungvit.cli import exit_codes



def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo-data`` sub-command."""
    from lungvit.synthetic.phantoms import CLASS_NAMES

    p = sub.add_parser(
        "demo-data",
        help="write a labelled folder of synthetic phantom scans (no patient data)",
        description="Write DIR/<class>/<class>-<patient>-<n>.<ext>: synthetic chest X-ray "
        "and retinal OCT phantoms of the nine classes, several images per synthetic patient, "
        "in the folder-of-class-folders layout that fine-tuning reads. PNGs (8- and 16-bit) "
        "by default; with --dicom, a mix of DICOM encodings (MONOCHROME1/2, 8/12/16-bit, "
        "rescale, window presets, LUTs, lossless JPEG/JPEG-LS/JPEG 2000/RLE, multi-frame), "
        "each carrying obviously fake 'SENTINEL' patient data. DIR/manifest.csv lists every "
        "file with its label and patient. The images are synthetic: for trying LungViT out "
        "and for tests, never for clinical use.")
    p.add_argument("directory", metavar="DIR", type=Path, help="output folder (created)")
    p.add_argument("--per-class", type=positive_int, default=20, metavar="N",
                   help="images per class (default 20)")
    p.add_argument("--dicom", action="store_true", help="write DICOM files instead of PNGs")
    p.add_argument("--size", type=_size, default=256, metavar="PX",
                   help="image side in pixels (default 256; at least 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--classes", nargs="+", choices=CLASS_NAMES, default=list(CLASS_NAMES),
                   metavar="CLASS", help="classes to write (default: all nine)")
    p.add_argument("--masks", type=Path, metavar="MASKDIR",
                   help="also write each lesion mask as MASKDIR/<class>/<same name>.png")
    p.add_argument("--overwrite", action="store_true",
                   help="write into DIR even if it is not empty")
    p.set_defaults(func=run)


def _size(text: str) -> int:
    value = int(text)
    if value < 32:  # JPEG 2000 and the lesions need room
        raise argparse.ArgumentTypeError(f"must be 32 or more, not {value}")
    return value


def _progress(done: int, total: int) -> None:
    """One self-updating line on a terminal; a line per tenth of the work otherwise."""
    message = f"lungvit demo-data: {done}/{total} images"
    if sys.stderr.isatty():
        print("\r" + message, end="\n" if done == total else "", file=sys.stderr, flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    """Generate and write the phantoms, then the manifest."""
    from lungvit.core.errors import LungViTError
    from lungvit.synthetic.phantom_files import DICOM_VARIANTS, write_mask, write_phantom
    from lungvit.synthetic.phantoms import make_dataset

    out: Path = args.directory
    if out.exists() and not out.is_dir():
        raise LungViTError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise LungViTError(f"{out} is not empty; choose an empty or new folder, or pass "
                           "--overwrite")
    classes = list(dict.fromkeys(args.classes))
    total = args.per_class * len(classes)
    rows: list[dict[str, str]] = []
    shots: dict[str, int] = {}  # images written per patient, for the file names
    for i, phantom in enumerate(make_dataset(args.per_class, size=args.size, seed=args.seed,
                                             classes=classes)):
        shots[phantom.patient_id] = shots.get(phantom.patient_id, 0) + 1
        stem = f"{phantom.label}-{phantom.patient_id}-{shots[phantom.patient_id]}"
        if args.dicom:
            fmt, variant = "dicom", DICOM_VARIANTS[i % len(DICOM_VARIANTS)]
            name = stem + ".dcm"
        else:
            fmt, variant = ("png8", "png16")[i % 2], None
            name = stem + ".png"
        relative = Path(phantom.label) / name
        write_phantom(phantom, out / relative, fmt=fmt, variant=variant)
        if args.masks is not None:
            write_mask(phantom, args.masks / phantom.label / f"{stem}.png")
        rows.append({"path": relative.as_posix(), "label": phantom.label,
                     "patient_id": phantom.patient_id, "modality": phantom.modality,
                     "format": variant or fmt, "seed": str(phantom.seed),
                     "lesion_pixels": str(int(phantom.mask.sum()))})
        _progress(i + 1, total)
    with open(out / "manifest.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {len(rows)} synthetic images of {len(classes)} classes to {out} "
          f"(list: {out / 'manifest.csv'})")
    return exit_codes.OK
