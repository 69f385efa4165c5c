"""The data module end to end, patient-level splits on real files, and augmentation."""
from __future__ import annotations

import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from lungvit.cli import main as cli
from lungvit.synthetic.phantoms import CLASS_NAMES
from lungvit.core.model.preprocess import PreprocessConfig
from lungvit.training.data.augment import AugmentConfig, augment_batch
from lungvit.training.data.cache import SCALE
from lungvit.training.data.discover import DatasetError, discover
from lungvit.training.data.preview import preview
from lungvit.training.data.datamodule import ScanDataModule
from lungvit.training.data.splits import load_split_manifest

CFG = PreprocessConfig(input_size=32, mean=0.5, std=0.25)
ZERO = AugmentConfig(rotation_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo-data", str(root), "--per-class", "6", "--size", "64"]) == 0
    return root


@pytest.fixture(scope="module")
def demo_dicom(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo_dicom")
    assert cli.main(["demo-data", str(root), "--per-class", "6", "--size", "64", "--dicom"]) == 0
    return root


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")  # shared: later modules hit the cache


def _module(data, cache_dir, **kw) -> ScanDataModule:
    kw.setdefault("preprocess", CFG)
    dm = ScanDataModule(data, cache_dir=cache_dir, batch_size=kw.pop("batch_size", 8), **kw)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def _assert_patient_level(dm: ScanDataModule) -> None:
    where = defaultdict(set)
    for split, idx in dm.splits.items():
        for i in idx:
            assert dm.samples[i].patient_key is not None
            where[dm.samples[i].patient_key].add(split)
    assert where and all(len(s) == 1 for s in where.values())
    assert sorted(i for v in dm.splits.values() for i in v) == list(range(len(dm.samples)))


def test_end_to_end_batches(demo: Path, cache_dir: Path) -> None:
    dm = _module(demo, cache_dir)
    assert dm.classes == sorted(CLASS_NAMES) and dm.num_classes == 9
    assert dm.class_counts["total"] == {c: 6 for c in CLASS_NAMES}
    assert sum(sum(dm.class_counts[s].values()) for s in ("train", "val", "test")) == 54
    assert dm.unreadable == [] and dm.too_small == {}
    assert dm.fingerprint == discover(demo).fingerprint()
    _assert_patient_level(dm)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.isfinite(x).all() and x.min() >= -2 - 1e-6 and x.max() <= 2 + 1e-6
    # Evaluation batches are the cached pixels, normalised: (x - mean) / std, in order.
    xv, yv = next(iter(dm.val_dataloader()))
    ds = dm.datasets["val"]
    raw = np.asarray(ds._images[ds.rows[: len(yv)]], np.float32) / SCALE
    torch.testing.assert_close(xv[:, 0], (torch.from_numpy(raw) - 0.5) / 0.25)
    expected = [dm.classes.index(dm.samples[i].label) for i in dm.splits["val"][: len(yv)]]
    assert yv.tolist() == expected
    info = dm.summary()
    assert info["classes"] == dm.classes and info["fingerprint"] == dm.fingerprint
    assert sum(info["split_sizes"].values()) == 54


def test_preview_shows_the_split_the_run_makes(demo: Path, cache_dir: Path) -> None:
    for seed in (0, 3):
        dm = _module(demo, cache_dir, seed=seed)
        info = preview(demo, seed=seed, val_frac=dm.val_frac, test_frac=dm.test_frac)
        made = {c: {s: dm.class_counts[s][c] for s in ("train", "val", "test")} for c in dm.classes}
        assert info["split"] == made, seed
        assert all(sum(v.values()) == 6 for v in info["split"].values())


def test_only_the_training_loader_augments(demo: Path, cache_dir: Path) -> None:
    strong = AugmentConfig(rotation_deg=30, brightness=0.3, contrast=0.3)
    dm = _module(demo, cache_dir, augment=strong, batch_size=64)
    plain = _module(demo, cache_dir, augment=None, batch_size=64)
    assert dm.splits == plain.splits
    for name in ("val_dataloader", "test_dataloader"):
        a, b = next(iter(getattr(dm, name)())), next(iter(getattr(plain, name)()))
        torch.testing.assert_close(a, b)
    torch.manual_seed(0)
    xa, ya = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    xp, yp = next(iter(plain.train_dataloader()))
    assert torch.equal(ya, yp)  # same shuffle, different pixels
    assert (xa - xp).abs().mean() > 0.05


def test_split_is_frozen_and_reusable(demo: Path, cache_dir: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(demo, tmp_path / "data"))
    manifest = tmp_path / "split.csv"
    first = _module(root, cache_dir, split_manifest=manifest)  # writes the manifest
    text = manifest.read_text()
    assert text.startswith("path,label,split\n")
    assert not any(s.patient_key in text for s in first.samples)  # no patient keys in it
    again = _module(root, cache_dir, seed=0)
    assert again.splits == first.splits  # same data, same seed: same split
    saved = load_split_manifest(manifest)
    # New files (a new patient) arrive: the saved split still holds, they join train.
    src = next((root / "lung-covid").glob("*.png"))
    for n in (1, 2):
        shutil.copy(src, root / "lung-covid" / f"lung-covid-P7777-{n}.png")
    grown = _module(root, cache_dir, split_manifest=manifest)
    named = {k: sorted(grown.index.relpath(grown.samples[i].path) for i in v)
             for k, v in grown.splits.items()}
    assert named["test"] == sorted(saved["test"]) and named["val"] == sorted(saved["val"])
    assert set(named["train"]) - set(saved["train"]) == {
        "lung-covid/lung-covid-P7777-1.png", "lung-covid/lung-covid-P7777-2.png"}
    assert grown.save_split_manifest(tmp_path / "again.csv").exists()


def test_manifest_patient_ids_keep_patients_together(demo: Path, cache_dir: Path,
                                                     tmp_path: Path) -> None:
    files = sorted(demo.rglob("*.png"))
    manifest = tmp_path / "labels.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        for i, p in enumerate(files):  # patients that span classes, three images each
            w.writerow([str(p), "even" if i % 2 == 0 else "odd", f"MRN-{i // 3}"])
    dm = _module(manifest, cache_dir)
    assert dm.classes == ["even", "odd"]
    _assert_patient_level(dm)
    assert len({dm.samples[i].patient_key for i in range(len(dm.samples))}) == 18


def test_dicom_patient_keys_keep_patients_together(demo_dicom: Path, cache_dir: Path,
                                                   tmp_path: Path) -> None:
    # File names without the patient token: the keys must come from the DICOM headers.
    root = tmp_path / "dicom"
    for i, p in enumerate(sorted(demo_dicom.rglob("*.dcm"))):
        dest = root / p.parent.name / (f"1.2.826.0.1.{i}" if i % 2 else f"img{i}.dcm")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
    assert all(s.patient_key is None for s in discover(root).samples)
    dm = _module(root, cache_dir)
    assert len(dm.samples) == 54 and dm.unreadable == []
    _assert_patient_level(dm)
    # The demo files carry fake identifying attributes: none reaches reports or manifests.
    manifest = dm.save_split_manifest(tmp_path / "split.csv").read_text()
    assert "SENTINEL" not in json.dumps(dm.summary()) + manifest


def test_mixed_formats_and_corrupt_files(demo: Path, demo_dicom: Path, cache_dir: Path,
                                         tmp_path: Path) -> None:
    root = tmp_path / "mixed"
    for cls in ("lung-covid", "lung-normal"):
        (root / cls).mkdir(parents=True)
        pngs = sorted((demo / cls).glob("*.png"))
        dcms = sorted((demo_dicom / cls).glob("*.dcm"))
        shutil.copy(pngs[0], root / cls / pngs[0].name)
        Image.open(pngs[1]).convert("L").save(root / cls / (pngs[1].stem + ".jpg"), quality=95)
        Image.open(pngs[2]).convert("L").save(root / cls / (pngs[2].stem + ".JPEG"), quality=95)
        shutil.copy(dcms[3], root / cls / dcms[3].name)
        shutil.copy(dcms[4], root / cls / dcms[4].stem)  # DICOM without an extension
        shutil.copy(dcms[5], root / cls / f"{cls}-P5555-1.dicom")
    bad = root / "lung-covid"
    (bad / "empty.png").write_bytes(b"")
    data = next(bad.glob("*.png")).read_bytes()
    (bad / "truncated.png").write_bytes(data[: len(data) // 3])
    (bad / "noise.dcm").write_bytes(np.random.default_rng(1).bytes(2048))
    dm = _module(root, cache_dir, min_per_class=3)
    assert dm.class_counts["total"] == {"lung-covid": 6, "lung-normal": 6}
    assert sorted(p for p, _ in dm.unreadable) == [
        "lung-covid/empty.png", "lung-covid/noise.dcm", "lung-covid/truncated.png"]
    assert all(reason for _, reason in dm.unreadable)
    assert dm.summary()["unreadable"] == 3
    x, _ = next(iter(dm.train_dataloader()))
    assert torch.isfinite(x).all()


def test_too_small_and_forced_classes(demo: Path, cache_dir: Path, tmp_path: Path) -> None:
    root = Path(shutil.copytree(demo, tmp_path / "data"))
    for p in sorted((root / "lung-opacity").iterdir())[3:]:
        p.unlink()
    dm = _module(root, cache_dir)
    assert dm.summary()["too_small"] == {"lung-opacity": 3}
    assert "lung-opacity" not in dm.classes and dm.num_classes == 8
    forced = _module(root, cache_dir, classes=list(CLASS_NAMES))
    assert forced.classes == list(CLASS_NAMES) and forced.num_classes == 9
    assert forced.class_counts["total"]["lung-opacity"] == 0
    with pytest.raises(DatasetError, match="does not know"):
        _module(root, cache_dir, classes=["lung-covid", "lung-normal"])


def test_workers_and_a_lightning_fit(demo: Path, cache_dir: Path) -> None:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32 * 32, 9))

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.net(x), y)

        def validation_step(self, batch, _):
            x, y = batch
            self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x), y))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    dm = ScanDataModule(demo, preprocess=CFG, cache_dir=cache_dir, batch_size=8, num_workers=2,
                        pin_memory=False)
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(Tiny(), datamodule=dm)
    loader = dm.train_dataloader()
    assert loader.persistent_workers and loader.prefetch_factor == 4 and not loader.pin_memory


# -- augmentation -----------------------------------------------------------------------

def _batch(b: int = 6, s: int = 32) -> torch.Tensor:
    return torch.rand(b, 1, s, s, generator=torch.Generator().manual_seed(0))


def test_augment_shapes_range_and_identity() -> None:
    x = _batch()
    assert torch.equal(augment_batch(x, ZERO), x)
    for cfg in (AugmentConfig(), AugmentConfig(hflip=True, rotation_deg=45, brightness=0.5),
                AugmentConfig(randaugment=True, randaugment_ops=3, randaugment_magnitude=10)):
        y = augment_batch(x, cfg, torch.Generator().manual_seed(1))
        assert y.shape == x.shape and y.dtype == x.dtype
        assert y.min() >= 0 and y.max() <= 1 and not torch.equal(y, x)
    assert augment_batch(x[:0], AugmentConfig()).shape == (0, 1, 32, 32)
    with pytest.raises(ValueError):
        augment_batch(x[:, 0], AugmentConfig())
    with pytest.raises(ValueError):
        AugmentConfig(scale=(1.2, 1.0))


def test_augment_is_deterministic_with_a_generator_and_per_sample() -> None:
    x = _batch().expand(6, 1, 32, 32).clone()
    x[:] = x[0]  # six copies of one image
    cfg = AugmentConfig(randaugment=True)
    a = augment_batch(x, cfg, torch.Generator().manual_seed(7))
    b = augment_batch(x, cfg, torch.Generator().manual_seed(7))
    c = augment_batch(x, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a[0], a[1])  # each sample draws its own transform


def test_augment_geometry_is_what_it_says() -> None:
    x = torch.zeros(1, 1, 33, 33)
    x[0, 0, 16, 20] = 1.0  # a dot right of centre
    flip = AugmentConfig(rotation_deg=0, scale=(1, 1), translate=0, brightness=0, contrast=0,
                         hflip=True)
    flips = [augment_batch(x, flip, torch.Generator().manual_seed(s)) for s in range(8)]
    assert any(torch.allclose(f, x, atol=1e-5) for f in flips)  # grid_sample: not bit-exact
    assert any(f[0, 0, 16, 12] > 0.99 for f in flips)  # mirrored about the centre column
    zoom = AugmentConfig(rotation_deg=0, scale=(2, 2), translate=0, brightness=0, contrast=0)
    big = torch.zeros(1, 1, 32, 32)
    big[..., 8:24, 8:24] = 1
    assert augment_batch(big, zoom).mean() > 0.9  # zooming in by 2 fills the frame
