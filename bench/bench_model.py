"""Inference speed of the LungViT variants beside the reference design at the same input size.

Each variant is timed against :class:`lungvit.synthetic.reference_model.ReferenceViT` (explicit
softmax(QK^T)V attention) at the variant's input size, in the same run and interleaved
(variant, reference, variant, ...), so the ratios hold even on a noisy machine.

CPU (the figures DESIGN.md quotes are for 2 cores)::

    .venv/bin/python bench/bench_model.py --threads 2 --results bench/RESULTS-model.md

GPU inference throughput (bf16 autocast; add --compile for torch.compile)::

    .venv/bin/python bench/bench_model.py --device cuda --dtype bf16 --batch 256
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from datetime import datetime, timezone

import timm
import torch

from torch.utils.flop_counter import FlopCounterMode

from lungvit.core.model.network import VARIANTS, count_parameters, create_model, set_fused_attention
from lungvit.synthetic.reference_model import ReferenceViT

# Variants timed by default, each beside the reference at its own input size.
PAIRS = ("lungvit_tiny", "lungvit_ref64", "lungvit_s128", "lungvit_s224")


def _timer(device: str) -> Callable[[], float]:
    if device == "cuda":
        def now() -> float:
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.perf_counter


def time_pair(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int,
              budget_s: float, now: Callable[[], float]) -> dict[str, list[tuple[float, float]]]:
    """Run each fn ``warmup`` times, then interleave them ``repeats`` times (down to 3 when
    that would overrun ``budget_s``). Returns (wall seconds, process CPU seconds) per call.

    CPU time is recorded because on a shared machine wall time also counts the time other
    processes held the cores; CPU time of the timed process is far less sensitive to that.
    """
    first = 0.0
    for fn in fns.values():
        for _ in range(max(warmup, 1)):
            start = now()
            fn()
        first += now() - start
    n = max(3, min(repeats, int(budget_s / max(first, 1e-9))))
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for _ in range(n):
        for name, fn in fns.items():
            start, cpu = now(), time.process_time()
            fn()
            times[name].append((now() - start, time.process_time() - cpu))
    return times


def forward_gflops(model: torch.nn.Module, x: torch.Tensor) -> float:
    """GFLOPs of one forward pass. Counted with explicit attention: the counter does not
    see the fused CPU attention kernel, whose arithmetic is the same."""
    with torch.inference_mode(), set_fused_attention(model, False), \
            FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (default 2)")
    parser.add_argument("--variants", default=",".join(PAIRS))
    parser.add_argument("--repeats", type=int, default=20, help="timed batch-1 runs")
    parser.add_argument("--batch", type=int, default=32, help="throughput batch size")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--budget", type=float, default=60.0,
                        help="seconds allowed per measurement before repeats are cut to 3")
    parser.add_argument("--skip-reference-throughput-above", type=int, default=128,
                        help="no batched reference runs above this input size (memory/time)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the models")
    parser.add_argument("--results", help="write the Markdown report to this file")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    autocast = (torch.autocast(args.device, dtype=torch.bfloat16) if args.dtype == "bf16"
                else nullcontext())
    now = _timer(args.device)
    load_before = os.getloadavg()
    rows = []
    for variant in args.variants.split(","):
        cfg = VARIANTS[variant]
        torch.manual_seed(0)
        models = {
            variant: create_model(variant).eval().to(device),
            "reference": ReferenceViT(image_size=cfg.img_size).eval().to(device),
        }
        one = torch.randn(1, 1, cfg.img_size, cfg.img_size, device=device)
        row = {"variant": variant, "size": cfg.img_size,
               "params": count_parameters(models[variant]),
               "ref_params": count_parameters(models["reference"]),
               "gflops": forward_gflops(models[variant], one),
               "ref_gflops": forward_gflops(models["reference"], one)}
        if args.compile:
            models = {k: torch.compile(m) for k, m in models.items()}
        for batch, key in ((1, "lat"), (args.batch, "thr")):
            if key == "thr" and cfg.img_size > args.skip_reference_throughput_above:
                names = [variant]
            else:
                names = list(models)
            if args.device == "cuda" and key == "lat":
                continue  # GPU: throughput only
            x = torch.randn(batch, 1, cfg.img_size, cfg.img_size, device=device)

            def run(m=None, x=x):
                with torch.inference_mode(), autocast:
                    return m(x)

            fns = {n: (lambda n=n: run(models[n])) for n in names}
            times = time_pair(fns, repeats=args.repeats if key == "lat" else 5,
                              warmup=args.warmup, budget_s=args.budget, now=now)
            for n, ts in times.items():
                who = "var" if n == variant else "ref"
                row[f"{who}_{key}"] = statistics.median(t for t, _ in ts)
                row[f"{who}_{key}_cpu"] = statistics.median(c for _, c in ts)
                row[f"{who}_{key}_n"] = len(ts)
        rows.append(row)
        print(_row_text(row, args.batch), file=sys.stderr, flush=True)

    report = _report(rows, args, argv, load_before, os.getloadavg())
    print(report)
    if args.results:
        with open(args.results, "w") as fh:
            fh.write(report)
    return 0


def _row_text(row: dict, batch: int) -> str:
    parts = [f"{row['variant']} @{row['size']}"]
    if "var_lat" in row:
        ref = row.get("ref_lat", float("nan"))
        parts.append(f"lat {row['var_lat'] * 1e3:.1f} ms vs ref {ref * 1e3:.1f} ms")
    parts.append(f"thr {batch / row['var_thr']:.1f} img/s")
    return ", ".join(parts)


def _report(rows: list[dict], args: argparse.Namespace, argv: list[str] | None,
            load_before: tuple[float, ...], load_after: tuple[float, ...]) -> str:
    cmd = " ".join(["python bench/bench_model.py", *(argv if argv is not None else sys.argv[1:])])
    b = args.batch

    def cell(r: dict, key: str, scale: float, fmt: str) -> str:
        return fmt.format(scale / r[key] if scale else r[key] * 1e3) if key in r else "n/a"

    def ratio(r: dict, key: str) -> str:
        return f"{r['ref_' + key] / r['var_' + key]:.1f}x" if "ref_" + key in r else "n/a"

    lines = [
        "# Model inference benchmark", "",
        f"Command: `{cmd}`", "",
        f"- Date: {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
        f"- Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"visible, torch threads {args.threads}; device {args.device} {args.dtype}"
        + (", torch.compile" if args.compile else ""),
        f"- torch {torch.__version__}, timm {timm.__version__}",
        f"- Load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f}",
        "- Reference = the reference design (explicit attention) at the variant's input size, "
        "timed interleaved with the variant in the same run. Medians; n = timed runs. "
        "CPU = CPU seconds of the benchmark process per call (all its threads).",
        "", "## Batch-1 latency", "",
        "| variant | input | params | GFLOPs | reference GFLOPs | wall (n) | reference wall "
        "| ratio | CPU | reference CPU | CPU ratio |", "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "var_lat" not in r:
            continue
        n = f" ({r['var_lat_n']})"
        lines.append(
            f"| {r['variant']} | {r['size']} | {r['params']:,} | {r['gflops']:.2f} | "
            f"{r['ref_gflops']:.2f} | {cell(r, 'var_lat', 0, '{:.1f} ms')}{n} | {cell(r, 'ref_lat', 0, '{:.1f} ms')} | "
            f"{ratio(r, 'lat')} | {cell(r, 'var_lat_cpu', 0, '{:.1f} ms')} | "
            f"{cell(r, 'ref_lat_cpu', 0, '{:.1f} ms')} | {ratio(r, 'lat_cpu')} |")
    lines += ["", f"## Batch-{b} throughput (images/s)", "",
              "| variant | input | wall img/s (n) | reference | ratio | per CPU-second | "
              "reference | CPU ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['size']} | {cell(r, 'var_thr', b, '{:.1f}')} "
            f"({r['var_thr_n']}) | {cell(r, 'ref_thr', b, '{:.1f}')} | {ratio(r, 'thr')} | "
            f"{cell(r, 'var_thr_cpu', b, '{:.1f}')} | {cell(r, 'ref_thr_cpu', b, '{:.1f}')} | "
            f"{ratio(r, 'thr_cpu')} |")
    lines += ["", "Reference parameters at each size: " + ", ".join(
        f"{r['size']} px {r['ref_params']:,}" for r in rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
