"""Is a finished job's model better than the one it would replace? Words for the app.

A job compares its model with its base model (the one it started from, or for a run from
scratch the model the session used when it started it) on its own frozen test split, and
stores the figures with its final metrics (``compare/...``, see
:func:`lungvit.training.learn.compare.comparison_scalars`). :func:`job_verdict` turns them into
a sentence and the reasons to ask the user before serving the model: it is not better,
the comparison rests on too few scans, there is no comparison at all, or it still gets
fewer than half of the test scans of one of the user's classes right (a better average
can hide a class it never learnt: a fine-tune on a new hospital's normals that still
calls every one of them a disease). Pure functions of the stored numbers, so the handlers
stay thin and the tests need no job.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

# Fewer compared test scans than this and a difference may well be chance (one scan of 29
# is 3.4 points); kept equal to lungvit.training.learn.compare.MIN_TEST_SCANS (a test checks it)
# without importing torch into the app's start-up.
MIN_TEST_SCANS = 30
# A class whose test scans the model gets fewer than this share of right is named.
MIN_CLASS_RECALL = 0.5


@dataclass(frozen=True)
class Verdict:
    """What the app says about a job's model before it is used.

    Attributes:
        text: Markdown: better / worse than the current model by how much on how many scans.
        warnings: reasons to confirm before using it (empty: no confirmation needed).
        better: the comparison's answer (None: no comparison).
        n_test: test scans compared.
    """

    text: str
    warnings: list[str] = field(default_factory=list)
    better: bool | None = None
    n_test: int = 0

    @property
    def needs_confirmation(self) -> bool:
        return bool(self.warnings)


def _num(final: Mapping[str, float], key: str) -> float | None:
    value = final.get(key)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def job_verdict(final: Mapping[str, float] | None, base_name: str | None = None,
                comparison: Mapping[str, object] | None = None) -> Verdict:
    """The verdict on a finished job from its stored final metrics.

    Args:
        final: the job's final metrics (``Store.final_metrics``).
        base_name: the model it was compared with (a file name), for the sentence.
        comparison: the job's comparison report (``compare_predictions``' dict), whose
            per-class recalls name the classes the model still mostly misses.

    Returns:
        The :class:`Verdict`. "Better" means a higher accuracy and a macro recall that is
        not lower on the compared scans.
    """
    final = final or {}
    who = f"the current model ({base_name})" if base_name else "the current model"
    n = _num(final, "compare/n_test")
    base, tuned = _num(final, "compare/base_acc"), _num(final, "compare/tuned_acc")
    if not n or base is None or tuned is None:
        return Verdict(f"No comparison with {who}: the job did not evaluate it on its test "
                       "split.", [f"This model could not be compared with {who}."])
    n_test = int(n)
    delta = tuned - base
    d_recall = _num(final, "compare/delta_macro_recall") or 0.0
    better = delta > 0 and d_recall >= 0
    how = (f"**No better than {who}**: the same accuracy" if delta == 0 else
           f"**{'Better' if delta > 0 else 'Worse'} than {who} by {abs(delta) * 100:.1f} "
           "points** of accuracy")
    text = (f"{how} on {n_test} test scans ({base:.1%} -> {tuned:.1%}); macro recall "
            f"{(_num(final, 'compare/base_macro_recall') or 0):.1%} -> "
            f"{(_num(final, 'compare/tuned_macro_recall') or 0):.1%}.")
    total = _num(final, "compare/n_test_total")
    if total and int(total) > n_test:
        text += (f" {int(total) - n_test} test scan(s) of classes {who} does not have were "
                 "left out of the comparison.")
    warnings = []
    if not better:
        warnings.append(f"It is not better than {who} on its test split"
                        + (" (its macro recall is lower)." if delta > 0 else "."))
    if n_test < MIN_TEST_SCANS:
        warnings.append(f"The comparison rests on only {n_test} test scans (fewer than "
                        f"{MIN_TEST_SCANS}): the difference may be chance.")
    warnings += missed_classes(comparison or {}, who)
    return Verdict(text, warnings, better, n_test)


def missed_classes(comparison: Mapping[str, object], who: str) -> list[str]:
    """A warning per class of the test split whose scans the fine-tuned model gets fewer
    than :data:`MIN_CLASS_RECALL` of right (with the base's share where it has the class)."""
    def recalls(key: str) -> Mapping[str, float]:
        part = comparison.get(key)
        return (part.get("recall") or {}) if isinstance(part, Mapping) else {}

    tuned, base = recalls("tuned_all"), recalls("base")
    out = []
    for label, recall in sorted(tuned.items()):
        if recall < MIN_CLASS_RECALL:
            was = (f"; {who} got {base[label]:.0%}" if label in base else "")
            out.append(f"It gets only {recall:.0%} of the test scans of {label} right{was}.")
    return out


def warning_markdown(verdict: Verdict) -> str:
    """The verdict's sentence, then its warnings as a list the user must acknowledge."""
    if not verdict.warnings:
        return verdict.text
    items = "\n".join(f"- {w}" for w in verdict.warnings)
    return (f"{verdict.text}\n\n**Before you use this model:**\n{items}\n\nTick *use it "
            "anyway* to switch to it all the same.")
