"""Latency of every explanation method, each beside the reference design in the same run.

"Ours" is :func:`lungvit.core.explain.explain` on the timm model (fused attention for
prediction, switched off only while attention is captured; Integrated Gradients with
Gauss-Legendre steps chosen adaptively until the convergence delta is under 1 % of the
target logit). "Reference" is the reference design re-implemented in
:mod:`lungvit.core.model.reference` (explicit softmax(QK^T)V attention) explained the textbook
way: hooks plus the full rollout matrix product, Captum Integrated Gradients with 50 steps,
the same Captum settings as ours for the sampling methods. For each method ours and
the reference run back to back (all of ours, then all of the reference's), so a slowly
changing load hits both alike; a noisy machine still shows in the spread, so process CPU
time is recorded beside wall time.

Weights are random unless ``--checkpoint`` is given (no trained checkpoint of every variant
exists); IG's convergence depends on the function, so the step count it needed is reported.

    .venv/bin/python bench/bench_explain.py --threads 2 --results bench/RESULTS-explain.md
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

import numpy as np
import torch
from captum.attr import GradientShap, IntegratedGradients, NoiseTunnel, Occlusion, Saliency

from lungvit.core.explain import METHODS, explain
from lungvit.core.explain.attributions import AttributionContext, blur
from lungvit.core.explain.rollout import rollout_matrix
from lungvit.core.model.network import create_model
from lungvit.synthetic.phantoms import make_phantom
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input
from lungvit.synthetic.reference_model import ReferenceViT


def measure(fn: Callable[[], Any], repeats: int) -> tuple[list[float], list[float], Any]:
    """(wall seconds, process CPU seconds) of each of ``repeats`` calls, and the last result."""
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return walls, cpus, out


# ----------------------------------------------------------------------------- the reference design


class ReferenceExplainer:
    """The textbook way of explaining the reference module (no fused path to switch)."""

    def __init__(self, model: ReferenceViT, ctx: AttributionContext) -> None:
        self.model, self.ctx = model, ctx
        self.attn = [layer[0].fn for layer in model.transformer.layers]

    def rollout(self, x: torch.Tensor, target: int) -> torch.Tensor:
        caps: list[torch.Tensor] = []
        hs = [a.attn_drop.register_forward_hook(lambda m, i, o: caps.append(o)) for a in self.attn]
        try:
            with torch.no_grad():
                self.model(x)
        finally:
            for h in hs:
                h.remove()
        return rollout_matrix(caps)[:, 0, 1:]  # the full N x N product, layer by layer

    def grad_rollout(self, x: torch.Tensor, target: int) -> torch.Tensor:
        caps: list[torch.Tensor] = []
        hs = [a.attn_drop.register_forward_hook(lambda m, i, o: caps.append(o)) for a in self.attn]
        try:
            out = self.model(x)
        finally:
            for h in hs:
                h.remove()
        grads = torch.autograd.grad(out[0, target], caps)
        w = [(a * g.clamp(min=0)).mean(1, keepdim=True).detach() for a, g in zip(caps, grads)]
        return rollout_matrix(w)[:, 0, 1:]

    def gradcam(self, x: torch.Tensor, target: int) -> torch.Tensor:
        acts: list[torch.Tensor] = []
        h = self.model.transformer.layers[-1][0].norm.register_forward_hook(lambda m, i, o: acts.append(o))
        try:
            out = self.model(x)
        finally:
            h.remove()
        (g,) = torch.autograd.grad(out[0, target], acts[0])
        return torch.relu(acts[0][0, 1:].detach() @ g[0, 1:].mean(0))

    def ig(self, x: torch.Tensor, target: int) -> tuple[torch.Tensor, float]:
        ig = IntegratedGradients(self.model)
        attr, delta = ig.attribute(x, baselines=self.ctx.baseline(x), target=target, n_steps=50,
                                   internal_batch_size=self.ig_batch, return_convergence_delta=True)
        return attr, float(delta[0])

    ig_batch: int | None = None

    def gradient_shap(self, x: torch.Tensor, target: int) -> torch.Tensor:
        base = torch.cat([self.ctx.baseline(x), blur(x, x.shape[-1] / 8)])
        return GradientShap(self.model).attribute(x, baselines=base, target=target, n_samples=16,
                                                  stdevs=0.05 * self.ctx.span)

    def smoothgrad(self, x: torch.Tensor, target: int) -> torch.Tensor:
        return NoiseTunnel(Saliency(self.model)).attribute(x, nt_type="smoothgrad", nt_samples=16,
                                                           stdevs=0.15 * self.ctx.span, target=target)

    def occlusion(self, x: torch.Tensor, target: int) -> torch.Tensor:
        w = x.shape[-1] // 4
        return Occlusion(self.model).attribute(x, sliding_window_shapes=(1, w, w), strides=(1, w // 2, w // 2),
                                               baselines=self.ctx.baseline_value, target=target,
                                               perturbations_per_eval=64)


# ----------------------------------------------------------------------------- one variant


def bench_variant(variant: str, *, repeats: int, methods: list[str], ref_ig: bool, ref_methods: bool,
                  checkpoint: str | None, ig_batch_ref: int | None) -> dict[str, Any]:
    torch.manual_seed(0)
    if checkpoint:
        from lungvit.core.model.checkpoint import load_checkpoint

        model, info = load_checkpoint(checkpoint)
        size = info.preprocess.input_size if info.preprocess else info.model.img_size
    else:
        model = create_model(variant).eval()
        size = model.patch_embed.img_size[0]
    cfg = PreprocessConfig(input_size=size)
    ctx = AttributionContext.from_preprocess(cfg)
    ref = ReferenceViT(image_size=size).eval()
    rx = ReferenceExplainer(ref, ctx)
    rx.ig_batch = ig_batch_ref
    scan = make_phantom("lung-opacity", size=512, seed=1).image
    x = to_model_input(scan, cfg)[None]
    with torch.inference_mode():
        target = int(model(x).argmax())
        ref_target = int(ref(x).argmax())
    rows: dict[str, Any] = {"variant": variant, "size": size, "rows": []}

    def predict_ours() -> Any:
        with torch.inference_mode():
            return torch.softmax(model(to_model_input(scan, cfg)[None]), -1)

    def predict_ref() -> Any:
        with torch.inference_mode():
            return torch.softmax(ref(to_model_input(scan, cfg)[None]), -1)

    # Warm up both (allocator, first-call dispatch).
    for f in (predict_ours, predict_ref):
        f()
        f()
    pairs: list[tuple[str, Callable[[], Any], Callable[[], Any] | None]] = [
        ("predict", predict_ours, predict_ref),
        ("predict + rollout",
         lambda: explain(model, scan, preprocess=cfg, methods=["rollout"], faithfulness=False),
         lambda: (predict_ref(), rx.rollout(to_model_input(scan, cfg)[None], ref_target))),
    ]
    for m in methods:
        if m == "rollout":
            continue  # the "predict + rollout" row
        def ours(m: str = m) -> Any:
            return explain(model, scan, preprocess=cfg, methods=[m], target=target, faithfulness=False)
        # Ours includes the prediction pass explain() makes; so does the reference's.
        theirs = None if not ref_methods else (
            lambda m=m: (predict_ref(), getattr(rx, m)(to_model_input(scan, cfg)[None], ref_target)))
        if m == "ig" and not ref_ig:
            theirs = None
        pairs.append((m, ours, theirs))
    pairs.append(("faithfulness (1 map + 3 random)", lambda: explain(
        model, scan, preprocess=cfg, methods=["rollout"], faithfulness=True).faithfulness_seconds, None))

    for name, ours, theirs in pairs:
        reps = repeats if name != "ig" else max(1, min(repeats, 3))
        if not name.startswith("faithfulness"):
            # One untimed call each: first-call costs (lazy tables, allocator growth, the
            # first backward's buffers) are not what a running app pays per scan.
            ours()
            if theirs is not None and name != "ig":
                theirs()
        ow, oc, oout = measure(ours, reps)
        row: dict[str, Any] = {"name": name, "ours_wall": statistics.median(ow), "ours_cpu": statistics.median(oc)}
        if name == "faithfulness (1 map + 3 random)":
            row["ours_wall"] = float(oout)  # the scoring alone
        if name == "ig":
            e = oout["ig"]
            row["ours_note"] = (f"{e.extras['evaluations']} gradient evaluations ({e.extras['segments']} "
                                f"Gauss-Legendre segment(s)), |delta| = {e.extras['relative_delta']:.2%} of the "
                                f"logit{'' if e.extras['converged'] else ', NOT converged'}")
        if theirs is not None:
            tw, tc, tout = measure(theirs, reps if name != "ig" else 1)
            row["ref_wall"], row["ref_cpu"] = statistics.median(tw), statistics.median(tc)
            if name == "ig":
                with torch.no_grad():
                    ends = ref(torch.cat([x, ctx.baseline(x)]))[:, ref_target]
                delta = tout[1][1]
                row["ref_note"] = f"50 steps, |delta| = {abs(delta) / max(abs(float(ends[0])), 1e-12):.2%} of the logit"
        rows["rows"].append(row)
        print(f"{variant:>14} {name:<32} ours {row['ours_wall']:8.3f}s"
              + (f"  reference {row['ref_wall']:8.3f}s" if "ref_wall" in row else ""), flush=True)
    return rows


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "# Explanation latency (bench/bench_explain.py)",
        "",
        f"Measured {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {platform.machine()} "
        f"({os.cpu_count()} CPUs visible), torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, "
        f"{'a checkpoint' if args.checkpoint else 'random weights'}; one 512 x 512 phantom scan; "
        "medians of "
        f"{args.repeats} runs, ours then the reference's back to back per method (IG: up to 3, "
        "reference IG: 1); load average at the start "
        f"{args.load_start}. Every row includes the prediction pass (ours: explain(); reference: "
        "its forward pass, then the method).",
        "",
        f"Command: `.venv/bin/python bench/bench_explain.py {' '.join(sys.argv[1:])}`",
        "",
        "| variant | what | ours wall s | ours CPU s | reference wall s | reference CPU s "
        "| ours / reference (CPU) | notes |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for res in results:
        pred = next(r for r in res["rows"] if r["name"] == "predict")
        for r in res["rows"]:
            ratio = f"{r['ours_cpu'] / r['ref_cpu']:.2f}" if "ref_cpu" in r else ""
            ref_note = ("reference: " + r["ref_note"]) if "ref_note" in r else ""
            notes = "; ".join(n for n in (r.get("ours_note", ""), ref_note) if n)
            if r["name"] == "predict + rollout":
                notes = (f"ours {r['ours_cpu'] / pred['ours_cpu']:.2f}x our prediction alone; reference "
                         f"{r['ref_cpu'] / pred['ref_cpu']:.2f}x its prediction (CPU time)")
            if r["name"].startswith("faithfulness"):
                notes = "wall: the scoring alone; CPU: the whole call, rollout pass included"
            ref_w = f"{r['ref_wall']:.3f}" if "ref_wall" in r else "-"
            ref_c = f"{r['ref_cpu']:.3f}" if "ref_cpu" in r else "-"
            lines.append(f"| {res['variant']} ({res['size']} px) | {r['name']} | {r['ours_wall']:.3f} | "
                         f"{r['ours_cpu']:.3f} | {ref_w} | {ref_c} | {ratio} | {notes} |")
    return "\n".join(lines) + "\n"


def quality(n_per_class: int, seed: int = 0, phantom_offset: int = 0) -> str:
    """Faithfulness of every method on phantoms, with the tiny model the tests train."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.core.explain.conftest import LESION_CLASSES, train_phantom_model

    from lungvit.core.explain import lesion_share, randomization_check

    trained = train_phantom_model(seed=seed, phantom_offset=phantom_offset)
    phantoms = [p for lab in LESION_CLASSES
                for p in [q for q in trained.test_phantoms if q.label == lab][:n_per_class]]
    share: dict[str, list[float]] = {m: [] for m in METHODS}
    faith: dict[str, list[tuple[float, ...]]] = {m: [] for m in METHODS}
    ig_delta, rnd_share = [], []
    rand_rho: dict[str, list[float]] = {m: [] for m in METHODS}
    for i, p in enumerate(phantoms):
        es = explain(trained.model, p.image, preprocess=trained.preprocess, methods=list(METHODS),
                     target=p.label_index)
        rnd_share.append(float(p.mask.mean()))
        ig_delta.append((es["ig"].extras["relative_delta"], es["ig"].extras["evaluations"],
                         es["ig"].extras["converged"]))
        for e in es:
            f = e.faithfulness
            share[e.method].append(lesion_share(e.map, p.mask))
            faith[e.method].append((f["deletion_auc"], f["random_deletion_auc"], f["insertion_auc"],
                                    f["random_insertion_auc"]))
        if i % n_per_class == 0:  # one scan per class for the (costlier) randomisation check
            x = to_model_input(p.image, trained.preprocess)[None]
            for m in METHODS:
                r = randomization_check(trained.model, x, m, target=p.label_index, preprocess=trained.preprocess)
                rand_rho[m].append(r.correlations["all"])
    lines = [
        "", f"## Faithfulness on phantoms (`--quality`, training seed {seed}, phantom offset {phantom_offset})", "",
        f"Tiny model trained as the tests train it (lungvit_tiny at 32 px, {', '.join(LESION_CLASSES)} and "
        f"normal phantoms; test accuracy {trained.accuracy:.2f}, {trained.seconds:.0f} s to train here); "
        f"{len(phantoms)} lesion phantoms, each explained for its true class. Random map's lesion share = "
        f"mask area fraction = {np.mean(rnd_share):.3f}. Deletion: lower is better; insertion: higher is "
        "better; 'wins' = share of scans where the map beats the random maps.", "",
        "| method | lesion-mass share | deletion AUC (random) | deletion wins | insertion AUC (random) | "
        "randomised-model Spearman |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in METHODS:
        a = np.array(faith[m])
        lines.append(f"| {m} | {np.mean(share[m]):.3f} | {a[:, 0].mean():.3f} ({a[:, 1].mean():.3f}) | "
                     f"{np.mean(a[:, 0] < a[:, 1]):.2f} | {a[:, 2].mean():.3f} ({a[:, 3].mean():.3f}) | "
                     f"{', '.join(f'{r:+.2f}' for r in rand_rho[m])} |")
    d = np.array(ig_delta)
    lines += ["", f"Integrated Gradients on this model: |delta| / |logit| median {np.median(d[:, 0]):.2%}, "
              f"max {d[:, 0].max():.2%}; converged on {int(d[:, 2].sum())} of {len(d)}; gradient evaluations "
              f"{sorted(int(s) for s in d[:, 1])} (adaptive, budget 64)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default="lungvit_ref64,lungvit_s128")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--checkpoint", help="explain this checkpoint's model instead of random weights")
    p.add_argument("--no-reference-ig-above", type=int, default=64, metavar="PX",
                   help="skip the reference's 50-step IG above this input size (it takes minutes)")
    p.add_argument("--no-reference-methods-above", type=int, default=64, metavar="PX",
                   help="above this input size, time only the reference's prediction and rollout")
    p.add_argument("--reference-ig-batch", type=int, default=None,
                   help="Captum internal_batch_size for the reference IG (memory)")
    p.add_argument("--results", help="write a markdown table here")
    p.add_argument("--quality", type=int, default=0, metavar="N",
                   help="also score every method on N lesion phantoms per class with the tests' tiny model")
    p.add_argument("--quality-models", default="0:0", metavar="SEED:OFFSET,...",
                   help="phantom models for --quality: training seed and phantom-set offset of each "
                        "(e.g. 0:0,1:0,0:1000,1:2000,3:3000)")
    p.add_argument("--skip-latency", action="store_true", help="only the --quality part")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as f:
        args.load_start = " / ".join(f.read().split()[:3])
    methods = [m for m in args.methods.split(",") if m]
    results = []
    for v in ([] if args.skip_latency else args.variants.split(",")):
        size = create_model(v).patch_embed.img_size[0]
        results.append(bench_variant(v, repeats=args.repeats, methods=methods, checkpoint=args.checkpoint,
                                     ref_ig=size <= args.no_reference_ig_above,
                                     ref_methods=size <= args.no_reference_methods_above,
                                     ig_batch_ref=args.reference_ig_batch))
    md = markdown(results, args) if results else ""
    if args.quality:
        for pair in args.quality_models.split(","):
            seed, offset = (int(v) for v in pair.split(":"))
            md += quality(args.quality, seed=seed, phantom_offset=offset)
    print(md)
    if args.results:
        with open(args.results, "w") as f:
            f.write(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
