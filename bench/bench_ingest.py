"""Decode + preprocess throughput of LungViT's ingestion on ONE CPU core, beside a naive path.

    .venv/bin/python bench/bench_ingest.py [--repeats 15] [--out bench/out/ingest]

Cases: a 2048x2048 16-bit DICOM (uncompressed), the same image as JPEG 2000 lossless
DICOM, and a 1024x1024 8-bit PNG. For each, "lungvit" is ``load_scan`` (file to display
pixels: Modality LUT, window, inversion, [0, 1]) plus ``to_model_input`` at 64 and at 224;
"naive" is what common scripts do: ``dcmread(f).pixel_array.astype(float)``, min-max
normalised, 8-bit PIL bilinear resize (``Image.open(f).convert("L")`` for PNG), then the
same normalisation. The naive path is faster to write, not more correct: it applies no
window, no MONOCHROME1 inversion and quantises to 8 bits.

The process is pinned to one core (sched_setaffinity) with torch, BLAS and OpenMP at one
thread. The two paths alternate within each repeat so that load from other processes hits
both alike; medians are reported, with the ratio lungvit / naive.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lungvit.synthetic.dicom_write import write_dicom  # noqa: E402
from lungvit.core.io.ingest import load_scan  # noqa: E402
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input  # noqa: E402

SIZES = (64, 224)


def _xray_like(side: int, bits: int, seed: int = 0) -> np.ndarray:
    """A smooth chest-like field with quantum noise: compresses like a real radiograph."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[-1:1:side * 1j, -1:1:side * 1j]
    body = np.exp(-((x / 0.85) ** 2 + (y / 0.95) ** 2) ** 2)
    lungs = sum(np.exp(-(((x - cx) / 0.28) ** 2 + ((y + 0.05) / 0.5) ** 2) ** 2)
                for cx in (-0.38, 0.38))
    img = 0.15 + 0.7 * body - 0.35 * lungs + 0.02 * np.sin(40 * y)  # ribs, roughly
    top = (1 << bits) - 1
    img = img * 0.8 * top + rng.normal(0, 0.01 * top, img.shape)
    return np.clip(img, 0, top).astype(np.uint16 if bits > 8 else np.uint8)


def make_inputs(out: Path) -> dict[str, Path]:
    """Write the three benchmark files (reused when present)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {"DICOM 2048x2048 16-bit, uncompressed": out / "dx2048.dcm",
             "DICOM 2048x2048 16-bit, JPEG 2000 lossless": out / "dx2048_j2k.dcm",
             "PNG 1024x1024 8-bit": out / "cxr1024.png"}
    img = _xray_like(2048, 16)
    for path, syntax in ((files["DICOM 2048x2048 16-bit, uncompressed"], "ExplicitVRLittleEndian"),
                         (files["DICOM 2048x2048 16-bit, JPEG 2000 lossless"], "JPEG2000Lossless")):
        if not path.exists():
            write_dicom(path, img, bits_stored=16, transfer_syntax=syntax,
                        window_center=30000, window_width=50000, photometric="MONOCHROME2")
    png = files["PNG 1024x1024 8-bit"]
    if not png.exists():
        Image.fromarray(_xray_like(1024, 8, seed=1)).save(png)
    return files


def lungvit_path(path: Path, size: int) -> torch.Tensor:
    scan = load_scan(path)
    return to_model_input(scan.pixels, PreprocessConfig(input_size=size))


def naive_path(path: Path, size: int) -> torch.Tensor:
    if path.suffix == ".png":
        im = Image.open(path).convert("L")
    else:
        arr = pydicom.dcmread(path).pixel_array.astype(float)
        arr = (arr - arr.min()) / (arr.max() - arr.min())
        im = Image.fromarray((arr * 255).astype(np.uint8))
    small = np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
    return ((torch.from_numpy(small) - 0.5) / 0.5)[None]


def measure(fns: dict[str, Callable[[], object]], repeats: int,
            warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, calls interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(repeats):
        order = list(fns) if i % 2 == 0 else list(reversed(fns))
        for k in order:
            t0 = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path("bench/out/ingest"))
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    torch.set_num_threads(1)
    files = make_inputs(args.out)
    print(f"# {platform.processor() or platform.machine()}, python {platform.python_version()}, "
          f"torch {torch.__version__}, pydicom {pydicom.__version__}, one core, "
          f"median of {args.repeats}; load average {os.getloadavg()[0]:.1f}")
    print("| input | model size | lungvit (img/s) | naive (img/s) | lungvit / naive |")
    print("|---|---|---|---|---|")
    for label, path in files.items():
        for size in SIZES:
            med = measure({"lungvit": lambda p=path, s=size: lungvit_path(p, s),
                           "naive": lambda p=path, s=size: naive_path(p, s)}, args.repeats)
            ours, naive = 1.0 / med["lungvit"], 1.0 / med["naive"]
            print(f"| {label} | {size} | {ours:.1f} | {naive:.1f} | {ours / naive:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
