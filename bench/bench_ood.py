"""Does a model flag scans it was not made for, and leave the ones it was made for alone?

Probe images come only from what is installed beside LungViT (no downloads): pydicom's test
DICOMs (CT, MR, ultrasound, nuclear medicine, secondary-capture test patterns), matplotlib's
sample data (an MR head slice, a portrait photo, elevation maps, a clip-art image) and the
photos gradio ships. Anything that could be a chest radiograph or an OCT (DICOM modality
CR/DX/RG/DR/OPT/OCT/OP), a label map or dose grid (SEG, RTDOSE, RTSTRUCT), or smaller than
32 px is left out, and duplicates (one image in several encodings) are kept once. Each probe
is decoded (DICOMs through :func:`lungvit.core.io.ingest.load_scan`, so with their windows) and
written as an 8-bit grayscale PNG with no header: nothing says "CT" or "photo" any more, and
the colour rule cannot fire. The model then reads those PNGs as the app would.

Reported, for the probes and for the in-scope test scans of the model's own run (``--data``
and ``--split-manifest``): the share flagged by the learned feature detector, by the older
rules and energy threshold alone, and by either (what the app shows). Targets: >= 90% of
probes flagged, <= 10% of in-scope held-out scans. Example::

    python bench/bench_ood.py --model /tmp/m.safetensors --data ../shared/realdata \\
        --split-manifest /tmp/run/split.csv --out bench/RESULTS-ood.md
"""
from __future__ import annotations

import argparse
import gzip
import os
import platform
import sys
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lungvit.core.errors import CheckpointError, ScanReadError
from lungvit.core.io.ingest import load_scan
from lungvit.core.predict import Predictor
from lungvit.core.io.scan import Scan

MIN_SIDE = 32
# Two probes whose 32 x 32 thumbnails correlate above this are one picture twice.
DUPLICATE_CORRELATION = 0.95
# Could be a chest radiograph or an OCT: never a probe.
IN_SCOPE_MODALITIES = {"CR", "DX", "RG", "DR", "OPT", "OCT", "OP"}
# Not pictures of anatomy (label maps, dose grids, structure sets).
NOT_IMAGES = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "PR", "KO", "SR"}
_DICOM_KIND = {"CT": "CT", "MR": "MR", "US": "ultrasound", "NM": "nuclear medicine",
               "PT": "PET", "XA": "angiography", "MG": "mammography"}


@dataclass
class Probe:
    """One out-of-scope image, exported as a header-less grayscale PNG."""

    name: str
    kind: str
    origin: str
    path: Path


# ------------------------------------------------------------------------------ probes
def _pydicom_images() -> Iterator[tuple[str, str, str, np.ndarray]]:
    import pydicom
    import pydicom.data
    from pydicom.errors import InvalidDicomError

    for f in sorted(pydicom.data.get_testdata_files()):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's test files are odd on purpose
                ds = pydicom.dcmread(f, stop_before_pixels=True, force=True)
        except (InvalidDicomError, OSError, ValueError, TypeError, KeyError, AttributeError):
            continue  # not every file among pydicom's test data is a readable DICOM
        modality = str(getattr(ds, "Modality", "") or "").upper()
        if "Rows" not in ds or modality in IN_SCOPE_MODALITIES | NOT_IMAGES:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                scan = load_scan(f)
        except ScanReadError:
            continue
        kind = _DICOM_KIND.get(modality, "test pattern / other")
        yield Path(f).name, kind, f"pydicom {Path(f).relative_to(Path(pydicom.__file__).parent)}", \
            scan.pixels


def _rescale(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64))
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-9), 0, 1)


def _matplotlib_images() -> Iterator[tuple[str, str, str, np.ndarray]]:
    import matplotlib

    root = Path(matplotlib.get_data_path()) / "sample_data"
    where = "matplotlib sample_data/"
    mr = root / "s1045.ima.gz"
    if mr.is_file():  # 256 x 256 16-bit MR head slice, as matplotlib's image demo reads it
        with gzip.open(mr) as fh:
            yield mr.name, "MR", where + mr.name, _rescale(
                np.frombuffer(fh.read(), np.uint16).reshape(256, 256))
    for name, key, kind in (("topobathy.npz", "topo", "map / chart"),
                            ("jacksboro_fault_dem.npz", "elevation", "map / chart")):
        if (root / name).is_file():
            with np.load(root / name) as z:
                if key in z:
                    yield name, kind, where + name, _rescale(z[key])
    for name, kind in (("grace_hopper.jpg", "face photo"),
                       ("Minduka_Present_Blue_Pack.png", "drawing / logo"),
                       ("logo2.png", "drawing / logo")):
        if (root / name).is_file():
            yield name, kind, where + name, load_scan(root / name).pixels


def _gradio_images() -> Iterator[tuple[str, str, str, np.ndarray]]:
    try:
        import gradio
    except ImportError:
        return
    root = Path(gradio.__file__).parent / "media_assets" / "images"
    for name in ("cheetah.jpg", "cheetah1.jpg", "lion.jpg", "groot.jpeg", "tower.jpg"):
        if (root / name).is_file():
            yield name, "photo", f"gradio media_assets/images/{name}", load_scan(root / name).pixels


def collect_probes(out_dir: Path) -> list[Probe]:
    """Export every probe image as an 8-bit grayscale PNG in ``out_dir``, duplicates once."""
    out_dir.mkdir(parents=True, exist_ok=True)
    probes: list[Probe] = []
    thumbs: list[np.ndarray] = []
    for source in (_pydicom_images, _matplotlib_images, _gradio_images):
        for name, kind, origin, pixels in source():
            if min(pixels.shape) < MIN_SIDE:
                continue
            gray = (np.clip(pixels, 0, 1) * 255).round().astype(np.uint8)
            thumb = np.asarray(Image.fromarray(gray).resize((32, 32), Image.BILINEAR), float)
            thumb = (thumb - thumb.mean()).ravel() / (thumb.std() * 32 + 1e-9)
            if any(float(thumb @ t) > DUPLICATE_CORRELATION for t in thumbs):
                continue  # the same picture in another transfer syntax, lossy or not
            thumbs.append(thumb)
            path = out_dir / f"{len(probes):03d}_{Path(name).stem}.png"
            Image.fromarray(gray, mode="L").save(path)
            probes.append(Probe(name, kind, origin, path))
    return probes


# ---------------------------------------------------------------------------- scoring
def flag_rates(predictor: Predictor, paths: list[Path]) -> dict[str, list[bool]]:
    """Per file: flagged by the learned detector, by the rules/energy alone, by either."""
    out: dict[str, list[bool]] = {"learned": [], "rules": [], "either": [], "distance": []}
    for start in range(0, len(paths), 64):
        scans: list[Scan] = [load_scan(p) for p in paths[start:start + 64]]
        for scan, pred in zip(scans, predictor.predict_scans(scans)):
            learned = (pred.feature_distance is not None
                       and pred.feature_distance > pred.feature_threshold)
            rules = bool(predictor.ood_reasons(scan, pred.energy))
            out["learned"].append(learned)
            out["rules"].append(rules)
            out["either"].append(pred.out_of_distribution)
            out["distance"].append(pred.feature_distance)
    return out


def _pct(flags: list[bool]) -> str:
    return f"{sum(flags) / len(flags):.0%} ({sum(flags)}/{len(flags)})" if flags else "-"


def report(model: str, probes: list[Probe], probe_flags: dict[str, list],
           held_out: dict[str, list] | None, argv: list[str], predictor: Predictor) -> str:
    """The Markdown report."""
    det = predictor.detector
    lines = ["# Out-of-scope detection: probe images of other kinds vs in-scope test scans", "",
             f"Command: `python bench/bench_ood.py {' '.join(argv)}`  ",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPU "
             f"cores ({platform.machine()}); torch {torch.__version__}  ",
             f"Model: `{model}` ({predictor.info.variant}, "
             f"{len(predictor.labels)} classes); learned detector: "
             + (f"Mahalanobis on the [CLS] feature, threshold {det.threshold:.2f} = "
                f"{det.quantile:.0%} quantile of {det.n_val} validation scans"
                if det else "none in this checkpoint"), "",
             "| images | n | learned detector | rules + energy | either (shown) |",
             "|---|---|---|---|---|"]
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, p in enumerate(probes):
        by_kind[p.kind].append(i)
    for kind, idx in sorted(by_kind.items()):
        cells = [_pct([probe_flags[k][i] for i in idx]) for k in ("learned", "rules", "either")]
        lines.append(f"| probes: {kind} | {len(idx)} | " + " | ".join(cells) + " |")
    cells = [_pct(probe_flags[k]) for k in ("learned", "rules", "either")]
    lines.append(f"| **all probes (target >= 90%)** | {len(probes)} | " + " | ".join(cells) + " |")
    if held_out is not None:
        cells = [_pct(held_out[k]) for k in ("learned", "rules", "either")]
        lines.append(f"| **in-scope test split (target <= 10%)** | {len(held_out['learned'])} | "
                     + " | ".join(cells) + " |")
    lines += ["", "Probes (feature distance; flagged by learned / rules):", "",
              "| probe | kind | from | distance | learned | rules |", "|---|---|---|---|---|---|"]
    for i, p in enumerate(probes):
        d = probe_flags["distance"][i]
        lines.append(f"| {p.path.name} | {p.kind} | {p.origin} | "
                     f"{'-' if d is None else f'{d:.1f}'} | "
                     f"{'yes' if probe_flags['learned'][i] else 'no'} | "
                     f"{'yes' if probe_flags['rules'][i] else 'no'} |")
    if held_out is not None and det is not None:
        d = np.array(held_out["distance"], dtype=float)
        lines += ["", f"In-scope test distances: median {np.median(d):.2f}, 95th percentile "
                  f"{np.percentile(d, 95):.2f}, max {d.max():.2f}."]
    return "\n".join(lines) + "\n"


def _test_paths(data: str, manifest: str) -> list[Path]:
    from lungvit.training.data.splits import load_split_manifest

    rows = load_split_manifest(manifest)["test"]
    return [Path(data) / r for r in rows]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint (default: the bundled model)")
    ap.add_argument("--data", help="the model's training folder (with --split-manifest)")
    ap.add_argument("--split-manifest", help="the run's split.csv; its test rows are scored")
    ap.add_argument("--keep-probes", metavar="DIR", help="keep the exported probe PNGs here")
    ap.add_argument("--out", help="also write the Markdown report to this file")
    args = ap.parse_args(argv)
    if bool(args.data) != bool(args.split_manifest):
        ap.error("--data and --split-manifest go together")
    try:
        predictor = Predictor.from_checkpoint(args.model, device="cpu")
    except CheckpointError as exc:
        print(f"bench_ood: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        probes = collect_probes(Path(args.keep_probes or tmp))
        probe_flags = flag_rates(predictor, [p.path for p in probes])
    held_out = None
    if args.data:
        held_out = flag_rates(predictor, _test_paths(args.data, args.split_manifest))
    text = report(args.model or "bundled model", probes, probe_flags, held_out, argv, predictor)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
