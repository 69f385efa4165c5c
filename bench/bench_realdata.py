"""How well does a LungViT model read real scans, and how will it do on a hospital it has not seen?

Three measurements on a folder of real scans whose file names say their source
(``SOURCE__name.png``, as in ``../shared/realdata``):

``variants``  trains each variant (input size) with the same recipe for the same epochs on the
              same patient/source-stratified split and compares them on the VALIDATION split
              (macro recall), with their training time and batch-1 latency on 2 threads.
              The test split is not looked at, so it stays held out for ``evaluate``.
``evaluate``  scores a trained model once on its frozen test split (the ``split.csv`` of its
              run): per-class precision/recall, macro recall, ECE before/after calibration,
              and recall per (class, source), through the same decoding path as the app.
``loso``      leave-one-source-out: for every class with two or more sources, one fold holds
              a source out of training and validation entirely; a model trained with the
              same recipe is scored on that source's scans. Reports recall per held-out
              (class, source) and their macro mean.

Each writes a Markdown table (``--results``) and, with ``--into MODEL``, stores its figures
in that checkpoint's metrics so the model card shows them. Examples::

    python bench/bench_realdata.py variants --data ../shared/realdata --epochs 3
    python bench/bench_realdata.py evaluate --model assets/lungvit-real.safetensors \\
        --data ../shared/realdata --split RUN/split.csv --into assets/lungvit-real.safetensors
    python bench/bench_realdata.py loso --data ../shared/realdata --epochs 8 \\
        --into assets/lungvit-real.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lungvit.core.model.checkpoint import load_checkpoint, read_checkpoint_info, save_checkpoint
from lungvit.core.io.ingest import load_scan
from lungvit.core.predict import Predictor
from lungvit.training.config import TrainConfig
from lungvit.training.data.discover import discover
from lungvit.training.learn.fit import fit
from lungvit.training.learn.metrics import classification_report
from lungvit.training.data.splits import load_split_manifest, save_split_manifest, split_index

RECIPE = dict(augment_policy="acquisition", balanced_sampling=True, batch_size=32, lr=1e-3,
              weight_decay=0.05, label_smoothing=0.1, early_stopping_patience=0, seed=0)


def _config(data: str, work: Path, name: str, variant: str, epochs: int, **extra: Any
            ) -> TrainConfig:
    recipe = {**RECIPE, **{k: v for k, v in extra.items() if v is not None}}
    return TrainConfig(data=data, out=str(work / f"{name}.safetensors"), variant=variant,
                       epochs=epochs, run_dir=str(work / name), cache_dir=str(work / "cache"),
                       **recipe)


def _overrides(items: list[str] | None) -> dict[str, Any]:
    """``KEY=VALUE`` recipe overrides (VALUE read as JSON when it parses: true, 0.1, "x")."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or key not in TrainConfig.__dataclass_fields__:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE with a TrainConfig field")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def latency_ms(model_path: str | Path, threads: int = 2, repeats: int = 30) -> float:
    """Median batch-1 forward time (ms) of the model on ``threads`` CPU threads."""
    torch.set_num_threads(threads)
    model, info = load_checkpoint(model_path)
    model.eval()
    size = info.preprocess.input_size if info.preprocess else info.model.img_size
    x = torch.randn(1, 1, size, size)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            model(x)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def score_files(model_path: str | Path, paths: list[str], labels: list[str]
                ) -> tuple[dict[str, Any], torch.Tensor]:
    """Decode every file as the app does, run the model, report as training does.

    Labels the model does not know are skipped (counted in ``unknown_label``).

    Returns:
        (classification report with the checkpoint's temperature plus ``uncalibrated_ece``
        and ``unknown_label``, (N,) predicted class indices)
    """
    predictor = Predictor.from_checkpoint(model_path)
    known = list(predictor.info.labels)
    keep = [(p, y) for p, y in zip(paths, labels) if y in known]
    logits = []
    for start in range(0, len(keep), 64):
        batch = torch.stack([predictor.prepare(load_scan(p)) for p, _ in keep[start:start + 64]])
        logits.append(predictor.logits(batch).float())
    logits_t = torch.cat(logits)
    targets = torch.tensor([known.index(y) for _, y in keep])
    report = classification_report(logits_t, targets, labels=known,
                                   temperature=predictor.info.temperature)
    raw = classification_report(logits_t, targets, labels=known)
    report["uncalibrated_ece"] = raw["ece"]
    report["unknown_label"] = len(paths) - len(keep)
    return report, logits_t.argmax(1)


def _recall_by_source(paths: list[str], labels: list[str], sources: list[str], known: list[str],
                      predicted: torch.Tensor) -> dict[str, dict[str, dict[str, float]]]:
    hits: dict[tuple[str, str], list[int]] = defaultdict(list)
    kept = [(y, s) for y, s in zip(labels, sources) if y in known]
    for (y, s), p in zip(kept, predicted.tolist()):
        hits[(y, s)].append(int(known[p] == y))
    out: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for (y, s), h in sorted(hits.items()):
        out[y][s] = {"recall": sum(h) / len(h), "n": len(h)}
    return dict(out)


def _store(model: str, key: str, value: dict[str, Any]) -> None:
    net, info = load_checkpoint(model)
    info.metrics[key] = value
    save_checkpoint(model, net, info)


def _write(results: str | None, text: str) -> None:
    print(text)
    if results:
        Path(results).write_text(text)


def _header(title: str, argv: list[str]) -> list[str]:
    return [f"# {title}", "",
            f"Command: `python bench/bench_realdata.py {' '.join(argv)}`  ",
            f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
            f"{os.cpu_count()} CPU cores ({platform.machine()}), load average at the end "
            f"{os.getloadavg()[0]:.1f}; torch {torch.__version__}", ""]


# ------------------------------------------------------------------------------ variants
def cmd_variants(args: argparse.Namespace, argv: list[str]) -> int:
    work = Path(args.work)
    rows = []
    for variant in args.variants.split(","):
        cfg = _config(args.data, work, variant, variant, args.epochs, max_steps=args.max_steps)
        result = fit(cfg, progress=False)
        val = result.metrics
        rows.append({"variant": variant, "size": result.config.input_size,
                     "val_macro_recall": val["balanced_acc"], "val_acc": val["acc"],
                     "val_ece": val["ece"], "train_s": result.wall_time_s,
                     "steps": result.steps,
                     "latency_ms": latency_ms(result.checkpoint, threads=2)})
        print(json.dumps(rows[-1]), flush=True)
    lines = _header("Real-data variants: validation macro recall at equal epochs", argv)
    lines += [f"Recipe: {json.dumps(RECIPE)}, {args.epochs} epochs each, same split (seed 0). "
              "Scored on the validation split only; the test split is left alone.", "",
              "| variant | input px | val macro recall | val accuracy | val ECE | steps | "
              "training s | batch-1 ms (2 threads) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['size']} | {r['val_macro_recall']:.3f} | "
                     f"{r['val_acc']:.3f} | {r['val_ece']:.3f} | {r['steps']} | "
                     f"{r['train_s']:.0f} | {r['latency_ms']:.1f} |")
    _write(args.results, "\n".join(lines) + "\n")
    return 0


# ------------------------------------------------------------------------------ evaluate
def cmd_evaluate(args: argparse.Namespace, argv: list[str]) -> int:
    index = discover(args.data, min_per_class=1)
    by_rel = {index.relpath(s.path): s for s in index.samples}
    test = [by_rel[p] for p in load_split_manifest(args.split)["test"] if p in by_rel]
    paths = [s.path for s in test]
    labels = [s.label for s in test]
    sources = [s.source or "unknown" for s in test]
    report, predicted = score_files(args.model, paths, labels)
    known = report["labels"]
    per_source = _recall_by_source(paths, labels, sources, known, predicted)
    summary = {"n": report["n"], "macro_recall": report["balanced_acc"], "acc": report["acc"],
               "ece": report["ece"], "ece_uncalibrated": report["uncalibrated_ece"],
               "per_class": {c: {"precision": m["precision"], "recall": m["recall"],
                                 "support": m["support"]}
                             for c, m in report["per_class"].items()},
               "recall_by_source": per_source, "split": "frozen test split of the training run "
               "(by patient where file names give one, stratified by class and source)"}
    lines = _header("Real data, within source: the frozen test split", argv)
    lines += [f"{report['n']} test scans; macro recall **{report['balanced_acc']:.3f}**, "
              f"accuracy {report['acc']:.3f}, ECE {report['uncalibrated_ece']:.3f} before -> "
              f"**{report['ece']:.3f}** after calibration (temperature fitted on validation).",
              "", "| class | precision | recall | n | recall by source |", "|---|---|---|---|---|"]
    for c, m in report["per_class"].items():
        src = ", ".join(f"{s} {v['recall']:.2f} (n={v['n']})"
                        for s, v in per_source.get(c, {}).items())
        lines.append(f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['support']} | "
                     f"{src} |")
    _write(args.results, "\n".join(lines) + "\n")
    if args.into:
        _store(args.into, "within_source_test", summary)
    return 0


# ---------------------------------------------------------------------------------- loso
def _folds(index: Any) -> list[dict[str, str]]:
    """Fold k holds out, for every class with >= 2 sources, its k-th source (sorted by name)."""
    by_class = index.source_counts()
    multi = {c: sorted(s) for c, s in by_class.items() if len(s) >= 2 and "unknown" not in s}
    width = max((len(s) for s in multi.values()), default=0)
    return [{c: s[k] for c, s in multi.items() if k < len(s)} for k in range(width)]


def cmd_loso(args: argparse.Namespace, argv: list[str]) -> int:
    work = Path(args.work)
    index = discover(args.data, min_per_class=1)
    folds = list(enumerate(_folds(index)))
    if args.folds:
        folds = [folds[int(k)] for k in args.folds.split(",")]
    results = []
    for k, holdout in folds:
        held = [i for i, s in enumerate(index.samples) if holdout.get(s.label) == s.source]
        held_set = set(held)
        rest = [i for i in range(len(index.samples)) if i not in held_set]
        sub = type(index)([index.samples[i] for i in rest], index.classes, [], {}, index.root)
        splits = split_index(sub, seed=0)
        manifest = {s: [rest[i] for i in v] for s, v in splits.items()}
        manifest["test"] = sorted(manifest["test"] + held)
        name = f"loso{k}"
        (work / name).mkdir(parents=True, exist_ok=True)
        save_split_manifest(work / name / "split.csv", index, manifest)
        cfg = _config(args.data, work, name, args.variant, args.epochs, min_per_class=1,
                      max_steps=args.max_steps, **_overrides(args.set),
                      split_manifest=str(work / name / "split.csv"))
        result = fit(cfg, progress=False)
        paths = [index.samples[i].path for i in held]
        labels = [index.samples[i].label for i in held]
        sources = [index.samples[i].source for i in held]
        _, predicted = score_files(result.checkpoint, paths, labels)
        known = list(read_checkpoint_info(result.checkpoint).labels)
        per = _recall_by_source(paths, labels, sources, known, predicted)
        confusions: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for y, p in zip([y for y in labels if y in known], predicted.tolist()):
            confusions[y][known[p]] += 1
        for c, s in holdout.items():
            row = per.get(c, {}).get(s)
            results.append({"class": c, "held_out_source": s, "fold": k,
                            "train_sources": sorted(set(index.source_counts()[c]) - {s}),
                            "recall": None if row is None else row["recall"],
                            "n": 0 if row is None else row["n"],
                            "predicted_as": dict(confusions.get(c, {}))})
            print(json.dumps(results[-1]), flush=True)
    scored = [r["recall"] for r in results if r["recall"] is not None]
    macro = sum(scored) / len(scored) if scored else None
    lines = _header("Real data, leave one source out", argv)
    recipe = {**RECIPE, **_overrides(args.set)}
    lines += [f"Variant {args.variant}, recipe {json.dumps(recipe)}, {args.epochs} epochs per "
              "fold. In each fold the held-out source of each listed class is absent from "
              "training and validation; its scans are scored once at the end.", "",
              f"Macro recall over held-out (class, source) pairs: **{macro:.3f}**"
              if macro is not None else "No fold could be scored.", "",
              "| class | held-out source | trained on | recall | n | predicted as |",
              "|---|---|---|---|---|---|"]
    for r in results:
        rec = "-" if r["recall"] is None else f"{r['recall']:.3f}"
        pred = ", ".join(f"{k} {v}" for k, v in sorted(r["predicted_as"].items(),
                                                        key=lambda kv: -kv[1]))
        lines.append(f"| {r['class']} | {r['held_out_source']} | "
                     f"{', '.join(r['train_sources'])} | {rec} | {r['n']} | {pred} |")
    _write(args.results, "\n".join(lines) + "\n")
    if args.into:
        _store_loso(args.into, results, args.variant, args.epochs)
    return 0


def _store_loso(model: str, results: list[dict[str, Any]], variant: str, epochs: int) -> None:
    """Merge fold results into ``model``'s ``cross_source`` metrics (one fold per process)."""
    old = read_checkpoint_info(model).metrics.get("cross_source", {})
    mine = {(r["class"], r["held_out_source"]) for r in results}
    pairs = [p for p in old.get("pairs", [])
             if (p["class"], p["held_out_source"]) not in mine] + results
    pairs.sort(key=lambda p: (p["class"], p["held_out_source"]))
    scored = [p["recall"] for p in pairs if p["recall"] is not None]
    _store(model, "cross_source", {
        "macro_recall": sum(scored) / len(scored) if scored else None, "pairs": pairs,
        "variant": variant, "epochs": epochs})


def cmd_store_loso(args: argparse.Namespace, argv: list[str]) -> int:
    """Store the JSON rows that ``loso`` runs printed (their logs) into a checkpoint."""
    results = [json.loads(line) for log in args.logs for line in Path(log).read_text().splitlines()
               if line.startswith('{"class"')]
    _store_loso(args.into, results, args.variant, args.epochs)
    print(f"stored {len(results)} held-out (class, source) results in {args.into}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("variants", "evaluate", "loso"):
        p = sub.add_parser(name)
        p.add_argument("--data", default="../shared/realdata")
        p.add_argument("--results", help="write the Markdown table here")
        p.add_argument("--work", default="/tmp/lungvit-realdata-bench")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--max-steps", type=int, help="cap optimizer steps (smoke tests)")
    sub.choices["variants"].add_argument("--variants", default="lungvit_tiny,lungvit_t128,"
                                         "lungvit_t224")
    sub.choices["variants"].add_argument("--epochs", type=int, default=3)
    sub.choices["evaluate"].add_argument("--model", required=True)
    sub.choices["evaluate"].add_argument("--split", required=True, help="the run's split.csv")
    sub.choices["evaluate"].add_argument("--into", help="store the figures in this checkpoint")
    sub.choices["loso"].add_argument("--variant", default="lungvit_t224")
    sub.choices["loso"].add_argument("--epochs", type=int, default=6)
    sub.choices["loso"].add_argument("--folds", help="only these fold numbers (0,1,...)")
    sub.choices["loso"].add_argument("--into", help="store the figures in this checkpoint")
    sub.choices["loso"].add_argument("--set", action="append", metavar="KEY=VALUE",
                                     help="override a recipe setting (ablations), e.g. "
                                     "augment_policy=basic, balanced_sampling=false")
    store = sub.add_parser("store-loso", help="store loso results printed in logs")
    store.add_argument("logs", nargs="+")
    store.add_argument("--into", required=True)
    store.add_argument("--variant", default="lungvit_t224")
    store.add_argument("--epochs", type=int, default=6)
    store.add_argument("--data", default="../shared/realdata")
    store.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not Path(args.data).is_dir():
        print(f"no data folder at {args.data}", file=sys.stderr)
        return 2
    return {"variants": cmd_variants, "evaluate": cmd_evaluate, "loso": cmd_loso,
            "store-loso": cmd_store_loso}[args.command](
        args, argv)


if __name__ == "__main__":
    sys.exit(main())
