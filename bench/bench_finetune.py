"""Does fine-tuning by transfer help? Base model vs fine-tuned, on scans never trained on.

From a base model (default: the bundled model) and a folder of real scans whose file names
say their source (``SOURCE__name.png``, as in ``../shared/realdata``), this builds a small
fine-tuning set the way a user would bring one, and measures both models on scans the
fine-tune never saw:

1. For each of ``--classes`` (default four chest X-ray classes), ``--per-class`` scans
   (default 20) for training plus ``--val-per-class`` for validation and
   ``--test-per-class`` for the job's own test split, drawn by patient (a patient's scans
   stay together) from the class's sources except the held-out one.
2. ``--holdout CLASS=SOURCE`` (default ``lung-normal=meddef1``) keeps that source of that
   class out of the fine-tune entirely; ``--holdout none`` keeps nothing out (the "new
   hospital" case: a base that never saw a source, fine-tuned on scans that include it,
   scored per source on that source's unseen scans).
3. The fine-tune is ``lungvit.training.learn.fit.fit`` from the base with the default transfer
   policy (``--transfer`` to force one; several, comma-separated, are run one after the
   other on the same split) and the base's share of the kept weights ``--base-mix``
   (``TrainConfig.base_mix``; several, comma-separated, likewise) and the weight of the
   distillation term ``--distill`` (``TrainConfig.distill``, likewise).
4. Both models then read, through the app's decoding path (:class:`Predictor`), up to
   ``--eval-per-class`` unseen scans per class from the training sources (patients not
   used in the fine-tune at all) and up to as many scans of the held-out source. The base
   answers with its own label list; only scans of classes the base has are compared (the
   fine-tuned model's figures on every scan are given too).

A base model trained on this very folder has seen most of its scans: give its run's
``split.csv`` as ``--base-split`` and only the scans of its *test* split (and scans it never
listed) are used, so "unseen" is unseen by both models. Without it the report says when
the base's card names the folder, since the comparison then favours the base.

Prints a Markdown table (``--out FILE`` also writes it). Example::

    python bench/bench_finetune.py --base assets/lungvit-demo.safetensors --out /tmp/ft.md
"""
from __future__ import annotations

import argparse
import csv
import os
import platform
import random
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from lungvit.core.model.checkpoint import read_checkpoint_info
from lungvit.core.predict import Predictor, bundled_model_path
from lungvit.training.learn.compare import compare_predictions
from lungvit.training.config import TrainConfig
from lungvit.training.data.discover import Sample, discover
from lungvit.training.learn.fit import fit

DEFAULT_CLASSES = ("lung-covid", "lung-normal", "lung-tuberculosis", "lung-viral-pneumonia")


def default_base() -> Path | None:
    """The bundled model, else the phantom-trained demo model shipped beside it."""
    path = bundled_model_path()
    if path is not None:
        return path
    import lungvit.assets

    demo = Path(lungvit.assets.__file__).parent / "lungvit-demo.safetensors"
    return demo if demo.is_file() else None


def _groups(samples: Sequence[Sample], seed: int) -> list[list[Sample]]:
    """Samples grouped by patient (no key: a group of one), in a seeded random order."""
    by: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        by[s.patient_key or f"file:{s.path}"].append(s)
    groups = [by[k] for k in sorted(by)]
    random.Random(seed).shuffle(groups)
    return groups


def _take(groups: list[list[Sample]], n: int) -> list[Sample]:
    """Whole patient groups off the front of ``groups`` until ``n`` scans (or none left)."""
    out: list[Sample] = []
    while groups and len(out) < n:
        out += groups.pop(0)
    return out


def build_sets(samples: Sequence[Sample], classes: Sequence[str], holdout: dict[str, str], *,
               per_class: int, val: int, test: int, eval_per_class: int, seed: int
               ) -> dict[str, list[Sample]]:
    """The fine-tune's train/val/test scans and the unseen evaluation sets.

    Returns:
        ``{"train", "val", "test", "unseen", "held_out"}``: lists of samples. ``unseen`` are
        scans of the training sources from patients the fine-tune never saw; ``held_out``
        are scans of the held-out sources.
    """
    sets: dict[str, list[Sample]] = defaultdict(list)
    for c in classes:
        mine = [s for s in samples if s.label == c]
        held = [s for s in mine if holdout.get(c) == s.source]
        groups = _groups([s for s in mine if holdout.get(c) != s.source], seed)
        for split, n in (("train", per_class), ("val", val), ("test", test)):
            sets[split] += _take(groups, n)
        sets["unseen"] += _take(groups, eval_per_class)[:eval_per_class]
        sets["held_out"] += _take(_groups(held, seed), eval_per_class)[:eval_per_class]
    return dict(sets)


def write_dataset(root: Path, sets: dict[str, list[Sample]]) -> Path:
    """Link the train/val/test scans into ``root/<class>/`` and write their split manifest.

    ``root`` is emptied first: a scan left from an earlier selection would join training.

    Returns:
        The split manifest, ``root.parent / "split.csv"``.
    """
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    rows = []
    for split in ("train", "val", "test"):
        for s in sets[split]:
            link = root / s.label / Path(s.path).name
            link.parent.mkdir(exist_ok=True)
            if not link.exists():
                link.symlink_to(Path(s.path).resolve())
            rows.append((f"{s.label}/{link.name}", s.label, split))
    manifest = root.parent / "split.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(("path", "label", "split"))
        writer.writerows(sorted(rows))
    return manifest


def base_seen(split_csv: str | Path) -> set[str]:
    """Relative paths the base model trained or validated on (its run's split.csv)."""
    with open(split_csv, newline="", encoding="utf-8-sig") as f:
        return {row["path"] for row in csv.DictReader(f) if row["split"] in ("train", "val")}


def _caution(info: Any, data: str) -> str:
    named = Path(data).name and Path(data).name in (info.provenance.dataset or "")
    return ("**Caution:** the base model's card says it was trained on this folder and no "
            "`--base-split` was given: some 'unseen' scans may be scans it trained on, which "
            "favours the base." if named else
            "The base model's card does not name this folder as its training data.")


def predict_labels(model: str | Path, samples: Sequence[Sample]) -> list[str | None]:
    """The model's answer for each scan, decoded as the app decodes (None: unreadable)."""
    predictor = Predictor.from_checkpoint(model)
    return [getattr(p, "label", None) for p in predictor.predict_files([s.path for s in samples])]


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def _pts(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:+.1f}"


def _recalls(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{c} {r:.0%}" for c, r in metrics["recall"].items()) or "-"


def recall_by_source(samples: Sequence[Sample], predicted: Sequence[str | None]
                     ) -> dict[str, dict[str, tuple[float, int]]]:
    """Recall per class and source, only for classes drawn from two or more sources.

    Returns:
        ``{class: {source: (recall, n)}}``; an unreadable scan (None) counts as wrong.
    """
    hits: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for s, p in zip(samples, predicted):
        cell = hits[s.label][s.source]
        cell[0] += int(p == s.label)
        cell[1] += 1
    return {c: {src: (h / n, n) for src, (h, n) in sorted(by.items())}
            for c, by in sorted(hits.items()) if len(by) >= 2}


def _source_note(name: str, samples: Sequence[Sample], base: Sequence[str | None],
                 tuned: Sequence[str | None]) -> list[str]:
    b, t = recall_by_source(samples, base), recall_by_source(samples, tuned)
    return [f"- Recall of {c} by source, {name}: " + "; ".join(
        f"{src} (n={n}) base {r:.0%} -> fine-tuned {t[c][src][0]:.0%}"
        for src, (r, n) in by.items()) + "." for c, by in b.items()]


def table_rows(name: str, comparison: dict[str, Any]) -> list[str]:
    """Markdown rows: the compared scans, then the fine-tuned model on all of them."""
    b, t, d = comparison["base"], comparison["tuned"], comparison["delta"] or {}
    rows = [f"| {name} | {comparison['n_test']} | {_pct(b['acc'])} | {_pct(t['acc'])} | "
            f"{_pts(d.get('acc'))} | {_pct(b['macro_recall'])} | {_pct(t['macro_recall'])} | "
            f"{_pts(d.get('macro_recall'))} |"]
    if comparison["n_test_total"] != comparison["n_test"]:
        a = comparison["tuned_all"]
        rows.append(f"| {name}, every class (tuned only) | {a['n']} | - | {_pct(a['acc'])} | - "
                    f"| - | {_pct(a['macro_recall'])} | - |")
    return rows


def run(args: argparse.Namespace, argv: list[str]) -> str:
    """Build the sets, fine-tune with each policy asked for, evaluate, return the table."""
    base = Path(args.base) if args.base else default_base()
    if base is None or not base.is_file():
        raise SystemExit(f"bench_finetune: no base model at {args.base or 'the bundled path'}")
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    holdout = dict(h.split("=", 1) for h in args.holdout if h != "none")
    index = discover(args.data, min_per_class=1)
    samples, excluded = index.samples, 0
    if args.base_split:
        seen = base_seen(args.base_split)
        samples = [s for s in index.samples if index.relpath(s.path) not in seen]
        excluded = len(index.samples) - len(samples)
    sets = build_sets(samples, classes, holdout, per_class=args.per_class,
                      val=args.val_per_class, test=args.test_per_class,
                      eval_per_class=args.eval_per_class, seed=args.seed)
    work = Path(args.work)
    manifest = write_dataset(work / "data", sets)
    base_info = read_checkpoint_info(base)
    base_labels = list(base_info.labels)
    true = {k: [s.label for s in sets[k]] for k in ("unseen", "held_out")}
    base_pred = {k: predict_labels(base, sets[k]) for k in true}

    lines = ["# Fine-tuning by transfer: base vs fine-tuned on unseen real scans", "",
             f"Command: `python bench/bench_finetune.py {' '.join(argv)}`  ",
             f"Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; machine: "
             f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}, "
             f"{torch.get_num_threads()} thread(s)", "",
             f"Base model: `{base.name}` ({base_info.model.name if base_info.model else '?'}, "
             f"{len(base_labels)} classes: {', '.join(base_labels)}).  ",
             f"Fine-tuning set from `{args.data}`: classes {', '.join(classes)}; per class "
             f"{args.per_class} training, {args.val_per_class} validation and "
             f"{args.test_per_class} test scans (the job's own test split), by patient.  ",
             "Held out of the fine-tune entirely: "
             + (", ".join(f"{c} from {s}" for c, s in holdout.items()) or "nothing") + ".  ",
             f"Recipe: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, seed "
             f"{args.seed}, basic augmentation, best validation loss kept.  ",
             f"Scans the base trained or validated on ({args.base_split}): {excluded} left out."
             if args.base_split else _caution(base_info, args.data), ""]
    runs = [(policy, float(mix), float(kd)) for policy in args.transfer.split(",")
            for mix in args.base_mix.split(",") for kd in args.distill.split(",")]
    for policy, mix, kd in runs:
        tag = f"{policy}-mix{mix:g}-distill{kd:g}"
        cfg = TrainConfig(data=str(work / "data"), out=str(work / f"tuned-{tag}.safetensors"),
                          from_checkpoint=str(base), transfer=policy, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          split_manifest=str(manifest), run_dir=str(work / f"run-{tag}"),
                          cache_dir=args.cache_dir or str(work / "cache"), min_per_class=1,
                          early_stopping_patience=args.patience, max_steps=args.max_steps,
                          base_mix=mix, distill=kd)
        shutil.rmtree(cfg.run_dir, ignore_errors=True)
        started = time.perf_counter()
        result = fit(cfg, progress=False)
        seconds = time.perf_counter() - started
        counts = result.data["counts"]
        lines += [f"## Transfer policy `{result.transfer['name']}` (asked: {policy}), base "
                  f"mix {mix:g}, distillation {kd:g}", "",
                  f"{result.transfer['reason']}; {result.epochs} epochs, {result.steps} steps, "
                  f"{seconds:.0f} s in all. Split: train {sum(counts['train'].values())}, "
                  f"val {sum(counts['val'].values())}, test {sum(counts['test'].values())}.", "",
                  "| scans | n | base acc | tuned acc | Δ acc (points) | base macro recall "
                  "| tuned macro recall | Δ macro recall (points) |",
                  "|---|---|---|---|---|---|---|---|"]
        job = result.comparison or {}
        if job.get("base") is not None:
            lines += table_rows("the job's own test split", job)
        notes = []
        for key, name in (("unseen", "unseen scans, training sources"),
                          ("held_out", "held-out source(s)")):
            if not sets[key]:
                continue
            tuned = predict_labels(result.checkpoint, sets[key])
            comparison = compare_predictions(base_pred[key], [t or "" for t in tuned],
                                             true[key], base_labels)
            lines += table_rows(name, comparison)
            notes.append(f"- Recall per class, {name}: base "
                         f"{_recalls(comparison['base'])}; fine-tuned "
                         f"{_recalls(comparison['tuned'])}.")
            notes += _source_note(name, sets[key], base_pred[key], tuned)
        lines += ["", *notes, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python bench/bench_finetune.py [--base MODEL] [--data DIR] [--out FILE] ...``"""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", help="the base model (default: the bundled model)")
    p.add_argument("--data", default="../shared/realdata",
                   help="folder of class folders of SOURCE__name scans")
    p.add_argument("--classes", default=",".join(DEFAULT_CLASSES),
                   help="comma-separated classes of the fine-tuning set")
    p.add_argument("--holdout", action="append", metavar="CLASS=SOURCE",
                   default=None, help="keep this source of this class out of the fine-tune "
                   "(repeatable; default lung-normal=meddef1; 'none' keeps nothing out)")
    p.add_argument("--base-split", metavar="CSV",
                   help="the base model's run split.csv: its train/val scans are not used")
    p.add_argument("--per-class", type=int, default=20, help="training scans per class (20)")
    p.add_argument("--val-per-class", type=int, default=10)
    p.add_argument("--test-per-class", type=int, default=10)
    p.add_argument("--eval-per-class", type=int, default=100,
                   help="unseen scans per class (and of each held-out source) scored (100)")
    p.add_argument("--transfer", default="auto",
                   help="policy or comma-separated policies: auto, head, llrd, full")
    p.add_argument("--base-mix", default=str(TrainConfig.base_mix),
                   help="the base's share of the kept weights (TrainConfig.base_mix); "
                   "several, comma-separated, are run one after the other (default: "
                   "TrainConfig's)")
    p.add_argument("--distill", default=str(TrainConfig.distill),
                   help="weight of the distillation term (TrainConfig.distill); several, "
                   "comma-separated, are each measured on the same split")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--patience", type=int, default=10, help="early-stopping patience (10)")
    p.add_argument("--max-steps", type=int, help="cap optimizer steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default="/tmp/lungvit-bench-finetune")
    p.add_argument("--cache-dir", help="preprocessing cache (default: under --work)")
    p.add_argument("--out", help="also write the Markdown table here")
    args = p.parse_args(argv)
    if args.holdout is None:
        args.holdout = ["lung-normal=meddef1"]
    text = run(args, argv)
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
