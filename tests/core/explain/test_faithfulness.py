"""Faithfulness: deletion/insertion, model randomisation, pointing game (toy models and phantoms)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lungvit.core.explain import METHODS, explain, lesion_share, pointing_hit, randomization_check
from lungvit.core.explain.faithfulness import (
    Curve,
    cascade_layers,
    deletion_insertion,
    perturbation_batch,
    random_maps,
    spearman,
    target_probs,
)
from lungvit.core.model.preprocess import resize_pixels, to_model_input

from .conftest import TrainedPhantomModel, lesion_phantoms


class RegionModel(nn.Module):
    """Class 0's logit is 8 x the mean brightness of a fixed square; the others are 0."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.region = torch.zeros(size, size, dtype=torch.bool)
        self.region[2:6, 9:14] = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        score = 8.0 * x[:, 0][:, self.region].mean(-1)  # (B,)
        return torch.cat([score[:, None], torch.zeros(x.shape[0], 2)], dim=1)


def test_perturbation_sequences() -> None:
    x = torch.rand(1, 1, 8, 8)
    base, start = torch.full_like(x, -1.0), torch.zeros_like(x)
    sal = torch.arange(64, dtype=torch.float32).reshape(8, 8)
    d, i = perturbation_batch(x, sal, baseline=base, start=start, steps=4)
    assert d.shape == i.shape == (5, 1, 8, 8)
    torch.testing.assert_close(d[0], x[0])
    torch.testing.assert_close(d[-1], base[0])
    torch.testing.assert_close(i[0], start[0])
    torch.testing.assert_close(i[-1], x[0])
    # After one step a quarter of the pixels, the most salient (bottom rows), are removed.
    removed = (d[1, 0] == -1.0)
    assert int(removed.sum()) == 16 and removed[6:].all()
    with pytest.raises(ValueError):
        perturbation_batch(x, sal[:4], baseline=base, start=start, steps=4)


def test_ties_are_broken_reproducibly() -> None:
    x = torch.rand(1, 1, 8, 8)
    flat = torch.zeros(8, 8)
    a = perturbation_batch(x, flat, baseline=torch.zeros_like(x), start=x, steps=4, seed=3)[0]
    b = perturbation_batch(x, flat, baseline=torch.zeros_like(x), start=x, steps=4, seed=3)[0]
    torch.testing.assert_close(a, b)


def test_curve_auc() -> None:
    fr = np.linspace(0, 1, 5)
    assert Curve(fr, np.full(5, 0.3)).auc == pytest.approx(0.3)
    assert Curve(fr, fr).auc == pytest.approx(0.5)


def test_the_true_map_beats_random_maps_on_a_model_with_known_evidence() -> None:
    model = RegionModel()
    x = torch.full((1, 1, 16, 16), 0.8)
    truth = model.region.float()
    inverse = 1.0 - truth
    maps = [truth, inverse, *random_maps((16, 16), range(3))]
    curves = deletion_insertion(model, x, maps, 0, baseline=torch.full_like(x, -1.0),
                                start=torch.full_like(x, -1.0), steps=16)
    (d_true, i_true), (d_inv, i_inv) = curves[0], curves[1]
    d_rand = np.mean([d.auc for d, _ in curves[2:]])
    i_rand = np.mean([i.auc for _, i in curves[2:]])
    assert d_true.auc < d_rand < d_inv.auc
    assert i_true.auc > i_rand > i_inv.auc
    # Both curves meet at the unperturbed scan's probability, computed here on its own.
    with torch.no_grad():
        p_x = float(torch.softmax(model(x), -1)[0, 0])
    assert d_true.probs[0] == pytest.approx(p_x, abs=1e-5)
    assert i_true.probs[-1] == pytest.approx(p_x, abs=1e-5)


def test_shared_end_points_give_the_same_curves_as_full_sequences(vit) -> None:
    x = torch.randn(1, 1, 32, 32)
    base, start = torch.full_like(x, -1.0), torch.zeros_like(x)
    maps = random_maps((32, 32), range(2))
    curves = deletion_insertion(vit, x, maps, 4, baseline=base, start=start, steps=8, patch=4)
    for i, (d, ins) in enumerate(curves):
        dd, ii = perturbation_batch(x, maps[i], baseline=base, start=start, steps=8, patch=4, seed=i)
        np.testing.assert_allclose(d.probs, target_probs(vit, dd, 4), rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(ins.probs, target_probs(vit, ii, 4), rtol=1e-4, atol=1e-6)


def test_spearman() -> None:
    a = np.arange(20.0)
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert np.isnan(spearman(a, np.zeros(20)))
    # Ties take average ranks: [1, 1, 2] vs [1, 2, 3] -> ranks [0.5, 0.5, 2] vs [0, 1, 2].
    assert spearman(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(np.sqrt(3) / 2)
    rng = np.random.default_rng(0)
    assert abs(spearman(rng.random(4000), rng.random(4000))) < 0.05


def test_randomization_verdict() -> None:
    from lungvit.core.explain.faithfulness import RandomizationResult

    assert RandomizationResult({"all": 0.1}, 0.5).passed
    assert not RandomizationResult({"head": 0.1, "blocks.0": -0.7}, 0.5).passed
    assert not RandomizationResult({"all": float("nan")}, 0.5).passed  # a constant map proves nothing


def test_lesion_share_and_pointing() -> None:
    mask = np.zeros((10, 10), bool)
    mask[:5] = True
    assert lesion_share(np.where(mask, 3.0, 1.0), mask) == pytest.approx(0.75)
    assert lesion_share(np.where(mask, 1.0, -5.0), mask) == pytest.approx(1.0)  # negatives ignored
    assert lesion_share(np.zeros((10, 10)), mask) == 0.0
    m = np.zeros((10, 10))
    m[7, 7] = 1.0
    assert not pointing_hit(m, mask)
    assert pointing_hit(m, mask, tolerance=3)
    with pytest.raises(ValueError):
        lesion_share(np.ones((3, 3)), mask)


def test_cascade_order(tiny_lungvit) -> None:
    names = [n for n, _ in cascade_layers(tiny_lungvit)]
    assert names[:2] == ["head", "norm"] and names[2] == "blocks.3" and names[-1] == "patch_embed"


# ----------------------------------------------------------------------------- trained phantom model


def test_randomised_weights_change_the_maps(phantom_model: TrainedPhantomModel) -> None:
    model = phantom_model.model
    state = {k: v.clone() for k, v in model.state_dict().items()}
    p = lesion_phantoms(phantom_model, 1)[0]
    x = to_model_input(p.image, phantom_model.preprocess)[None]
    for method in ("rollout", "grad_rollout", "ig", "gradcam", "smoothgrad"):
        res = randomization_check(model, x, method, target=p.label_index, preprocess=phantom_model.preprocess)
        assert res.passed, (method, res.correlations)
    cascade = randomization_check(model, x, "gradcam", target=p.label_index, mode="cascade",
                                  preprocess=phantom_model.preprocess)
    assert list(cascade.correlations)[0] == "head" and len(cascade.correlations) == len(cascade_layers(model))
    # The served model is untouched.
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, state[k])


@pytest.fixture(scope="module")
def phantom_explanations(phantom_model: TrainedPhantomModel) -> list[tuple[object, object]]:
    out = []
    for p in lesion_phantoms(phantom_model, 4):
        es = explain(phantom_model.model, p.image, preprocess=phantom_model.preprocess, methods=list(METHODS),
                     target=p.label_index)
        out.append((p, es))
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_lesion_mass_share_beats_a_random_map(phantom_explanations, method: str) -> None:
    shares = [lesion_share(es[method].map, p.mask) for p, es in phantom_explanations]
    # A random map puts the mask's area fraction inside it, in expectation.
    rng = np.random.default_rng(0)
    random = [np.mean([lesion_share(rng.random(p.mask.shape), p.mask) for _ in range(3)])
              for p, _ in phantom_explanations]
    assert np.mean(shares) > np.mean(random), (method, np.mean(shares), np.mean(random))


@pytest.mark.parametrize("method", ["rollout", "ig"])
def test_deletion_auc_beats_random(phantom_explanations, method: str) -> None:
    own = [es[method].faithfulness["deletion_auc"] for _, es in phantom_explanations]
    rand = [es[method].faithfulness["random_deletion_auc"] for _, es in phantom_explanations]
    assert np.mean(own) < np.mean(rand), (method, own, rand)


def _scores(trained: TrainedPhantomModel, phantom: object, saliency: torch.Tensor) -> dict[str, float]:
    """The faithfulness numbers explain() reports, for a map given at input resolution."""
    from lungvit.core.explain.attributions import AttributionContext, blur

    x = to_model_input(phantom.image, trained.preprocess)[None]  # (1, 1, S, S)
    s = tuple(x.shape[-2:])
    ctx = AttributionContext.from_preprocess(trained.preprocess)
    curves = deletion_insertion(trained.model, x, [saliency, *random_maps(s, range(3))], phantom.label_index,
                                baseline=ctx.baseline(x), start=blur(x, sigma=s[-1] / 8), steps=16, patch=4)
    (d, i), rand = curves[0], curves[1:]
    return {"deletion_auc": d.auc, "insertion_auc": i.auc,
            "random_deletion_auc": float(np.mean([r.auc for r, _ in rand])),
            "random_insertion_auc": float(np.mean([r.auc for _, r in rand]))}


def test_verdict_says_a_lesion_map_is_better_than_random_and_its_inverse_is_not(
        phantom_model: TrainedPhantomModel) -> None:
    """On COVID phantoms, whose lesions the model learned to use, the lesion mask itself (the
    map an ideal explainer would draw) is judged better than random and the inverted mask
    worse. (On opacity phantoms the small bright lesion is not what this model's probability
    rests on: blacking it out first does not lower it, so the mask is no test there.)"""
    from lungvit.core.explain.faithfulness import BETTER, WORSE, faithfulness_gain, faithfulness_verdict

    covid = [p for p in lesion_phantoms(phantom_model, 3) if p.label == "lung-covid"]
    assert len(covid) == 3
    for p in covid:
        mask = torch.from_numpy(p.mask.astype(np.float32))
        good = resize_pixels(mask, phantom_model.preprocess.input_size)  # (S, S), as the input
        scores = _scores(phantom_model, p, good)
        inverted = _scores(phantom_model, p, 1.0 - good)
        assert faithfulness_verdict(scores) == BETTER, (p.label, faithfulness_gain(scores))
        assert faithfulness_verdict(inverted) == WORSE, (p.label, faithfulness_gain(inverted))


def test_verdict_rule() -> None:
    from lungvit.core.explain.faithfulness import BETTER, NO_BETTER, WORSE, faithfulness_verdict

    base = {"random_deletion_auc": 0.5, "random_insertion_auc": 0.5}
    assert faithfulness_verdict({**base, "deletion_auc": 0.4, "insertion_auc": 0.6}) == BETTER
    assert faithfulness_verdict({**base, "deletion_auc": 0.49, "insertion_auc": 0.505}) == NO_BETTER
    assert faithfulness_verdict({**base, "deletion_auc": 0.51, "insertion_auc": 0.48}) == WORSE
    assert faithfulness_verdict({**base, "deletion_auc": 0.49, "insertion_auc": 0.5}, margin=0.005) == BETTER
    assert faithfulness_verdict({}) is None
