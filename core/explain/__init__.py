"""Explanations users can check: attention rollout and Captum attributions, each scored.

Entry point: :func:`explain` (one scan, several methods, maps at the scan's resolution,
overlays, deletion/insertion AUC beside a random map's). The pieces are usable alone:
:mod:`.rollout` (pure rollout math and the attention capture), :mod:`.attributions`
(the methods), :mod:`.faithfulness` (deletion/insertion, model randomisation, pointing game)
and :mod:`.overlay` (colour maps in numpy).
"""
from __future__ import annotations

from lungvit.core.explain.api import Explanation, ExplanationSet, explain, render_overlay
from lungvit.core.explain.attributions import METHODS, AttributionContext, compute
from lungvit.core.explain.faithfulness import (
    faithfulness_verdict, lesion_share, pointing_hit, randomization_check,
)
from lungvit.core.explain.overlay import colormap, overlay
from lungvit.core.explain.rollout import capture_attention, rollout

__all__ = [
    "METHODS",
    "AttributionContext",
    "Explanation",
    "ExplanationSet",
    "capture_attention",
    "colormap",
    "compute",
    "explain",
    "faithfulness_verdict",
    "lesion_share",
    "overlay",
    "pointing_hit",
    "randomization_check",
    "render_overlay",
    "rollout",
]
