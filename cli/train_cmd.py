"""``lungvit train``: fit a LungViT model on a folder of class folders.

Only argparse is imported at module level: ``lungvit.cli.main`` imports this module for
every command, so Lightning and the rest load when ``train`` actually runs.
"""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from lungvit.cli.runs_cmd import add_job_arguments, take_job_options
from lungvit.cli import exit_codes

_SHOW_UNREADABLE = 5  # unreadable files listed by name (the count is always printed)

# argparse destination -> TrainConfig field, for options whose names differ.
_FIELDS = {"from_model": "from_checkpoint", "val_every": "val_every_n_steps",
           "checkpoint_every": "checkpoint_every_n_steps", "loader_workers": "num_workers",
           "resume": "resume_from", "patience": "early_stopping_patience",
           "keep_best": "keep_best_k"}


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``train`` sub-command."""
    p = sub.add_parser(
        "train", help="train or fine-tune a model on a folder of labelled scans",
        description="Train a LungViT model on DIR (one sub-folder per class, or a CSV "
        "manifest), holding out a validation split (model selection, early stopping, "
        "calibration) and a test split (the reported metrics). Writes MODEL, a self-"
        "describing checkpoint for `lungvit predict` and the app, and a run folder with "
        "resumable checkpoints, logs, the split and the resolved configuration. Unreadable "
        "files are reported and skipped; the exit code is then 1.",
        )
    p.add_argument("--data", required=True, metavar="DIR", help="folder of class folders")
    p.add_argument("--out", required=True, metavar="MODEL",
                   help="checkpoint to write (.safetensors)")
    model = p.add_argument_group("model")
    model.add_argument("--variant", metavar="V", help="model variant, e.g. lungvit_tiny or "
                       "lungvit_s128 (default: lungvit_tiny, chosen by measurement; a wrong "
                       "name lists them)")
    model.add_argument("--from", dest="from_model", metavar="MODEL",
                       help="fine-tune from this checkpoint; its head is remapped by label")
    model.add_argument("--input-size", type=int, metavar="N",
                       help="input side in pixels (default: the variant's or checkpoint's)")
    model.add_argument("--freeze-stem-epochs", type=int, metavar="N",
                       help="keep the stem and early blocks frozen for N epochs")
    model.add_argument("--transfer", choices=("auto", "head", "llrd", "full"),
                       help="with --from: how much of the model trains. auto (default) "
                       "picks from the training images per class: under 50 the head and "
                       "last block (head), under 500 all layers with layer-wise learning-"
                       "rate decay (llrd), else all layers alike (full)")
    model.add_argument("--base-mix", type=float, metavar="W",
                       help="with --from: keep W x the base's weights + (1 - W) x the "
                       "fine-tuned ones (weight-space ensembling, 0 to <1; default 0.5: "
                       "keeps more of what the base learned on other sites)")
    model.add_argument("--distill", type=float, metavar="W",
                       help="with --from: weight of a term that keeps the fine-tune's answers "
                       "on its training images close to the base's (learning without "
                       "forgetting; default 1, 0: off)")
    model.add_argument("--compare-to", metavar="MODEL",
                       help="model to compare the result with on the test split (default: "
                       "the --from model)")
    model.add_argument("--grad-checkpointing", action="store_true", default=None,
                       help="trade compute for memory in the transformer blocks")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, metavar="N", help="maximum epochs (10)")
    opt.add_argument("--max-steps", type=int, metavar="N", help="maximum optimizer steps")
    opt.add_argument("--batch-size", type=int, metavar="N", help="images per device batch (32)")
    opt.add_argument("--global-batch", type=int, metavar="N",
                     help="images per optimizer step, by gradient accumulation")
    opt.add_argument("--lr", type=float, metavar="X", help="peak learning rate (1e-3)")
    opt.add_argument("--weight-decay", type=float, metavar="X", help="AdamW weight decay (0.05)")
    opt.add_argument("--warmup-steps", type=int, metavar="N",
                     help="linear warm-up steps (default: 5%% of all steps)")
    opt.add_argument("--label-smoothing", type=float, metavar="X", help="label smoothing (0)")
    opt.add_argument("--class-weighting", action="store_true", default=None,
                     help="weight the loss by inverse class frequency")
    opt.add_argument("--no-augment", dest="augment", action="store_false", default=None,
                     help="train without data augmentation")
    opt.add_argument("--augment-policy", choices=("basic", "acquisition"), metavar="P",
                     help="basic (small affine, brightness, contrast; the default) or "
                     "acquisition (also crops, aspect, gamma, blur, noise, resampling, JPEG "
                     "and borders, imitating other scanners and sites)")
    opt.add_argument("--balanced-sampling", action="store_true", default=None,
                     help="draw each class (and each source within a class) equally often")
    opt.add_argument("--precision", metavar="P",
                     help="auto (bf16/16-mixed on GPU, 32-true on CPU) or a Lightning precision")
    opt.add_argument("--seed", type=int, metavar="N", help="seed for weights and splits (0)")
    run = p.add_argument_group("evaluation, checkpoints and hardware")
    run.add_argument("--val-frac", type=float, metavar="X",
                     help="fraction of each class held out for validation (0.15)")
    run.add_argument("--test-frac", type=float, metavar="X",
                     help="fraction of each class held out for the final test (0.15)")
    run.add_argument("--val-every", type=int, metavar="N",
                     help="validate every N optimizer steps (default: each epoch)")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help="resumable checkpoint every N steps (default: at each validation)")
    run.add_argument("--keep-best", type=int, metavar="K", help="resumable checkpoints kept (3)")
    run.add_argument("--patience", type=int, metavar="N",
                     help="stop after N evaluations without a lower val loss; 0: never (5)")
    run.add_argument("--split", dest="split_manifest", metavar="CSV",
                     help="reuse this split file (path,label,split; e.g. the split.csv of an "
                     "earlier run) instead of drawing one: the same test scans on any machine")
    run.add_argument("--run-dir", metavar="DIR",
                     help="run folder (default: ~/.local/share/lungvit/runs/<MODEL name>/"
                     "version_<n>, under $LUNGVIT_HOME when set)")
    run.add_argument("--resume", metavar="CKPT", help="continue from a run's .ckpt file")
    run.add_argument("--loader-workers", type=int, metavar="N",
                     help="data loading and decoding processes (0: in this process)")
    run.add_argument("--cache-dir", metavar="DIR", help="preprocessing cache folder")
    run.add_argument("--accelerator", metavar="A", help="auto, cpu or gpu")
    run.add_argument("--devices", metavar="D", help="devices to use: auto, a count or 0,1,...")
    run.add_argument("--fast-dev-run", action="store_true", default=None,
                     help="one batch of each split: a quick check that everything runs")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    card = p.add_argument_group("model card")
    card.add_argument("--notes", metavar="TEXT", help="what this model is (stored in MODEL)")
    card.add_argument("--intended-use", metavar="TEXT", help="intended-use statement")
    card.add_argument("--cite", dest="citations", action="append", metavar="TEXT",
                      help="a citation of the training data (repeatable; shown on the card)")
    add_job_arguments(p)
    p.set_defaults(func=run_train)


def _devices(text: str | None) -> Any:
    if text is None or text == "auto":
        return text
    if "," in text:
        return [int(x) for x in text.split(",") if x]
    return int(text)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~lungvit.training.config.TrainConfig` the options describe."""
    from lungvit.training.config import TrainConfig

    values = {k: v for k, v in vars(args).items()
              if v is not None and k not in ("func", "command", "verbose", "quiet")}
    if "devices" in values:
        values["devices"] = _devices(values["devices"])
    return TrainConfig(**{_FIELDS.get(k, k): v for k, v in values.items()})


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*map(str, r)) for r in [header, *rows])


def describe_data(summary: dict[str, Any]) -> str:
    """The pre-training report: classes, images per split, unreadable and too-small."""
    counts = summary["counts"]
    rows = [[c, counts["train"][c], counts["val"][c], counts["test"][c], counts["total"][c]]
            for c in summary["classes"]]
    rows.append(["total", *(sum(counts[s].values()) for s in ("train", "val", "test", "total"))])
    lines = [f"data: {summary['root']}  ({summary['num_classes']} classes, "
             f"{summary['input_size']} px)",
             _table(rows, ["class", "train", "val", "test", "total"])]
    bad = summary["unreadable_files"]
    if bad:
        lines.append(f"unreadable: {len(bad)} file(s) skipped")
        lines += [f"  {path}: {reason}" for path, reason in bad[:_SHOW_UNREADABLE]]
        if len(bad) > _SHOW_UNREADABLE:
            lines.append(f"  ... and {len(bad) - _SHOW_UNREADABLE} more")
    for name, n in summary["too_small"].items():
        lines.append(f"left out: class {name} has only {n} readable image(s)")
    return "\n".join(lines)


def _fmt(x: float | None, pct: bool = False) -> str:
    if x is None:
        return "-"
    return f"{x:.1%}" if pct else f"{x:.3f}"


def describe_results(result: Any) -> str:
    """The post-training report: the test metrics table and where the model went."""
    test, raw = result.test_metrics, result.test_metrics_uncalibrated
    rows = [[name, _fmt(m["precision"]), _fmt(m["recall"]), _fmt(m["f1"]), _fmt(m["auc"]),
             m["support"]] for name, m in test["per_class"].items()]
    lines = [f"test split ({test['n']} images):",
             _table(rows, ["class", "precision", "recall", "f1", "auc", "n"]),
             f"accuracy {_fmt(test['acc'], True)}  top-5 {_fmt(test['top5'], True)}  "
             f"macro-F1 {_fmt(test['macro_f1'])}  balanced accuracy "
             f"{_fmt(test['balanced_acc'], True)}  macro-AUC {_fmt(test['macro_auc'])}",
             f"calibration: temperature {result.temperature:.3f}, ECE {_fmt(raw['ece'])} -> "
             f"{_fmt(test['ece'])}, NLL {_fmt(raw['loss'])} -> {_fmt(test['loss'])}",
             f"trained {result.epochs} epoch(s), {result.steps} step(s) in "
             f"{result.wall_time_s:.0f} s",
             f"run folder: {result.run_dir}",
             f"model: {result.checkpoint}"]
    return "\n".join(lines)


class _CacheProgress:
    """One self-updating line on a terminal, the final count otherwise (once per total)."""

    def __init__(self) -> None:
        self._finished: set[int] = set()

    def __call__(self, done: int, total: int) -> None:
        if total in self._finished:
            return
        message = f"reading scans: {done}/{total}"
        if done == total:
            self._finished.add(total)
        if sys.stderr.isatty():
            print("\r" + message, end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total:
            print(message, file=sys.stderr, flush=True)


def run_train(args: argparse.Namespace) -> int:
    """Report the data, train, report the test metrics; exit 1 if files were skipped."""
    job = take_job_options(args)
    if job is not None:  # --workers / --ray-address: a Ray Train job tracked in the store
        from lungvit.training.jobs.runner import run_cli_job

        return exit_codes.of_job(run_cli_job(config_from_args(args), job))
    from lungvit.training.learn.fit import fit
    from lungvit.training.learn.setup import build_datamodule, resolve_config

    # Lightning logs its set-up chatter (devices, tips) at INFO through its own handler;
    # show it only with --verbose, and only once (not again through the root logger).
    lightning_log = logging.getLogger("lightning.pytorch")
    lightning_log.propagate = False
    if not getattr(args, "verbose", False):
        lightning_log.setLevel(logging.WARNING)
    cfg = resolve_config(config_from_args(args))
    dm = build_datamodule(cfg, progress=_CacheProgress())
    summary = dm.summary()
    print(describe_data(summary), flush=True)
    print(f"model: {cfg.variant} at {cfg.input_size} px"
          + (f", fine-tuned from {cfg.from_checkpoint}" if cfg.from_checkpoint else "")
          + f"; run folder {cfg.run_dir}", flush=True)
    result = fit(cfg, datamodule=dm, progress=not args.quiet)
    if result.head_mapping and (result.head_mapping["new"] or result.head_mapping["dropped"]):
        m = result.head_mapping
        print(f"head remapped: kept {len(m['kept'])} label(s); new: "
              f"{', '.join(m['new']) or 'none'}; dropped: {', '.join(m['dropped']) or 'none'}")
    print(describe_results(result), flush=True)
    from lungvit.training.learn.transfer import describe_run

    print(describe_run(result.transfer, result.comparison), flush=True)
    if summary["unreadable"]:
        print(f"{summary['unreadable']} unreadable file(s) were skipped (listed above)",
              file=sys.stderr)
        return exit_codes.SOME_FAILED
    return exit_codes.OK
