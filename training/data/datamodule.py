"""The Lightning data module: labelled folders in, normalised (B, 1, S, S) batches out.

``prepare_data`` lists the files and builds the preprocessing cache: the only place scans
are decoded, and only those not cached yet. ``setup`` (every process) rebuilds nothing:
it re-lists the files, finds them all in the cache, drops unreadable files and too-small
classes, and splits by patient. Batches are read from the cache's memmap one fancy index
per batch; augmentation runs on the CPU in the training loader's collate function (on
the whole batch at once, in the DataLoader workers), so every loader yields the same
kind of batch: float32 (B, 1, S, S) normalised with (x - mean) / std and int64 labels.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from lungvit.core.model.preprocess import PreprocessConfig, normalize
from lungvit.training.data.augment import AugmentConfig, augment_batch
from lungvit.training.data.cache import SCALE, CacheResult, PreprocessCache, default_cache_dir
from lungvit.training.data.discover import DatasetError, DatasetIndex, check_classes, discover
from lungvit.training.data.splits import (SPLITS, apply_split_manifest, load_split_manifest,
                                     save_split_manifest, split_index)


class CachedScans(Dataset):
    """Rows of the cache's (N, S, S) uint16 memmap with their class indices.

    ``__getitems__`` returns a whole batch (raw uint16 and labels) for :class:`Collate`;
    ``__getitem__`` returns one normalised, un-augmented (x (1, S, S), y) pair.
    """

    def __init__(self, images_path: Path | None, rows: np.ndarray, labels: np.ndarray,
                 preprocess: PreprocessConfig) -> None:
        self.images_path, self.rows, self.labels = images_path, rows, labels
        self.preprocess = preprocess
        self._images: np.ndarray | None = None  # opened lazily, in each worker process

    def __len__(self) -> int:
        return len(self.rows)

    def __getstate__(self) -> dict[str, Any]:
        # Never pickle the memmap (that would copy the data set into every worker).
        return {**self.__dict__, "_images": None}

    def __getitems__(self, idx: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            self._images = np.load(self.images_path, mmap_mode="r")
        sel = np.asarray(idx, dtype=np.int64)
        return self._images[self.rows[sel]], self.labels[sel]  # (B, S, S) uint16, (B,)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = Collate(self.preprocess)(self.__getitems__([i]))
        return x[0], y[0]


def balanced_weights(labels: Sequence[str], sources: Sequence[str | None]) -> torch.Tensor:
    """Sampling weights giving every class the same share, split evenly over its sources.

    Args:
        labels: class of each sample; sources: its source (None: one unknown source).

    Returns:
        (N,) float64 weights summing to 1: a sample of class c and source s weighs
        1 / (classes * sources of c * samples of (c, s)).
    """
    pairs = list(zip(labels, sources, strict=True))
    per_pair = Counter(pairs)
    sources_of = Counter(label for label, _ in per_pair)
    n_classes = len(sources_of)
    return torch.tensor([1.0 / (n_classes * sources_of[c] * per_pair[(c, s)]) for c, s in pairs],
                        dtype=torch.float64)


class Collate:
    """Raw cached batch -> float32 in [0, 1] -> augmentation (if any) -> (x - mean) / std."""

    def __init__(self, preprocess: PreprocessConfig, augment: AugmentConfig | None = None) -> None:
        self.preprocess, self.augment = preprocess, augment

    def __call__(self, batch: tuple[np.ndarray, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        pixels, labels = batch
        x = torch.from_numpy(pixels.astype(np.float32))[:, None] / SCALE  # (B, 1, S, S)
        if self.augment is not None:
            x = augment_batch(x, self.augment)
        x = normalize(x, self.preprocess)
        return x, torch.from_numpy(labels.astype(np.int64))


class ScanDataModule(L.LightningDataModule):
    """Labelled scans (folders of class folders, a CSV manifest or a :class:`DatasetIndex`).

    Args:
        data: the data set (see :func:`lungvit.training.data.discover.discover`).
        preprocess: the model's preprocessing (input size, mean, std).
        batch_size: samples per batch.
        num_workers: DataLoader workers, also the decoding processes of the cache build.
        seed: split seed (the same seed and files give the same split).
        val_frac, test_frac: fractions of each class held out, by patient.
        augment: training-split augmentation; None for none.
        cache_dir: preprocessing cache root (default :func:`default_cache_dir`).
        min_per_class: classes with fewer readable scans are left out (``too_small``).
        classes: force this class order (e.g. a base checkpoint's labels); every label of
            the data must be in it.
        pin_memory: pin batches for faster host-to-GPU copies (default: CUDA available).
        split_manifest: a split CSV: reused when it exists (saved files keep their split,
            new files join train, see :func:`apply_split_manifest`), written when it does not.
        progress: called with (files done, total) while the cache is built.
        balanced: draw training batches with :func:`balanced_weights` (with replacement,
            one epoch = as many draws as training samples) instead of plain shuffling.

    After :meth:`setup`: ``classes``, ``num_classes``, ``class_counts`` ({"total", "train",
    "val", "test"} -> {class: n}), ``fingerprint``, ``splits`` (indices into ``samples``),
    ``samples``, ``unreadable``, ``too_small``, ``left_out`` and ``cache_result``.
    """

    def __init__(self, data: str | Path | DatasetIndex, *, preprocess: PreprocessConfig,
                 batch_size: int = 32, num_workers: int = 0, seed: int = 0,
                 val_frac: float = 0.15, test_frac: float = 0.15,
                 augment: AugmentConfig | None = AugmentConfig(),
                 cache_dir: str | Path | None = None, min_per_class: int = 5,
                 classes: Sequence[str] | None = None, pin_memory: bool | None = None,
                 split_manifest: str | Path | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 balanced: bool = False) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.preprocess, self.batch_size = data, preprocess, batch_size
        self.num_workers, self.seed = num_workers, seed
        self.val_frac, self.test_frac, self.augment = val_frac, test_frac, augment
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.min_per_class = min_per_class
        self.forced_classes = list(classes) if classes is not None else None
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.split_manifest = Path(split_manifest) if split_manifest is not None else None
        self.progress = progress
        self.balanced = balanced
        self._prepared: tuple[DatasetIndex, CacheResult] | None = None
        self.splits: dict[str, list[int]] | None = None

    # -- preparing: list + decode (cached) ------------------------------------------------
    def _prepare(self) -> tuple[DatasetIndex, CacheResult]:
        if self._prepared is None:
            index = (self.data if isinstance(self.data, DatasetIndex)
                     else discover(self.data, min_per_class=self.min_per_class))
            cache = PreprocessCache(self.cache_dir, self.preprocess)
            result = cache.build(index.samples, num_workers=self.num_workers,
                                 progress=self.progress, digests=index.digests)
            self._prepared = (index, result)
        return self._prepared

    def prepare_data(self) -> None:
        """List the files and decode those not cached yet (Lightning: once per node)."""
        self._prepare()

    # -- setup: readable samples, classes, splits -----------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Select readable samples, fix the class order and split (once; later calls keep it)."""
        if self.splits is not None:
            return
        index, result = self._prepare()
        unreadable = list(index.unreadable) + [(index.relpath(p), r) for p, r in result.errors]
        samples, rows = [], []
        for i in np.flatnonzero(result.ok):
            s = index.samples[i]
            if s.patient_key is None and result.patient_keys[i] is not None:
                s = replace(s, patient_key=result.patient_keys[i])
            samples.append(s)
            rows.append(i)
        counts = Counter(s.label for s in samples)
        too_small = {**index.too_small,
                     **{c: n for c, n in counts.items() if n < self.min_per_class}}
        keep = [j for j, s in enumerate(samples) if s.label not in too_small]
        samples, rows = [samples[j] for j in keep], np.asarray([rows[j] for j in keep], np.int64)
        present = sorted({s.label for s in samples})
        check_classes(present, dict(sorted(too_small.items())), index.root, self.min_per_class)
        classes = present
        if self.forced_classes is not None:
            unknown = sorted(set(present) - set(self.forced_classes))
            if unknown:
                raise DatasetError(
                    f"the data have class(es) {', '.join(unknown)} that the model does not "
                    f"know (its classes: {', '.join(self.forced_classes)}); rename the "
                    f"folders or train a new model.")
            classes = list(self.forced_classes)
        self.index = DatasetIndex(samples, classes, sorted(unreadable),
                                  dict(sorted(too_small.items())), index.root, index.digests)
        self.splits, self.left_out = self._split()
        self.samples, self.classes, self.num_classes = samples, classes, len(classes)
        self.unreadable, self.too_small = self.index.unreadable, self.index.too_small
        self.fingerprint = self.index.fingerprint()
        self.cache_result = result
        labels = np.asarray([classes.index(s.label) for s in samples], np.int64)
        self.datasets = {split: CachedScans(result.path, rows[idx], labels[idx], self.preprocess)
                         for split, idx in ((k, np.asarray(v, np.int64))
                                            for k, v in self.splits.items())}
        self.class_counts = {"total": self.index.class_counts()}
        for split, idx in self.splits.items():
            c = Counter(samples[i].label for i in idx)
            self.class_counts[split] = {k: c.get(k, 0) for k in classes}

    def _split(self) -> tuple[dict[str, list[int]], list[int]]:
        index = self.index
        paths = [index.relpath(s.path) for s in index.samples]
        keys = [s.patient_key for s in index.samples]
        if self.split_manifest is not None and self.split_manifest.exists():
            return apply_split_manifest(paths, keys, load_split_manifest(self.split_manifest))
        splits = split_index(index, val_frac=self.val_frac, test_frac=self.test_frac,
                             seed=self.seed)
        if self.split_manifest is not None:
            save_split_manifest(self.split_manifest, index, splits)
        return splits, []

    # -- loaders --------------------------------------------------------------------------
    def _loader(self, split: str, train: bool) -> DataLoader:
        if self.splits is None:
            self.setup()
        extra: dict[str, Any] = {}
        if self.num_workers > 0:
            extra = {"persistent_workers": True, "prefetch_factor": 4}
        shuffle = train
        if train and self.balanced:
            members = [self.samples[i] for i in self.splits[split]]
            gen = torch.Generator().manual_seed(self.seed)
            extra["sampler"] = WeightedRandomSampler(
                balanced_weights([s.label for s in members], [s.source for s in members]),
                num_samples=len(members), replacement=True, generator=gen)
            shuffle = False
        return DataLoader(self.datasets[split], batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, pin_memory=self.pin_memory,
                          collate_fn=Collate(self.preprocess, self.augment if train else None),
                          **extra)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches, in order, not augmented."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches, in order, not augmented."""
        return self._loader("test", train=False)

    # -- reporting ------------------------------------------------------------------------
    def save_split_manifest(self, path: str | Path) -> Path:
        """Write the split (relative path, label, split; no patient keys) as CSV."""
        if self.splits is None:
            self.setup()
        return save_split_manifest(path, self.index, self.splits)

    def summary(self) -> dict[str, Any]:
        """What will be trained on: a JSON-ready dict for the app and run reports."""
        if self.splits is None:
            self.setup()
        with_key = sum(s.patient_key is not None for s in self.samples)
        return {
            "root": self.index.root,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "counts": {k: dict(v) for k, v in self.class_counts.items()},
            "split_sizes": {k: len(self.splits[k]) for k in SPLITS},
            "unreadable": len(self.unreadable),
            "unreadable_files": [list(u) for u in self.unreadable],
            "too_small": dict(self.too_small),
            "left_out": len(self.left_out),
            "samples_with_patient_key": with_key,
            "fingerprint": self.fingerprint,
            "input_size": self.preprocess.input_size,
            "cache": {"hits": self.cache_result.hits, "misses": self.cache_result.misses},
            "seed": self.seed,
        }
