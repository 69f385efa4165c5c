"""Data sources: named by files or manifests, kept apart in splits, balanced in sampling."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungvit.core.io.phi import patient_key
from lungvit.training.data.augment import PRESETS, AugmentConfig, augment_batch, augment_config
from lungvit.training.data.discover import discover, patient_from_name, source_from_name
from lungvit.training.data.datamodule import balanced_weights
from lungvit.training.data.splits import split_index


@pytest.mark.parametrize("name, source, patient", [
    ("meddef1__person1000_virus_1681.png", "meddef1", "person1000"),
    ("meddef1__person12_bacteria_3.jpeg", "meddef1", "person12"),
    ("meddef1__IM-0115-0001.png", "meddef1", "0115"),
    ("oct-kevinrayscott__DME-11053-1.png", "oct-kevinrayscott", "11053"),
    ("crdb-rtchanon__Normal-10000.png", "crdb-rtchanon", None),
    ("hhyx__CNV-0_62c487e6.png", "hhyx", None),
    ("person3_virus_9.png", None, "person3"),
    ("CNV-1016042-1.jpeg", None, "1016042"),
    ("__leading.png", None, None),
    ("a b__x.png", None, None),  # not a source name: spaces
])
def test_source_and_patient_from_name(name: str, source: str | None, patient: str | None) -> None:
    assert source_from_name(name) == source
    assert patient_from_name(name) == patient


def _png(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16), value, np.uint8)).save(path)


@pytest.fixture()
def sourced(tmp_path: Path) -> Path:
    """Two classes; class a from sources s1 (30 files, 10 patients) and s2 (12 files)."""
    root = tmp_path / "data"
    for i in range(30):
        _png(root / "a" / f"s1__person{i // 3}_virus_{i}.png", i)
    for i in range(12):
        _png(root / "a" / f"s2__img{i}.png", 100 + i)
    for i in range(24):
        _png(root / "b" / f"s3__img{i}.png", 200 + i)
    return root


def test_discover_reads_sources_and_patients(sourced: Path) -> None:
    index = discover(sourced)
    assert index.source_counts() == {"a": {"s1": 30, "s2": 12}, "b": {"s3": 24}}
    keys = {s.patient_key for s in index.samples if s.source == "s1"}
    assert keys == {patient_key(f"person{i}") for i in range(10)}


def test_manifest_source_column_wins(sourced: Path) -> None:
    rows = ["path,label,source"] + [f"a/s1__person{i // 3}_virus_{i}.png,a,hospitalX"
                                    for i in range(30)] + \
        [f"b/s3__img{i}.png,b," for i in range(24)]
    (sourced / "m.csv").write_text("\n".join(rows) + "\n")
    index = discover(sourced / "m.csv")
    assert index.source_counts() == {"a": {"hospitalX": 30}, "b": {"s3": 24}}


def test_split_keeps_patients_together_and_every_source_in_test(sourced: Path) -> None:
    index = discover(sourced)
    splits = split_index(index, val_frac=0.2, test_frac=0.2, seed=3)
    where = {i: s for s, members in splits.items() for i in members}
    by_patient: dict[str, set[str]] = {}
    for i, sample in enumerate(index.samples):
        if sample.patient_key is not None:
            by_patient.setdefault(sample.patient_key, set()).add(where[i])
    assert by_patient and all(len(v) == 1 for v in by_patient.values())
    for split in ("val", "test"):
        present = {(index.samples[i].label, index.samples[i].source) for i in splits[split]}
        assert present == {("a", "s1"), ("a", "s2"), ("b", "s3")}, split


def test_balanced_weights_equalise_classes_then_sources() -> None:
    labels = ["a"] * 90 + ["a"] * 10 + ["b"] * 20
    sources = ["s1"] * 90 + ["s2"] * 10 + [None] * 20
    w = balanced_weights(labels, sources)
    assert w.sum().item() == pytest.approx(1.0)
    assert w[:100].sum().item() == pytest.approx(0.5)   # class a: half
    assert w[:90].sum().item() == pytest.approx(0.25)   # its sources: a quarter each
    assert w[90:100].sum().item() == pytest.approx(0.25)
    draws = torch.multinomial(w, 20000, replacement=True, generator=torch.Generator().manual_seed(0))
    share = Counter(("a" if i < 100 else "b") for i in draws.tolist())
    assert abs(share["a"] / 20000 - 0.5) < 0.02


def test_balanced_loader_draws_classes_equally(sourced: Path, tmp_path: Path) -> None:
    from lungvit.core.model.preprocess import PreprocessConfig
    from lungvit.training.data.datamodule import ScanDataModule

    dm = ScanDataModule(sourced, preprocess=PreprocessConfig(input_size=16), batch_size=8,
                        augment=None, cache_dir=tmp_path / "cache", balanced=True, seed=1)
    dm.prepare_data()
    dm.setup()
    seen: Counter[int] = Counter()
    loader = dm.train_dataloader()
    for _ in range(30):  # epochs: the sampler's generator moves on
        for _, y in loader:
            seen.update(y.tolist())
    total = sum(seen.values())
    assert abs(seen[0] / total - 0.5) < 0.06, seen


# -- acquisition augmentation --------------------------------------------------------------
OFF = AugmentConfig(rotation_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0)


def _batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    ramp = torch.linspace(0.1, 0.9, 48)
    x = (ramp[None, :] * ramp[:, None]).expand(8, 1, 48, 48).clone()
    return (x + 0.05 * torch.rand(x.shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("op", [
    dict(aspect=0.4), dict(gamma=0.5), dict(blur_prob=1.0, blur_sigma=2.0), dict(noise=0.1),
    dict(resample_prob=1.0, resample_min=0.3), dict(jpeg_prob=1.0, jpeg_quality=(5, 10)),
    dict(border_prob=1.0, border_max=0.2),
])
def test_each_acquisition_op_changes_images_and_stays_in_range(op: dict) -> None:
    x = _batch()
    cfg = AugmentConfig(**{**OFF.__dict__, **op})
    y = augment_batch(x, cfg, torch.Generator().manual_seed(2))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert float(y.min()) >= 0 and float(y.max()) <= 1
    assert (y - x).abs().mean() > 1e-3, op
    assert torch.equal(augment_batch(x, OFF), x)


def test_blur_smooths_and_borders_are_flat() -> None:
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = augment_batch(x, AugmentConfig(**{**OFF.__dict__, "blur_prob": 1.0}))
    tv = lambda t: (t[..., 1:, :] - t[..., :-1, :]).abs().mean()  # noqa: E731
    assert tv(blurred) < 0.7 * tv(x)
    bordered = augment_batch(torch.full((16, 1, 40, 40), 0.5),
                             AugmentConfig(**{**OFF.__dict__, "border_prob": 1.0,
                                              "border_max": 0.25}),
                             torch.Generator().manual_seed(4))
    edge_values = set(bordered[:, 0, 0, :].flatten().tolist()) | set(
        bordered[:, 0, :, 0].flatten().tolist())
    assert edge_values <= {0.0, 0.5, 1.0} and edge_values & {0.0, 1.0}


def test_presets_and_validation() -> None:
    assert augment_config("basic") == PRESETS["basic"] == AugmentConfig()
    acq = augment_config("acquisition", jpeg_prob=0.0)
    assert acq.jpeg_prob == 0.0 and acq.gamma == PRESETS["acquisition"].gamma
    with pytest.raises(ValueError, match="unknown augmentation policy"):
        augment_config("heavy")
    with pytest.raises(ValueError, match="unknown augmentation option"):
        augment_config("basic", sharpen=1)
    with pytest.raises(ValueError, match="blur_prob"):
        AugmentConfig(blur_prob=1.5)
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=(50, 20))


def test_train_split_option_reaches_the_config(tmp_path: Path) -> None:
    import argparse

    from lungvit.cli import train_cmd as commands

    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", "d", "--out", "m.safetensors", "--split",
                              str(tmp_path / "split.csv"), "--augment-policy", "acquisition",
                              "--balanced-sampling", "--cite", "A", "--cite", "B"])
    cfg = commands.config_from_args(args)
    assert cfg.split_manifest == str(tmp_path / "split.csv")
    assert cfg.augment_policy == "acquisition" and cfg.balanced_sampling
    assert cfg.citations == ["A", "B"]
