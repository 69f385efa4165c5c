"""A Markdown model card from a checkpoint's header: what the model is and what it is not."""
from __future__ import annotations

import re
from typing import Any

from lungvit.core.model.checkpoint import CheckpointInfo

__all__ = ["model_card"]

_DEMO = re.compile(r"\b(demo|synthetic|phantom)", re.IGNORECASE)


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not recorded"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def _per_class_table(per_class: dict[str, dict[str, Any]], labels: tuple[str, ...]) -> list[str]:
    columns: list[str] = []
    for row in per_class.values():
        columns += [c for c in row if c not in columns]
    lines = ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    order = [x for x in labels if x in per_class] + [x for x in per_class if x not in labels]
    for label in order:
        cells = [_fmt(per_class[label].get(c, "")) for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def _sources_table(class_sources: dict[str, dict[str, int]], labels: tuple[str, ...]
                   ) -> list[str]:
    lines = ["| class | training images | from sources |", "|---|---|---|"]
    for label in labels:
        per = class_sources.get(label, {})
        lines.append(f"| {label} | {sum(per.values())} | "
                     + (", ".join(f"{s} {n}" for s, n in per.items()) or "none") + " |")
    return lines


def _within_source(result: dict[str, Any]) -> list[str]:
    lines = ["### Within source: the frozen test split", "",
             f"{result.get('n')} held-out scans ({result.get('split', 'test split')}): "
             f"macro recall {_fmt(result.get('macro_recall'))}, accuracy "
             f"{_fmt(result.get('acc'))}, ECE {_fmt(result.get('ece_uncalibrated'))} before and "
             f"{_fmt(result.get('ece'))} after calibration.", ""]
    by_source = result.get("recall_by_source", {})
    rows = ["| class | precision | recall | n | recall by source |", "|---|---|---|---|---|"]
    for label, m in result.get("per_class", {}).items():
        src = ", ".join(f"{s} {_fmt(v.get('recall'))} (n={v.get('n')})"
                        for s, v in by_source.get(label, {}).items())
        rows.append(f"| {label} | {_fmt(m.get('precision'))} | {_fmt(m.get('recall'))} | "
                    f"{m.get('support')} | {src} |")
    return lines + rows + [""]


def _cross_source(result: dict[str, Any]) -> list[str]:
    lines = ["### Across sources: leave one source out", "",
             "For each class with two or more sources, a model of the same recipe "
             f"({result.get('variant', 'same variant')}, {result.get('epochs', '?')} epochs) "
             "was trained with one source left out and scored on that source's scans (an "
             "estimate of how the model does on a hospital it has not seen). Macro recall "
             f"over the held-out (class, source) pairs: {_fmt(result.get('macro_recall'))}.",
             "",
             "| class | held-out source | recall | n |", "|---|---|---|---|"]
    for pair in result.get("pairs", []):
        lines.append(f"| {pair.get('class')} | {pair.get('held_out_source')} | "
                     f"{_fmt(pair.get('recall'))} | {pair.get('n')} |")
    return lines + [""]


def _out_of_scope(info: CheckpointInfo) -> list[str]:
    """The learned out-of-scope detector's section (empty for checkpoints without one)."""
    det = info.ood_detector
    if det is None:
        return []
    ood = info.metrics.get("ood", {}) if isinstance(info.metrics, dict) else {}
    rates = ood.get("features", {}) if isinstance(ood, dict) else {}
    line = (f"- Learned detector: Mahalanobis distance of the [CLS] feature to the nearest "
            f"of {len(det.labels)} training classes ({det.n_train} training scans); scans "
            f"beyond {_fmt(det.threshold)} ({det.quantile:.0%} of {det.n_val} validation "
            "scans) are flagged as unlike the training data")
    shares = [f"{rates[k]:.1%} of {split} scans" for k, split in
              (("val_flag_rate", "validation"), ("test_flag_rate", "test"))
              if isinstance(rates.get(k), (int, float))]
    return ["## Out-of-scope detection", "", line + (f"; it flags {' and '.join(shares)}"
                                                    if shares else "") + ".", ""]


def model_card(info: CheckpointInfo) -> str:
    """Render ``info`` as a Markdown model card.

    Args:
        info: a checkpoint header (:func:`lungvit.core.model.checkpoint.read_checkpoint_info`).

    Returns:
        The card as Markdown text.
    """
    cfg, prov, pre = info.model, info.provenance, info.preprocess
    is_demo = bool(_DEMO.search(" ".join((info.notes, info.intended_use, prov.dataset))))
    out = [f"# LungViT model card: {info.variant or 'unnamed model'}", ""]
    if is_demo:
        out += ["> **Demonstration model: not for clinical use.** It was not trained or "
                "validated on patient data; its predictions say nothing about a patient.", ""]
    out += ["## Model", ""]
    if cfg is not None:
        out += [f"- Architecture: Vision Transformer with a convolutional stem (timm), "
                f"variant `{cfg.name}`",
                f"- Encoder: {cfg.depth} blocks, width {cfg.embed_dim}, {cfg.num_heads} heads "
                f"x {cfg.head_dim}, MLP {cfg.mlp_dim} ({cfg.act.upper()}); "
                f"{cfg.grid_size[0]}x{cfg.grid_size[1]} tokens + [CLS]"]
    if info.num_params is not None:
        out.append(f"- Parameters: {info.num_params:,}")
    if pre is not None:
        chans = cfg.in_chans if cfg else 1
        out.append(f"- Input: {pre.input_size}x{pre.input_size} px, {chans} channel"
                   f"{'s' if chans != 1 else ''} (grayscale); whole frame resized, scaled to "
                   f"[0, 1], normalised with mean {pre.mean} and std {pre.std}")
    out += ["", "## Classes", "", *[f"{i}. `{label}`" for i, label in enumerate(info.labels)], "",
            "The model answers with these classes only: anything else on a scan (another "
            "finding, another organ) is outside what it can say.", ""]

    out += ["## Training", "",
            f"- Data: {prov.dataset or 'not recorded'}"]
    if prov.class_counts:
        counts = ", ".join(f"{k} {v}" for k, v in prov.class_counts.items())
        out.append(f"- Images per class: {counts} (total {sum(prov.class_counts.values())})")
    if prov.dataset_fingerprint:
        out.append(f"- Data fingerprint: `{prov.dataset_fingerprint}`")
    if prov.class_sources:
        out += ["", "Training images by class and source:", "",
                *_sources_table(prov.class_sources, info.labels), ""]
    if prov.citations:
        out += ["", "Training data (cite these when you use this model):", "",
                *[f"- {c}" for c in prov.citations], ""]
    out += [f"- Epochs: {prov.epochs if prov.epochs is not None else 'not recorded'}",
            f"- Training time: {_duration(prov.train_time_s)}",
            f"- Hardware: {prov.gpu_type or 'CPU / not recorded'}; GPUs: {prov.gpu_count}",
            f"- Checkpoint written: {prov.date or 'date unknown'}, LungViT "
            f"{prov.lungvit_version or 'version unknown'}"]
    if prov.source:
        out.append(f"- Source: {prov.source}")
    out.append("")

    metrics = dict(info.metrics)
    ece = metrics.get("ece")
    out += ["## Evaluation", ""]
    if isinstance(metrics.get("within_source_test"), dict):
        out += _within_source(metrics.pop("within_source_test"))
    if isinstance(metrics.get("cross_source"), dict):
        out += _cross_source(metrics.pop("cross_source"))
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}
    out += [f"- {k}: {_fmt(v)}" for k, v in scalars.items()]
    for key, value in metrics.items():  # nested results, e.g. "val": {...}, "test": {...}
        nested = {k: v for k, v in value.items() if isinstance(v, (int, float))} \
            if isinstance(value, dict) else {}
        if nested and key != "per_class":
            out.append(f"- {key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in nested.items()))
    # Per-class results at the top level, else from the first nested result holding them.
    sources = [("", metrics)] + [(k, v) for k, v in metrics.items() if isinstance(v, dict)]
    for key, source in sources:
        if isinstance(source.get("per_class"), dict) and source["per_class"]:
            out += ["", f"Per class{f' ({key})' if key else ''}:", "",
                    *_per_class_table(source["per_class"], info.labels)]
            break
    if len(out) == out.index("## Evaluation") + 2:
        out.append("No evaluation results are recorded in this checkpoint.")
    out += ["", "## Calibration", "",
            f"- Softmax temperature: {_fmt(info.temperature)}"
            + (" (uncalibrated)" if info.temperature == 1.0 else ""),
            f"- Expected calibration error: {_fmt(ece) if ece is not None else 'not recorded'}",
            "", *_out_of_scope(info), "## Intended use and limits", ""]
    if info.intended_use:
        out.append(info.intended_use)
    elif is_demo:
        out.append("Demonstrating the LungViT software (upload, prediction, explanations, "
                   "fine-tuning). Not a medical device; do not use for diagnosis.")
    else:
        out.append("Research use. Not a medical device: a prediction is not a diagnosis.")
    if info.notes:
        out += ["", info.notes]
    return "\n".join(out) + "\n"
