"""Which variant should the app default to? Phantom accuracy and CPU latency, same budget.

Every variant trains from scratch on the same synthetic phantoms (all nine classes, one
patient-level split shared by all) for the same budget of **process CPU seconds**, at its own
input size, then scores the frozen test split once; its batch-1 CPU latency is timed on the
trained weights. A CPU-time budget rather than wall time keeps the comparison fair when the
machine is shared: each variant is charged only for the cycles it got.

Rule (stated before measuring): the most accurate variant wins; a variant within
``--tie-points`` accuracy points of it wins instead if it is faster.

    .venv/bin/python bench/bench_variants.py --results bench/RESULTS-variants.md

The budget is CPU time of the training process, so this compares variants on a CPU. On a
GPU the comparison that matters is one at equal GPU time, which this script does not
measure yet.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

DEFAULT_VARIANTS = ("lungvit_tiny", "lungvit_ref64", "lungvit_s128", "lungvit_s224")


def train_one(variant: str, data: Path, work: Path, *, budget: float, threads: int,
              accelerator: str, seed: int) -> dict:
    """Train one variant for ``budget`` CPU seconds and measure it (runs in this process).

    Args:
        variant: a ``lungvit.core.model.network.VARIANTS`` name.
        data: phantom folder (class sub-folders).
        work: folder for this variant's run and checkpoint.
        budget: process CPU seconds allowed for ``Trainer.fit``.
        threads: torch CPU threads.
        accelerator: Lightning accelerator.
        seed: training seed.

    Returns:
        A result row: accuracy figures, steps, epochs, CPU and wall seconds, latency.
    """
    import torch
    from lightning.pytorch.callbacks import Callback

    from lungvit.core.model.checkpoint import load_checkpoint
    from lungvit.core.model.network import VARIANTS, count_parameters
    from lungvit.training.config import TrainConfig
    from lungvit.training.learn.fit import fit

    torch.set_num_threads(threads)

    class CpuBudget(Callback):
        """Stops training once this process has used ``budget`` CPU seconds in fit."""

        def on_train_start(self, trainer, pl_module) -> None:
            self.start = time.process_time()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if time.process_time() - self.start >= budget:
                trainer.should_stop = True

    size = VARIANTS[variant].img_size
    # Validation every 25 steps (cheap next to training: no backward); the weights with the
    # lowest validation loss are the ones tested.
    cfg = TrainConfig(data=str(data), out=str(work / f"{variant}.safetensors"), variant=variant,
                      input_size=size, epochs=1000, batch_size=16, lr=1e-3, augment=False,
                      early_stopping_patience=0, seed=seed, run_dir=str(work / variant),
                      cache_dir=str(work / "cache" / variant), accelerator=accelerator,
                      val_every_n_steps=25)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = fit(cfg, progress=False, callbacks=[CpuBudget()])
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0

    model, _ = load_checkpoint(result.checkpoint)
    model.eval()
    x = torch.rand(1, 1, size, size)
    times = []
    with torch.inference_mode():
        for i in range(25):
            t = time.perf_counter()
            model(x)
            if i >= 5:
                times.append((time.perf_counter() - t) * 1000)
    return {"variant": variant, "input": size, "params": count_parameters(model),
            "steps": result.steps, "epochs": result.epochs,
            "val_acc": result.metrics["acc"], "test_acc": result.test_metrics["acc"],
            "test_macro_f1": result.test_metrics.get("macro_f1"),
            "cpu_s": cpu, "wall_s": wall, "latency_ms": statistics.median(times),
            "split_counts": result.data["counts"]}


def choose(rows: list[dict], tie_points: float) -> dict:
    """The rule: most accurate, unless a faster one is within ``tie_points`` of it."""
    best = max(r["test_acc"] for r in rows)
    close = [r for r in rows if (best - r["test_acc"]) * 100 <= tie_points]
    return min(close, key=lambda r: r["latency_ms"])


def _child(args: argparse.Namespace, variant: str) -> dict:
    """Run :func:`train_one` in a fresh interpreter (one thread each; they run in pairs)."""
    cmd = [sys.executable, __file__, "--_one", variant, "--data", str(args.data),
           "--work", str(args.work), "--budget", str(args.budget), "--threads",
           str(args.threads), "--accelerator", args.accelerator, "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("ROW ")]
    if out.returncode or not lines:
        raise RuntimeError(f"{variant} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    import json
    return json.loads(lines[-1][4:])


def _report(rows: list[dict], chosen: dict, args: argparse.Namespace, load: tuple) -> str:
    head = ("| variant | input | params | steps | epochs | CPU s | wall s | val acc | test acc "
            "| batch-1 ms |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['variant']} | {r['input']} | {r['params']:,} | {r['steps']} | {r['epochs']} | "
        f"{r['cpu_s']:.0f} | {r['wall_s']:.0f} | {r['val_acc']:.3f} | {r['test_acc']:.3f} | "
        f"{r['latency_ms']:.1f} |\n" for r in rows)
    import torch
    return (f"# Variant choice: phantom accuracy and CPU latency at equal CPU budget\n\n"
            f"Command: `.venv/bin/python bench/bench_variants.py {' '.join(sys.argv[1:])}`\n\n"
            f"Date {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()}, "
            f"{os.cpu_count()} CPUs, load average before/after {load[0]:.1f}/{load[1]:.1f}; "
            f"torch {torch.__version__}; {args.threads} thread(s) per variant, two variants at a time.\n\n"
            f"Data: `lungvit demo-data --per-class {args.per_class} --seed {args.data_seed}` "
            f"(all nine classes, 256 px), the same patient-level split for every variant; budget "
            f"{args.budget:.0f} process CPU seconds of training each; batch 16, lr 1e-3, no "
            f"augmentation, best validation loss kept, test split scored once.\n\n"
            f"{head}{body}\n"
            f"Rule: highest test accuracy; within {args.tie_points:g} points of it, the lowest "
            f"latency. **Chosen: {chosen['variant']}** (test accuracy {chosen['test_acc']:.3f}, "
            f"{chosen['latency_ms']:.1f} ms per scan).\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--budget", type=float, default=450.0, help="CPU seconds per variant")
    parser.add_argument("--per-class", type=int, default=120)
    parser.add_argument("--data-seed", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=2, help="variants trained at once")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--tie-points", type=float, default=2.0)
    parser.add_argument("--work", type=Path, default=Path("bench/out/variants"))
    parser.add_argument("--data", type=Path)
    parser.add_argument("--results", type=Path)
    parser.add_argument("--_one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.data = args.data or args.work / "phantoms"

    if args._one:
        import json
        row = train_one(args._one, args.data, args.work, budget=args.budget,
                        threads=args.threads, accelerator=args.accelerator, seed=args.seed)
        print("ROW " + json.dumps(row), flush=True)
        return 0

    load0 = os.getloadavg()[0]
    if not args.data.exists():
        from lungvit.cli.main import main as cli
        if cli(["demo-data", str(args.data), "--per-class", str(args.per_class),
                "--size", "256", "--seed", str(args.data_seed)]) != 0:
            return 1
    # Splits are seeded by file content, so every variant gets the same split.
    with ThreadPoolExecutor(args.parallel) as pool:
        rows = list(pool.map(lambda v: _child(args, v), args.variants.split(",")))
    if len({str(r["split_counts"]) for r in rows}) != 1:
        raise RuntimeError("the variants did not see the same split")
    chosen = choose(rows, args.tie_points)
    text = _report(rows, chosen, args, (load0, os.getloadavg()[0]))
    print(text)
    if args.results:
        args.results.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
