"""Training throughput of LungViT from PNG files on disk, beside the reference design's step.

Sections (``--sections``, default all):

- ``throughput``: ``lungvit_ref64`` (fused SDPA) trained end to end from PNG files (written
  once from :mod:`lungvit.synthetic.phantoms`, decoded by a DataLoader with workers, pinned memory,
  prefetching and the training augmentation), beside the reference design
  (:class:`~lungvit.synthetic.reference_model.ReferenceViT`, explicit attention, same batch and
  precision, data already on the device); "vs reference" is the ratio of images/s.
  "loader wait" is the share of wall time spent in ``next(loader)``; GPU utilisation is
  sampled in a thread; "loader alone" is the pipeline's own rate (its ceiling).
- ``flops``: the default variant (``DEFAULT_VARIANT``, read at run time) at its input size:
  FLOPs of one training step (``FlopCounterMode``, forward + backward) times steps/s, as a
  share of the device's measured matmul peak (bf16 on GPU, fp32 on CPU).
- ``memory``: the reference design vs LungViT at larger inputs: peak memory or "OOM".
- ``lightning``: the real Lightning path (``lungvit.training.learn.module``) from the same files.

The timed step is plain PyTorch (AdamW with decay on matrices only, as the Lightning module;
gradient clipping at 1.0; bf16 autocast on GPU, fp32 on CPU). Warm-up steps are excluded;
images/s is the median of the timed windows. It imports only torch, timm, numpy, pillow and
LungViT modules that need no pydicom/safetensors/captum (lightning only for its section),
and runs from an uninstalled checkout by mapping ``lungvit`` onto the repository.

Sections run in that order; each failure is written into the report (exit code 1) and the
others still run; ``--results`` is rewritten after every section.

GPU (one H100; about 5 minutes with ``--compile``, under 3 without; from the repository
root, installed or not)::

    python bench/bench_train.py --device cuda --compile --results bench/RESULTS-train.md

CPU, to prove it works (few steps; not comparable with GPU figures)::

    .venv/bin/python bench/bench_train.py --device cpu --quick --sections throughput
    .venv/bin/python bench/bench_train.py --device cpu --quick --depth 1 --size 32
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from itertools import repeat
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

try:
    import lungvit.core  # noqa: F401
except ModuleNotFoundError:  # an uninstalled checkout: lungvit.X is the repository's X/
    _pkg = types.ModuleType("lungvit")
    _pkg.__path__ = [str(Path(__file__).resolve().parents[1])]
    sys.modules["lungvit"] = _pkg

from lungvit.core.model import network as lungvit_model  # noqa: E402
from lungvit.core.model.network import VARIANTS, create_model, set_fused_attention  # noqa: E402
from lungvit.synthetic.phantoms import CLASS_NAMES, make_phantom  # noqa: E402
from lungvit.core.model.preprocess import PreprocessConfig, normalize  # noqa: E402
from lungvit.synthetic.reference_model import ReferenceViT  # noqa: E402
from lungvit.training.data.augment import AugmentConfig, augment_batch  # noqa: E402
from lungvit.training.learn.optim import parameter_groups  # noqa: E402

SECTIONS = ("throughput", "flops", "memory", "lightning")
H100_GIB = 81559 / 1024  # an "80 GB" H100's memory as nvidia-smi reports it
Batch = tuple[torch.Tensor, torch.Tensor]
Files = list[tuple[str, int]]
Step = Callable[[torch.Tensor, torch.Tensor], None]


# ---------------------------------------------------------------- data from files on disk

def _write_png(job: tuple[str, int, int]) -> tuple[str, int]:
    root, i, size = job
    ph = make_phantom(i % len(CLASS_NAMES), size=size, seed=i)
    path = Path(root) / f"{ph.label}-{i:06d}.png"
    Image.fromarray(np.round(ph.image * 255).astype(np.uint8)).save(path)
    return str(path), ph.label_index


def write_pngs(root: Path, n: int, size: int) -> Files:
    """Write ``n`` 8-bit phantom PNGs of ``size`` px under ``root``; returns (path, label)."""
    root.mkdir(parents=True, exist_ok=True)
    with Pool(max(1, (os.cpu_count() or 2) - 1)) as pool:
        return pool.map(_write_png, [(str(root), i, size) for i in range(n)], chunksize=16)


class PngScans(Dataset):
    """One PNG decoded by Pillow per item: ((S, S) uint8 tensor, label)."""

    def __init__(self, files: Files) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.files[i]
        with Image.open(path) as im:
            return torch.from_numpy(np.array(im.convert("L"))), label


@dataclass(frozen=True)
class Collate:
    """uint8 batch -> [0, 1] -> augmentation (whole batch, as training does) -> normalised."""

    preprocess: PreprocessConfig
    augment: AugmentConfig | None

    def __call__(self, items: list[tuple[torch.Tensor, int]]) -> Batch:
        x = torch.stack([p for p, _ in items])[:, None].float() / 255.0  # (B, 1, S, S)
        if self.augment is not None:
            x = augment_batch(x, self.augment)
        x = normalize(x, self.preprocess)
        return x, torch.tensor([y for _, y in items], dtype=torch.int64)


def make_loader(files: Files, *, batch: int, steps: int, workers: int, pin: bool,
                augment: bool, prefetch: int = 4) -> DataLoader:
    """A loader of ``steps`` shuffled batches in one pass (no epoch-boundary stalls)."""
    ds = PngScans(files)
    return DataLoader(ds, batch_size=batch, drop_last=True, num_workers=workers,
                      sampler=RandomSampler(ds, replacement=True, num_samples=batch * steps),
                      collate_fn=Collate(PreprocessConfig(), AugmentConfig() if augment else None),
                      pin_memory=pin, prefetch_factor=prefetch if workers else None)


def to_device(loader: DataLoader, device: str) -> Iterator[Batch]:
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def on_device_batch(size: int, batch: int, device: str) -> Iterator[Batch]:
    """The same random batch forever, already on the device."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=gen).to(device)
    y = torch.randint(0, len(CLASS_NAMES), (batch,), generator=gen).to(device)
    return repeat((x, y))


# ---------------------------------------------------------------- the step and its timing

def _autocast(device: str) -> Any:
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else nullcontext()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def make_step(model: nn.Module, device: str, *, compile_model: bool = False,
              fused_optim: bool = False) -> Step:
    """One AdamW step (LungViTModule's parameter groups) with clipping at 1.0."""
    model.to(device).train()
    opt = torch.optim.AdamW(parameter_groups(model, 0.05), lr=1e-3, fused=fused_optim or None)
    forward = torch.compile(model) if compile_model else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with _autocast(device):
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def gpu_util_reader(device: str) -> Callable[[], float] | None:
    """GPU utilisation in %: torch.cuda.utilization (pynvml), else nvidia-smi, else None."""
    if device != "cuda":
        return None
    try:
        torch.cuda.utilization()
        return lambda: float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - no pynvml, or one of pynvml's own NVMLError classes
        pass
    cmd = ["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
           f"--id={torch.cuda.current_device()}"]

    def read() -> float:
        return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)

    try:
        read()
    except (OSError, ValueError, subprocess.CalledProcessError):
        return None
    return read


@dataclass
class Timing:
    """Images/s per timed window, loader-wait share, GPU utilisation samples, peak memory."""

    rates: list[float]
    wait_frac: float
    util: list[float] = field(default_factory=list)
    peak_gib: float | None = None

    @property
    def images_per_s(self) -> float:
        return statistics.median(self.rates)


def time_steps(step: Step, batches: Iterator[Batch], *, device: str, batch: int, warmup: int,
               windows: int, per_window: int, util: Callable[[], float] | None = None
               ) -> Timing:
    """``warmup`` untimed steps, then ``windows`` timed windows of ``per_window`` steps.

    Returns:
        Images/s of each window, the share of timed wall time spent in ``next(batches)``,
        utilisation samples (every 0.2 s while timing, if ``util``) and peak device memory.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step(*next(batches))
    _sync(device)
    rates, samples, wait, total = [], [], 0.0, 0.0
    stop = threading.Event()

    def sample() -> None:
        while util is not None and not stop.wait(0.2):
            samples.append(util())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for _ in range(windows):
        start = time.perf_counter()
        for _ in range(per_window):
            t = time.perf_counter()
            x, y = next(batches)
            wait += time.perf_counter() - t
            step(x, y)
        _sync(device)
        total += (elapsed := time.perf_counter() - start)
        rates.append(batch * per_window / elapsed)
    stop.set()
    sampler.join()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    return Timing(rates, wait / total, samples, peak)


def loader_rate(batches: Iterator[Batch], device: str) -> float:
    """Images/s of a loader alone, counted from its first batch (worker start-up excluded)."""
    next(batches)
    start, n = time.perf_counter(), 0
    for x, _ in batches:
        n += len(x)
    _sync(device)
    return n / (time.perf_counter() - start)


# ---------------------------------------------------------------- sections

@dataclass
class Report:
    """The Markdown report, printed section by section as it grows."""

    lines: list[str] = field(default_factory=list)

    def table(self, title: str, header: list[str], rows: list[list[str]], note: str = "") -> None:
        section = [f"## {title}", ""] + ([note, ""] if note else [])
        section += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        section += ["| " + " | ".join(r) + " |" for r in rows] + [""]
        self.lines += section
        print("\n".join(section), flush=True)


def _rate(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def _fmt(t: Timing, ref: float | None = None) -> list[str]:
    """images/s, ratio to ``ref``, peak GiB, loader wait, median GPU utilisation."""
    return [_rate(t.images_per_s), f"{t.images_per_s / ref:.2f}x" if ref else "1.00x",
            f"{t.peak_gib:.1f}" if t.peak_gib is not None else "n/a",
            f"{100 * t.wait_frac:.1f}%", f"{statistics.median(t.util):.0f}%" if t.util else "n/a"]


def _over(args: argparse.Namespace) -> dict[str, int]:
    return {"depth": args.depth} if args.depth else {}


def _timing(args: argparse.Namespace, batch: int) -> dict[str, Any]:
    return dict(device=args.device, batch=batch, warmup=args.warmup, windows=args.windows,
                per_window=args.steps, util=gpu_util_reader(args.device))


def _png_loader(args: argparse.Namespace, files: Files, batch: int) -> DataLoader:
    return make_loader(files, batch=batch, steps=args.warmup + args.windows * args.steps,
                       workers=args.workers, pin=args.device == "cuda",
                       augment=not args.no_augment)


def lungvit_timings(args: argparse.Namespace, name: str, files: Files, size: int,
                    batch: int) -> list[tuple[str, str, Timing]]:
    """(compiled, data, timing) of a variant with fused SDPA, on device and from files."""
    out = []
    for compiled in (False, True) if args.compile else (False,):
        model = create_model(name, img_size=size, **_over(args))
        with set_fused_attention(model, True):
            step = make_step(model, args.device, compile_model=compiled,
                             fused_optim=args.fused_optim)
            tag = "yes" if compiled else "no"
            out.append((tag, "on device", time_steps(
                step, on_device_batch(size, batch, args.device), **_timing(args, batch))))
            out.append((tag, "PNG files, end to end", time_steps(
                step, to_device(_png_loader(args, files, batch), args.device),
                **_timing(args, batch))))
    return out


def run_throughput(args: argparse.Namespace, files: Files, rep: Report) -> None:
    dev, b, s = args.device, args.batch, args.size
    ref = time_steps(make_step(ReferenceViT(image_size=s, **_over(args)), dev),
                     on_device_batch(s, b, dev), **_timing(args, b))
    rows = [["reference (explicit attention)", "on device", "no", *_fmt(ref)],
            ["loader alone (decode, augment, copy)", "PNG files", "-",
             _rate(loader_rate(to_device(_png_loader(args, files, b), dev), dev)),
             *["-"] * 4]]
    rows += [["lungvit_ref64 (fused SDPA)", data, tag, *_fmt(t, ref.images_per_s)]
             for tag, data, t in lungvit_timings(args, "lungvit_ref64", files, s, b)]
    rep.table(f"Training throughput at {s}x{s}, batch {b}",
              ["model", "data", "compiled", "images/s", "vs reference", "peak GiB",
               "loader wait", "GPU util"], rows,
              f"{len(files)} PNG files, {args.workers} loader workers, pinned memory on GPU, "
              f"prefetch 4, augmentation {'off' if args.no_augment else 'on'}; median of "
              f"{args.windows} windows of {args.steps} steps after {args.warmup} warm-up steps.")


def matmul_peak_flops(device: str, n: int, iters: int) -> float:
    """Median FLOP/s of n x n x n matmuls (bf16 on GPU, fp32 on CPU) over 5 timed windows."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    a, c = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    rates = []
    for window in range(6):  # window 0 is warm-up
        _sync(device)
        start = time.perf_counter()
        for _ in range(iters):
            a @ c
        _sync(device)
        rates += [2 * n**3 * iters / (time.perf_counter() - start)] if window else []
    return statistics.median(rates)


def step_flops(model: nn.Module, size: int, batch: int, device: str) -> int:
    """FLOPs (matmuls, convolutions, attention) of one forward + backward pass at ``batch``.

    Counted with explicit attention: FlopCounterMode has no formula for the CPU's fused SDPA
    kernel, and the explicit q k^T and attn v matmuls are the same FLOPs on every device.
    """
    model.to(device).train()
    x, y = next(on_device_batch(size, batch, device))
    with set_fused_attention(model, False), FlopCounterMode(display=False) as counter:
        with _autocast(device):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run_flops(args: argparse.Namespace, files: Files, rep: Report) -> None:
    dev, b = args.device, args.flops_batch
    name = args.flops_variant or lungvit_model.DEFAULT_VARIANT  # read at run time
    size = VARIANTS[name].img_size
    peak = matmul_peak_flops(dev, 8192 if dev == "cuda" else 512, 20 if dev == "cuda" else 5)
    per_image = step_flops(create_model(name, **_over(args)), size, 2, dev) / 2  # linear in B
    rows = []
    for tag, data, t in lungvit_timings(args, name, files, size, b):
        achieved = per_image * t.images_per_s
        rows.append([name, data, tag, _rate(t.images_per_s), f"{achieved / 1e12:.3g}",
                     f"{100 * achieved / peak:.1f}%", *_fmt(t)[3:]])
    kind = "bf16" if dev == "cuda" else "fp32"
    rep.table(f"Achieved FLOP/s: {name} at {size}x{size}, batch {b}",
              ["model", "data", "compiled", "images/s", "TFLOP/s", f"share of {kind} peak",
               "loader wait", "GPU util"], rows,
              f"One training step: {per_image / 1e9:.2f} GFLOP per image (FlopCounterMode: "
              f"matmuls, convolutions, attention, forward + backward). Measured {kind} "
              f"matmul peak: {peak / 1e12:.3g} TFLOP/s.")


def memory_case(build: Callable[[], nn.Module], size: int, batch: int, device: str,
                steps: int = 2) -> list[str]:
    """[images/s, peak GiB] of a few training steps, or ["OOM", "OOM"]; memory freed after."""
    try:
        model = build()
        with set_fused_attention(model, True):  # no-op for the reference (not timm Attention)
            t = time_steps(make_step(model, device), on_device_batch(size, batch, device),
                           device=device, batch=batch, warmup=2, windows=1, per_window=steps)
        result = [_rate(t.images_per_s), f"{t.peak_gib:.1f}" if t.peak_gib else "n/a"]
    except torch.cuda.OutOfMemoryError:
        result = ["OOM", "OOM"]
    gc.collect()  # the model, its optimizer state and any half-built graph
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_memory(args: argparse.Namespace, rep: Report) -> None:
    rows = []
    for case in args.memory_cases.split(","):
        size, batch = (int(v) for v in case.split(":"))
        native = [n for n, c in VARIANTS.items() if c.img_size == size] or \
            [lungvit_model.DEFAULT_VARIANT]
        builds: list[tuple[str, Callable[[], nn.Module]]] = [
            ("reference (explicit attention)", lambda: ReferenceViT(image_size=size,
                                                                    **_over(args)))]
        builds += [(f"{n} shapes (fused SDPA)",
                    lambda n=n: create_model(n, img_size=size, **_over(args)))
                   for n in ["lungvit_ref64", *native]]
        rows += [[f"{size}x{size}", str(batch), label,
                  *memory_case(build, size, batch, args.device, max(2, args.steps // 2))]
                 for label, build in builds]
    cap = f"capped at {args.memory_cap_gib:.1f} GiB" if args.device == "cuda" else "CPU: n/a"
    rep.table("Memory at larger inputs", ["input", "batch", "model", "images/s", "peak GiB"],
              rows, f"Device memory {cap}; OOM: torch.cuda.OutOfMemoryError in the step.")


def run_lightning(args: argparse.Namespace, files: Files, rep: Report) -> None:
    try:
        import lightning as L
        from lungvit.training.learn.module import LungViTModule
    except ImportError as exc:
        rep.lines += ["## Lightning path", "", f"Skipped: {exc}.", ""]
        return
    dev, b, s = args.device, args.batch, args.size
    steps, marks = args.warmup + args.windows * args.steps, []

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer: Any, *_: Any) -> None:
            if trainer.global_step == args.warmup:
                _sync(dev)
                marks.append(time.perf_counter())

        def on_train_end(self, *_: Any) -> None:
            _sync(dev)
            marks.append(time.perf_counter())

    model = create_model("lungvit_ref64", img_size=s, **_over(args))
    with set_fused_attention(model, True):
        trainer = L.Trainer(
            accelerator="gpu" if dev == "cuda" else "cpu", devices=1, max_steps=steps,
            precision="bf16-mixed" if dev == "cuda" else "32-true", gradient_clip_val=1.0,
            logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            use_distributed_sampler=False, callbacks=[Clock()])
        trainer.fit(LungViTModule(model, labels=CLASS_NAMES, warmup_steps=1),
                    _png_loader(args, files, b))
    rate = b * (steps - args.warmup) / (marks[-1] - marks[0])
    rep.table(f"Lightning path at {s}x{s}, batch {b}", ["model", "data", "images/s"],
              [["LungViTModule(lungvit_ref64), Trainer", "PNG files, end to end",
                _rate(rate)]], "One timed span after the warm-up steps (logging included).")


# ---------------------------------------------------------------- main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--sections", default=",".join(SECTIONS), help="comma-separated subset of all four")
    add("--quick", action="store_true", help="small batches, few steps (CPU smoke)")
    add("--size", type=int, default=64, help="input side of the throughput rows (64)")
    add("--batch", type=int, help="throughput batch (256; quick 8)")
    add("--flops-batch", type=int, help="batch of the FLOP/s rows (512; quick 2)")
    add("--flops-variant", choices=sorted(VARIANTS),
        help="variant of the FLOP/s rows (default: the default variant)")
    add("--depth", type=int, help="override every model's depth (smoke tests only)")
    add("--files", type=int, help="PNG files written (4096; quick 48)")
    add("--workers", type=int, help="loader workers (CPUs - 2, at most 12; quick 1)")
    add("--warmup", type=int, help="untimed steps (10; quick 1)")
    add("--windows", type=int, help="timed windows (5; quick 3)")
    add("--steps", type=int, help="steps per window (20; quick 2)")
    add("--compile", action="store_true", help="also time torch.compile'd LungViT rows")
    add("--fused-optim", action="store_true", help="fused AdamW in the LungViT rows")
    add("--no-augment", action="store_true", help="skip the training augmentation")
    add("--memory-cases", help="SIZE:BATCH,... (128:128,224:32; quick 32:2)")
    add("--memory-cap-gib", type=float, default=H100_GIB,
        help="cap device memory (default: an 80 GB H100's, also on a bigger GPU)")
    add("--threads", type=int, help="CPU threads of this process (torch's default; quick 1)")
    add("--note", default="", help="free text for the report (e.g. 'shared CPU')")
    add("--results", type=Path, help="write the Markdown report here")
    args = p.parse_args(argv)
    q = args.quick
    defaults = {"batch": 8 if q else 256, "flops_batch": 2 if q else 512,
                "files": 48 if q else 4096, "warmup": 1 if q else 10, "windows": 3 if q else 5,
                "steps": 2 if q else 20, "threads": 1 if q else 0,
                "workers": 1 if q else max(1, min(12, (os.cpu_count() or 2) - 2)),
                "memory_cases": "32:2" if q else "128:128,224:32"}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if unknown := set(args.sections.split(",")) - set(SECTIONS):
        p.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sections = args.sections.split(",")
    if args.threads:  # on a shared CPU, more threads than free cores make every op spin
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.set_float32_matmul_precision("high")  # as lungvit.training.learn.fit does
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gib * 2**30 / total))
        dev = f"{torch.cuda.get_device_name()}, bf16 autocast"
    else:
        dev = (f"CPU ({platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} "
               f"threads, load {os.getloadavg()[0]:.1f}), fp32")
    rep = Report(["# Training throughput (bench/bench_train.py)", "",
                  f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {dev}",
                  f"- Python {platform.python_version()}, torch {torch.__version__}, "
                  f"timm {timm.__version__}, numpy {np.__version__}",
                  f"- Command: `python {shlex.join(sys.argv)}`",
                  "- Targets (issue 5, H100, bf16): lungvit_ref64 end to end >= 5x the reference "
                  "step; the default variant >= 40% of the measured bf16 peak; the reference OOM "
                  "at 128x128/128 and 224x224/32 where LungViT trains; GPU utilisation > 90%."]
                 + ([f"- Smoke shapes: every depth set to {args.depth}"] if args.depth else [])
                 + ([f"- Note: {args.note}"] if args.note else []) + [""])
    print("\n".join(rep.lines), flush=True)
    failed = []
    with tempfile.TemporaryDirectory(prefix="lungvit-bench-train-") as tmp:
        pngs: dict[int, Files] = {}

        def files(size: int) -> Files:  # written once per input size, on first use
            if size not in pngs:
                pngs[size] = write_pngs(Path(tmp) / str(size), args.files, size)
            return pngs[size]

        runners: dict[str, Callable[[], None]] = {
            "throughput": lambda: run_throughput(args, files(args.size), rep),
            "flops": lambda: run_flops(args, files(
                VARIANTS[args.flops_variant or lungvit_model.DEFAULT_VARIANT].img_size), rep),
            "memory": lambda: run_memory(args, rep),
            "lightning": lambda: run_lightning(args, files(args.size), rep)}
        for name in (n for n in SECTIONS if n in sections):
            try:
                runners[name]()
            except Exception:  # noqa: BLE001 - one failed section must not lose the others
                failed.append(name)
                trace = traceback.format_exc()
                print(trace, file=sys.stderr, flush=True)
                rep.lines += [f"## {name}: FAILED", "", "```", trace.strip()[-3000:], "```", ""]
            if args.results:  # after every section, so a later failure or timeout keeps it
                args.results.write_text("\n".join(rep.lines) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
