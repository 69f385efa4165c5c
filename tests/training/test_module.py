"""LungViTModule on tiny synthetic tensors: loss, optimizer groups, schedule, freezing."""
from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from lungvit.core.model.network import create_model
from lungvit.training.learn.module import (
    FreezeEarlyLayers,
    LungViTModule,
    WarmupCosine,
    class_weights_from_counts,
    parameter_groups,
)

SIZE = 32
LABELS = ["a", "b", "c"]


def _tiny(num_classes: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lungvit_tiny", num_classes=num_classes, img_size=SIZE)


def _loader(n: int = 48, seed: int = 0, shuffle: bool = True) -> DataLoader:
    """Three classes told apart by brightness: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = 0.3 * torch.randn(n, 1, SIZE, SIZE, generator=g) + (y.float() - 1)[:, None, None, None]
    return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=shuffle, generator=g)


def _trainer(**kw) -> L.Trainer:
    base = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    return L.Trainer(**{**base, **kw})


def test_class_weights_are_inverse_frequency_and_normalised() -> None:
    counts = [10, 30, 60, 0]
    w = class_weights_from_counts(counts)
    n_present = 3
    assert w.tolist() == pytest.approx([100 / (n_present * 10), 100 / (n_present * 30),
                                       100 / (n_present * 60), 0.0])
    assert float((w * torch.tensor(counts)).sum() / 100) == pytest.approx(1.0)


def test_parameter_groups_cover_every_parameter_once() -> None:
    model = _tiny()
    decay, no_decay = parameter_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    no_decay_ids = {id(p) for p in no_decay["params"]}
    named = dict(model.named_parameters())
    for name in ("pos_embed", "cls_token", "norm.weight", "norm.bias", "head.bias",
                 "blocks.0.norm1.weight", "patch_embed.backbone.1.weight"):
        assert id(named[name]) in no_decay_ids, name
    for name in ("head.weight", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"):
        assert id(named[name]) not in no_decay_ids, name


def test_weight_decay_goes_to_exactly_the_linear_and_conv_weights() -> None:
    # Independent of the rule in optim.py: on LungViT the decayed parameters are the
    # weights of Linear and Conv2d layers, and nothing else (no norms, biases, tokens).
    model = create_model("lungvit_tiny")
    expected = {f"{m_name}.weight" for m_name, m in model.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    names = {id(p): n for n, p in model.named_parameters()}
    for wd in (0.05, 0.0):  # the split, and so the parameter order, is the same at 0
        decay, no_decay = parameter_groups(model, wd)
        assert {names[id(p)] for p in decay["params"]} == expected
        assert decay["weight_decay"] == wd and no_decay["weight_decay"] == 0.0
        assert [names[id(p)] for g in (decay, no_decay) for p in g["params"]] == (
            [n for n in names.values() if n in expected]
            + [n for n in names.values() if n not in expected])
    model.cls_token.requires_grad_(False)  # frozen parameters are not optimised
    assert all(p is not model.cls_token for g in parameter_groups(model, 0.05)
               for p in g["params"])


def test_warmup_cosine_schedule_values() -> None:
    s = WarmupCosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [s(i) for i in range(4)] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert s(4) == pytest.approx(1.0)
    assert s(9) == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the cosine
    assert s(14) == pytest.approx(0.1) and s(100) == pytest.approx(0.1)


def test_every_parameter_gets_a_gradient() -> None:
    module = LungViTModule(_tiny(), labels=LABELS)
    x, y = next(iter(_loader()))
    module.model(x)  # the loss below needs no trainer
    loss = torch.nn.functional.cross_entropy(module(x), y)
    loss.backward()
    missing = [n for n, p in module.model.named_parameters() if p.grad is None or
               not torch.isfinite(p.grad).all()]
    assert not missing


def test_class_weights_and_label_smoothing_enter_the_training_loss() -> None:
    x, y = next(iter(_loader()))
    logits = _tiny()(x)
    w = torch.tensor([1.0, 2.0, 3.0])
    expected = torch.nn.functional.cross_entropy(logits, y, weight=w, label_smoothing=0.1)
    module = LungViTModule(_tiny(), labels=LABELS, class_weights=w, label_smoothing=0.1)
    module.log = lambda *a, **k: None  # no trainer attached
    assert module.training_step((x, y), 0).item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError):
        LungViTModule(_tiny(), labels=LABELS, class_weights=torch.ones(4))


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    x, y = next(iter(_loader()))
    grads = []
    for ckpt in (False, True):
        module = LungViTModule(_tiny(), labels=LABELS, grad_checkpointing=ckpt)
        module.train()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        grads.append(module.model.head.weight.grad.clone())
    assert module.model.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def test_fit_learns_logs_metrics_and_follows_the_schedule() -> None:
    record = _RecordLR()
    module = LungViTModule(_tiny(), labels=LABELS, lr=3e-3, warmup_steps=3, min_lr_ratio=0.1)
    trainer = _trainer(max_epochs=4, callbacks=[record])
    trainer.fit(module, _loader(), _loader(seed=1, shuffle=False))
    total = 4 * 6  # 48 samples / batch 8 per epoch
    assert trainer.global_step == total
    expected = WarmupCosine(3, total, 0.1)
    for step, lr in record.lrs.items():
        assert lr == pytest.approx(3e-3 * expected(step)), step
    report = module.last_reports["val"]
    assert report["acc"] >= 0.9
    assert set(report["per_class"]) == set(LABELS)
    logged = trainer.callback_metrics
    for key in ("val/loss", "val/acc", "val/macro_f1", "val/balanced_acc", "val/ece",
                "val/macro_auc", "train/loss"):
        assert key in logged and math.isfinite(float(logged[key])), key
    assert "val/top5" not in logged  # only 3 classes
    assert [h["epoch"] for h in module.history] == [0, 1, 2, 3]
    trainer.test(module, _loader(seed=2, shuffle=False), verbose=False)
    assert module.last_reports["test"]["n"] == 48


def test_gradient_accumulation_steps_the_optimizer_less_often() -> None:
    module = LungViTModule(_tiny(), labels=LABELS)
    trainer = _trainer(max_epochs=1, accumulate_grad_batches=3, limit_val_batches=0)
    trainer.fit(module, _loader())
    assert trainer.global_step == 2  # 6 batches / 3


def test_freeze_callback_holds_the_stem_then_releases_it() -> None:
    module = LungViTModule(_tiny(), labels=LABELS, lr=1e-2, warmup_steps=0)
    freeze = FreezeEarlyLayers(epochs=1, blocks=1)
    snapshots: list[dict[str, torch.Tensor]] = []

    class Snap(Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            state = pl_module.model.state_dict()
            snapshots.append({k: v.detach().clone() for k, v in state.items()})

    before = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    trainer = _trainer(max_epochs=2, limit_val_batches=0, callbacks=[freeze, Snap()])
    trainer.fit(module, _loader())
    frozen = ["patch_embed.backbone.0.weight", "patch_embed.backbone.1.running_mean",
              "pos_embed", "cls_token", "blocks.0.attn.qkv.weight"]
    trained = ["blocks.1.attn.qkv.weight", "blocks.3.mlp.fc1.weight", "head.weight"]
    for key in frozen:  # epoch 0: untouched, BatchNorm statistics included
        torch.testing.assert_close(snapshots[0][key], before[key], msg=key)
    for key in trained:
        assert not torch.equal(snapshots[0][key], before[key]), key
    for key in frozen[:1] + frozen[2:]:  # epoch 1: released
        assert not torch.equal(snapshots[1][key], snapshots[0][key]), key
