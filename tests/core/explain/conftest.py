"""Fixtures for the explanation tests: small ViTs, and a tiny LungViT trained on phantoms.

The phantom model is trained once per session on CPU (360 phantoms of three chest classes
drawn at 96 px and fed at 32 px, 600 AdamW steps of batch 32; about 30 s on two idle cores,
test accuracy about 0.9), so the tests can check maps against known lesion masks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from lungvit.core.model.network import create_model
from lungvit.synthetic.phantoms import CLASS_NAMES, Phantom, make_phantom
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input

# Normal, and the two chest findings whose lesions are big enough to learn at 32 pixels in
# a few hundred steps (viral pneumonia's fine streaks and tuberculosis' small cavities are not).
PHANTOM_CLASSES = ("lung-normal", "lung-covid", "lung-opacity")
LESION_CLASSES = PHANTOM_CLASSES[1:]
SCAN_SIZE = 96
INPUT_SIZE = 32


def small_vit(*, img_size: int = 32, depth: int = 3, seed: int = 0, **kwargs: object) -> VisionTransformer:
    """A plain timm ViT (4-pixel patches, 1 channel, 9 classes) in eval mode."""
    torch.manual_seed(seed)
    opts = dict(img_size=img_size, patch_size=4, in_chans=1, embed_dim=32, depth=depth, num_heads=4,
                num_classes=9)
    opts.update(kwargs)
    return VisionTransformer(**opts).eval()


@pytest.fixture
def vit() -> VisionTransformer:
    return small_vit()


@pytest.fixture
def tiny_lungvit() -> torch.nn.Module:
    """lungvit_tiny at 32 px (8 x 8 tokens), random weights, eval mode."""
    torch.manual_seed(0)
    return create_model("lungvit_tiny", img_size=INPUT_SIZE).eval()


@dataclass
class TrainedPhantomModel:
    model: torch.nn.Module
    preprocess: PreprocessConfig
    accuracy: float
    seconds: float
    test_phantoms: list[Phantom]


def _phantom_batch(labels: tuple[str, ...], seeds: range, cfg: PreprocessConfig
                   ) -> tuple[torch.Tensor, torch.Tensor, list[Phantom]]:
    ph = [make_phantom(lab, size=SCAN_SIZE, seed=s) for lab in labels for s in seeds]
    x = torch.stack([to_model_input(p.image, cfg) for p in ph])  # (N, 1, S, S)
    y = torch.tensor([p.label_index for p in ph])
    return x, y, ph


def train_phantom_model(*, steps: int = 600, per_class: int = 120, seed: int = 0,
                        phantom_offset: int = 0) -> TrainedPhantomModel:
    """Train lungvit_tiny (32 px) on phantoms of :data:`PHANTOM_CLASSES` with AdamW.

    ``seed`` fixes the initialisation and batch order; ``phantom_offset`` shifts the phantom
    seeds of both the training and the test set (another draw of patients and lesions).
    """
    t0 = time.perf_counter()
    cfg = PreprocessConfig(input_size=INPUT_SIZE)
    x, y, _ = _phantom_batch(PHANTOM_CLASSES, range(phantom_offset, phantom_offset + per_class), cfg)
    torch.manual_seed(seed)
    model = create_model("lungvit_tiny", img_size=INPUT_SIZE, num_classes=len(CLASS_NAMES))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.15)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    first_test = 10_000 + phantom_offset
    xt, yt, test = _phantom_batch(PHANTOM_CLASSES, range(first_test, first_test + 40), cfg)
    with torch.no_grad():
        acc = float((model(xt).argmax(-1) == yt).float().mean())
    return TrainedPhantomModel(model, cfg, acc, time.perf_counter() - t0, test)


@pytest.fixture(scope="session")
def phantom_model() -> TrainedPhantomModel:
    trained = train_phantom_model()
    assert trained.accuracy > 0.8, f"the phantom model did not learn (accuracy {trained.accuracy:.2f})"
    return trained


def lesion_phantoms(trained: TrainedPhantomModel, n: int = 6) -> list[Phantom]:
    """Test phantoms with a lesion, ``n`` per lesion class."""
    out = []
    for lab in LESION_CLASSES:
        out += [p for p in trained.test_phantoms if p.label == lab and p.mask.any()][:n]
    return out


def constant_image(value: float = 0.5, size: int = 48) -> np.ndarray:
    return np.full((size, size), value, dtype=np.float32)
