"""Is a map telling the truth? Deletion/insertion AUC, model randomisation, pointing game.

* Deletion / insertion (Petsiuk et al., 2018): pixels are removed (set to the black
  baseline) or added (onto a blurred copy) in the map's order, most-attributed first, on the
  model's input, in cells of one token's stride (Samek et al., 2017 remove regions too); the
  target-class probability is tracked and its area under the curve over the fraction 0..1
  is reported. A faithful map gives a *low* deletion AUC and a *high* insertion AUC, each
  compared with random orderings of the same cells. All steps of all maps go through the
  model in a few batched forward passes.
* Model randomisation (Adebayo et al., 2018): recompute the map on a copy of the model whose
  weights are re-initialised; a map that barely changes explains the image, not the model.
* Pointing game / energy share: the share of the map's positive mass inside a known lesion.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from lungvit.core.stats import average_ranks

# ----------------------------------------------------------------------------- deletion / insertion


@dataclass
class Curve:
    """One deletion or insertion curve: probability at each removed/added fraction."""

    fractions: np.ndarray  # (K+1,)
    probs: np.ndarray  # (K+1,)

    @property
    def auc(self) -> float:
        return float(np.trapezoid(self.probs, self.fractions))


def _ranks(saliency: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rank of each pixel (0 = most attributed); ties broken at random, reproducibly."""
    flat = saliency.reshape(-1).double()
    span = float(flat.max() - flat.min()) if flat.numel() else 0.0
    jitter = torch.rand(flat.shape, generator=generator, dtype=torch.float64) * (span * 1e-9 + 1e-30)
    order = torch.argsort(flat + jitter, descending=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    return ranks


def perturbation_batch(x: torch.Tensor, saliency: torch.Tensor, *, baseline: torch.Tensor,
                       start: torch.Tensor, steps: int, patch: int = 1,
                       seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The deletion and insertion image sequences for one map.

    Pixels are removed in square cells of ``patch`` pixels (the map averaged over each
    cell): every map, random ones included, is then scored at the same granularity. Pixel
    granularity (``patch=1``) favours scattered orderings, whose salt-and-pepper deletions
    push the input off the training distribution faster than any contiguous region does.

    Args:
        x: (1, C, S, S) input.
        saliency: (S, S) map at input resolution; higher = more important.
        baseline: (1, C, S, S) what deleted pixels become.
        start: (1, C, S, S) the insertion start image.
        steps: number of steps K; fractions of cells are 0, 1/K, ..., 1.
        patch: side of the cells, in input pixels (must divide S).

    Returns:
        ((K+1, C, S, S) deletion images, (K+1, C, S, S) insertion images).
    """
    s_h, s_w = x.shape[-2:]
    if tuple(saliency.shape) != (s_h, s_w):
        raise ValueError(f"saliency shape {tuple(saliency.shape)} does not match input {(s_h, s_w)}")
    if patch < 1 or s_h % patch or s_w % patch:
        raise ValueError(f"patch {patch} does not tile a {s_h} x {s_w} input")
    cells = torch.nn.functional.avg_pool2d(saliency.float().cpu()[None, None], patch)[0, 0]  # (S/p, S/p)
    g = torch.Generator().manual_seed(seed)
    ranks = _ranks(cells, g).to(x.device)  # (cells,)
    n = ranks.numel()
    counts = torch.round(torch.linspace(0, n, steps + 1, device=x.device)).long()  # (K+1,)
    chosen = (ranks[None, :] < counts[:, None]).reshape(steps + 1, 1, s_h // patch, s_w // patch)
    chosen = chosen.repeat_interleave(patch, dim=2).repeat_interleave(patch, dim=3)  # (K+1, 1, S, S)
    deletion = torch.where(chosen, baseline, x)
    insertion = torch.where(chosen, x, start)
    return deletion, insertion


@torch.no_grad()
def target_probs(model: nn.Module, images: torch.Tensor, target: int, *, temperature: float = 1.0,
                 batch_size: int = 64) -> np.ndarray:
    """Softmax probability of ``target`` for each image, in batches."""
    out = []
    for i in range(0, images.shape[0], batch_size):
        logits = model(images[i:i + batch_size]).float()
        out.append(torch.softmax(logits / temperature, dim=-1)[:, target].cpu())
    return torch.cat(out).numpy()


def random_maps(shape: tuple[int, int], seeds: Sequence[int]) -> list[torch.Tensor]:
    """Uniform random maps (one per seed): a random pixel order."""
    return [torch.rand(shape, generator=torch.Generator().manual_seed(1000 + s)) for s in seeds]


def deletion_insertion(model: nn.Module, x: torch.Tensor, saliencies: Sequence[torch.Tensor], target: int, *,
                       baseline: torch.Tensor, start: torch.Tensor, steps: int = 16, patch: int = 1,
                       temperature: float = 1.0, batch_size: int = 64) -> list[tuple[Curve, Curve]]:
    """Deletion and insertion curves of several maps in shared batched forwards.

    The curves' end points are the same images for every map (the input, the baseline, the
    insertion start), so they are evaluated once: ``3 + 2 (K - 1)`` images per map set,
    not ``2 (K + 1)`` per map.

    Args:
        saliencies: (S, S) maps at input resolution.
        patch: cell side in pixels (see :func:`perturbation_batch`).

    Returns:
        Per map, (deletion curve, insertion curve).
    """
    if not saliencies:
        return []
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}")
    seqs = [x, baseline, start]
    for i, sal in enumerate(saliencies):
        d, ins = perturbation_batch(x, torch.as_tensor(sal, dtype=torch.float32), baseline=baseline,
                                    start=start, steps=steps, patch=patch, seed=i)
        seqs += [d[1:-1], ins[1:-1]]  # the inner steps; the ends are shared
    probs = target_probs(model, torch.cat(seqs), target, temperature=temperature, batch_size=batch_size)
    p_x, p_base, p_start = probs[:3]
    inner = probs[3:].reshape(len(saliencies), 2, steps - 1)
    fr = np.linspace(0.0, 1.0, steps + 1)
    return [(Curve(fr, np.r_[p_x, p[0], p_base]), Curve(fr, np.r_[p_start, p[1], p_x])) for p in inner]


# Verdicts on a map beside the random maps' scores (see faithfulness_verdict).
BETTER, NO_BETTER, WORSE = "better than random", "no better than random", "worse than random"
VERDICT_MARGIN = 0.02


def faithfulness_gain(scores: dict[str, float]) -> float:
    """How much more a map's ordering moves the model than a random ordering does.

    ``(insertion - deletion) - (random insertion - random deletion)``: positive when the
    map's most-attributed cells take the probability away faster and give it back faster
    than random cells. NaN when a score is missing.
    """
    keys = ("deletion_auc", "insertion_auc", "random_deletion_auc", "random_insertion_auc")
    d, i, rd, ri = (float(scores.get(k, float("nan"))) for k in keys)
    return (i - d) - (ri - rd)


def faithfulness_verdict(scores: dict[str, float], margin: float = VERDICT_MARGIN) -> str | None:
    """"better than random", "no better than random" or "worse than random".

    The rule: a gain (:func:`faithfulness_gain`) above ``+margin`` is better than random,
    below ``-margin`` worse, anything between no better (the random maps' own spread is
    of that order on a 16-step curve).

    Args:
        scores: an explanation's ``faithfulness`` numbers.
        margin: the band around the random maps' score that counts as no different.

    Returns:
        The verdict, or None when the map was not scored.
    """
    gain = faithfulness_gain(scores)
    if np.isnan(gain):
        return None
    if gain > margin:
        return BETTER
    return WORSE if gain < -margin else NO_BETTER


# ----------------------------------------------------------------------------- randomisation


def spearman(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> float:
    """Spearman rank correlation of two maps (average ranks for ties); NaN if one is constant."""
    ra, rb = (average_ranks(torch.as_tensor(np.asarray(v, dtype=np.float64).ravel())).numpy()
              for v in (a, b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(np.sqrt((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def _reinit(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (and its children) in place, reproducibly.

    Modules with ``reset_parameters`` use their own initialiser; parameters owned by modules
    without one (timm's ``cls_token``, ``pos_embed``, layer scales) are drawn from N(0, 0.02).
    The global RNG is forked, so the caller's random state is left as it was.
    """
    from lungvit.core.explain.attributions import seeded

    with seeded(seed), torch.no_grad():
        for m in module.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
            else:
                for p in m.parameters(recurse=False):
                    p.normal_(0.0, 0.02)
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()


def cascade_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Top-down layers for a cascading randomisation: head, final norm, blocks, embedding."""
    layers: list[tuple[str, nn.Module]] = []
    for name in ("head", "fc_norm", "norm"):
        m = getattr(model, name, None)
        if isinstance(m, nn.Module) and any(True for _ in m.parameters()):
            layers.append((name, m))
    blocks = getattr(model, "blocks", [])
    for i in reversed(range(len(blocks))):
        layers.append((f"blocks.{i}", blocks[i]))
    if isinstance(getattr(model, "patch_embed", None), nn.Module):
        layers.append(("patch_embed", model.patch_embed))
    return layers


@dataclass
class RandomizationResult:
    """Spearman correlation between the original map and maps of randomised models.

    Attributes:
        correlations: ``{step: rho}``; for ``mode="all"`` one step named "all", for
            ``mode="cascade"`` one per layer randomised so far (head first).
        passed: every |rho| is below the threshold used (a NaN, from a constant map, fails:
            nothing can be concluded from it).
    """

    correlations: dict[str, float]
    threshold: float

    @property
    def passed(self) -> bool:
        return all(abs(r) < self.threshold for r in self.correlations.values())  # NaN < t is False


def randomization_check(model: nn.Module, x: torch.Tensor, method: str | Callable[[nn.Module], np.ndarray], *,
                        target: int | None = None, mode: str = "all", seed: int = 0, threshold: float = 0.5,
                        **options: object) -> RandomizationResult:
    """Model-randomisation sanity check for one method on one input.

    The served model is never touched: a deep copy is re-initialised (all at once, or
    cascading from the head down), the map recomputed for the same target, and ranked
    against the original.

    Args:
        model: the model in eval mode.
        x: (1, C, S, S) normalised input.
        method: a registered method name, or a callable ``model -> map``.
        target: class to explain (default: the original model's prediction).
        mode: "all" or "cascade".
        options: passed to the method.
    """
    from lungvit.core.explain.attributions import AttributionContext, compute

    if mode not in ("all", "cascade"):
        raise ValueError(f"mode must be 'all' or 'cascade', got {mode!r}")
    if target is None:
        with torch.no_grad():
            target = int(model(x).argmax(dim=-1)[0])

    if callable(method):
        fn = method
    else:
        preprocess = options.pop("preprocess", None)
        ctx = AttributionContext.from_preprocess(preprocess)  # type: ignore[arg-type]

        def fn(m: nn.Module) -> np.ndarray:
            # The raw map, signed where the method is: its positive part alone can be all
            # zeros (e.g. occlusion when no window lowers the logit), which ranks nothing.
            return compute(m, x, method, target, ctx=ctx, **options).raw.numpy()

    reference = fn(model)
    clone = copy.deepcopy(model).eval()
    corr: dict[str, float] = {}
    if mode == "all":
        _reinit(clone, seed)
        corr["all"] = spearman(reference, fn(clone))
    else:
        for i, (name, layer) in enumerate(cascade_layers(clone)):
            _reinit(layer, seed + i)
            corr[name] = spearman(reference, fn(clone))
    return RandomizationResult(corr, threshold)


# ----------------------------------------------------------------------------- pointing game


def lesion_share(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's positive mass inside ``mask`` (energy-based pointing game).

    A random map scores the mask's area fraction in expectation; 0 if the map has no
    positive mass.
    """
    s = np.clip(np.asarray(saliency, dtype=np.float64), 0.0, None)
    m = np.asarray(mask, dtype=bool)
    if s.shape != m.shape:
        raise ValueError(f"map shape {s.shape} does not match mask shape {m.shape}")
    total = s.sum()
    return float(s[m].sum() / total) if total > 0 else 0.0


def pointing_hit(saliency: np.ndarray, mask: np.ndarray, *, tolerance: int = 0) -> bool:
    """Classic pointing game: does the map's maximum fall inside ``mask`` (dilated by ``tolerance`` px)?"""
    s = np.asarray(saliency)
    m = np.asarray(mask, dtype=bool)
    r, c = np.unravel_index(int(np.argmax(s)), s.shape)
    r0, r1 = max(0, r - tolerance), r + tolerance + 1
    c0, c1 = max(0, c - tolerance), c + tolerance + 1
    return bool(m[r0:r1, c0:c1].any())
