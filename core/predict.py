"""Calibrated predictions with honest flags: uncertain answers and out-of-scope inputs.

A :class:`Predictor` loads a checkpoint once and turns scans into probabilities for every
class (temperature-scaled with the checkpoint's calibration), sorted, with top-k. It says
when an answer is uncertain (low top probability or high entropy) and when an input is
probably not a chest X-ray or retinal OCT at all (blank, a colour photo, a CT/MR slice,
evidence unlike the training data by the energy score, or, when the checkpoint carries a
learned detector (:mod:`lungvit.core.model.ood`), features far from every training class), and why.
"""
from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lungvit.core.model.checkpoint import CheckpointInfo, load_checkpoint
from lungvit.core.errors import CheckpointError, ScanReadError
from lungvit.core.io.ingest import WORKING_SIDE, load_scan
from lungvit.core.model.ood import features_and_logits
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input
from lungvit.core.io.scan import Scan

# Modalities the model was built for; DICOMs of other modalities are flagged.
EXPECTED_MODALITIES = frozenset({"CR", "DX", "RG", "DR", "OPT", "OCT", "OP", "OT", "SC"})
_MODALITY_NAMES = {"CT": "a CT image", "MR": "an MR image", "US": "an ultrasound image",
                   "NM": "a nuclear medicine image", "PT": "a PET image",
                   "MG": "a mammogram", "XA": "an angiogram", "ES": "an endoscopy image",
                   "XC": "an external camera photo", "SM": "a microscopy slide"}


BUNDLED_MODEL = "lungvit-real.safetensors"  # trained on real public scans (assets/README.md)
DEMO_MODEL = "lungvit-demo.safetensors"  # trained on synthetic phantoms, for trying LungViT out


def bundled_model_path() -> Path | None:
    """The default checkpoint shipped in ``lungvit.assets`` (real scans), or None."""
    import lungvit.assets

    path = Path(lungvit.assets.__file__).parent / BUNDLED_MODEL
    return path if path.is_file() else None


def demo_model_path() -> Path | None:
    """The phantom-trained demo checkpoint shipped in ``lungvit.assets``, or None."""
    import lungvit.assets

    path = Path(lungvit.assets.__file__).parent / DEMO_MODEL
    return path if path.is_file() else None


def energy_score(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Free energy ``-T * logsumexp(logits / T)`` per row; higher = less familiar input.

    Args:
        logits: (B, C) raw model outputs.
        temperature: the energy temperature (1.0 is the usual choice).

    Returns:
        (B,) energies.
    """
    return -temperature * torch.logsumexp(logits.float() / temperature, dim=-1)


@dataclass(frozen=True)
class Thresholds:
    """When a prediction is uncertain or an input looks out of scope.

    Args:
        min_confidence: top probability below this is uncertain.
        max_entropy: normalised entropy (0..1) above this is uncertain.
        blank_std: pixel standard deviation below this is a blank image.
        color_saturation: mean chroma above this is a colour photo, not a scan.
    """

    min_confidence: float = 0.5
    max_entropy: float = 0.6
    blank_std: float = 0.02
    color_saturation: float = 0.08


@dataclass
class Prediction:
    """One scan's answer.

    Attributes:
        name: the file name (no path), if known.
        label / label_index: the top class.
        confidence: its calibrated probability.
        probabilities: every class, highest first.
        top_k: the first k of ``probabilities`` as (label, probability) pairs.
        entropy: normalised entropy of the distribution, 0 (certain) to 1 (uniform).
        uncertain / uncertain_reasons: whether and why the answer should not be trusted.
        out_of_distribution / ood_reasons: whether and why the input looks out of scope.
        energy: the energy score of the logits (see :func:`energy_score`).
        temperature: the calibration temperature applied.
        feature_distance: distance of the scan's features from the nearest training class
            (:class:`lungvit.core.model.ood.FeatureDetector`); None when the model has no detector.
        feature_threshold: the distance above which a scan is out of scope (None likewise).
    """

    name: str | None
    label: str
    label_index: int
    confidence: float
    probabilities: dict[str, float]
    top_k: list[tuple[str, float]]
    entropy: float
    uncertain: bool
    uncertain_reasons: list[str] = field(default_factory=list)
    out_of_distribution: bool = False
    ood_reasons: list[str] = field(default_factory=list)
    energy: float = 0.0
    temperature: float = 1.0
    feature_distance: float | None = None
    feature_threshold: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["top_k"] = [[k, v] for k, v in self.top_k]
        return d


class Predictor:
    """Loads a model once and serves calibrated predictions; safe to share across threads.

    Args:
        model: a LungViT model (a timm ``VisionTransformer``).
        info: its checkpoint header (labels, preprocessing, temperature, OOD statistics).
        device: where to run; default CUDA when available, else CPU.
        batch_size: largest batch sent to the model at once.
        top_k: how many classes ``Prediction.top_k`` lists.
        thresholds: uncertainty and out-of-scope thresholds.
    """

    def __init__(self, model: nn.Module, info: CheckpointInfo, *,
                 device: str | torch.device | None = None, batch_size: int = 32,
                 top_k: int = 3, thresholds: Thresholds = Thresholds()) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()
        self.info = info
        self.labels: tuple[str, ...] = tuple(info.labels)
        img_size = info.model.img_size if info.model else 64
        self.preprocess: PreprocessConfig = info.preprocess or PreprocessConfig(input_size=img_size)
        self.temperature = float(info.temperature)
        self.batch_size = batch_size
        self.top_k = max(1, min(top_k, len(self.labels)))
        self.thresholds = thresholds
        ood = info.metrics.get("ood", {}) if isinstance(info.metrics, dict) else {}
        self.energy_threshold: float | None = ood.get("energy_threshold")
        self.detector = info.ood_detector  # None: old checkpoints, rules and energy only
        # Forward passes run one at a time: parallel ones would only compete for the same
        # cores (or GPU). Explanations do not need it (they serialise their own captures).
        self.lock = threading.RLock()

    @classmethod
    def from_checkpoint(cls, path: str | Path | None = None, **kwargs: Any) -> Predictor:
        """Load ``path``, or the bundled real-data model when ``path`` is None."""
        if path is None:
            path = bundled_model_path()
            if path is None:
                raise CheckpointError("no model given and no bundled model is installed; "
                                      "pass a checkpoint file (--model MODEL)")
        model, info = load_checkpoint(path)
        return cls(model, info, **kwargs)

    def prepare(self, scan: Scan) -> torch.Tensor:
        """The model input for one scan: (1, S, S), normalised."""
        return to_model_input(scan.pixels, self.preprocess)

    @torch.inference_mode()
    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Raw logits (B, C) for prepared inputs (B, 1, S, S), batched on the device."""
        outs = []
        for start in range(0, inputs.shape[0], self.batch_size):
            chunk = inputs[start:start + self.batch_size].to(self.device, non_blocking=True)
            with self.lock:
                outs.append(self.model(chunk).float().cpu())
        return torch.cat(outs) if outs else torch.empty(0, len(self.labels))

    def predict(self, scan: Scan) -> Prediction:
        """Predict one scan."""
        return self.predict_scans([scan])[0]

    @torch.inference_mode()
    def features_and_logits(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] features (B, D) and logits (B, C) of prepared inputs, in one pass."""
        feats, logits = [], []
        for start in range(0, inputs.shape[0], self.batch_size):
            chunk = inputs[start:start + self.batch_size].to(self.device, non_blocking=True)
            with self.lock:
                f, z = features_and_logits(self.model, chunk)
            feats.append(f.cpu())
            logits.append(z.cpu())
        if not feats:
            return torch.empty(0, 0), torch.empty(0, len(self.labels))
        return torch.cat(feats), torch.cat(logits)

    def predict_scans(self, scans: Sequence[Scan]) -> list[Prediction]:
        """Predict many scans in batches."""
        if not scans:
            return []
        inputs = torch.stack([self.prepare(s) for s in scans])  # (B, 1, S, S)
        if self.detector is None:
            logits = self.logits(inputs)
            return [self._describe(scan, row) for scan, row in zip(scans, logits)]
        feats, logits = self.features_and_logits(inputs)
        dists = self.detector.distance(feats).tolist()
        return [self._describe(scan, row, d) for scan, row, d in zip(scans, logits, dists)]

    def predict_files(self, paths: Iterable[str | Path]) -> Iterator[Prediction | ScanReadError]:
        """Read and predict files in order, one batch of decoded scans in memory at a time.

        Yields:
            For each path, its :class:`Prediction`, or the :class:`ScanReadError` that
            says why it could not be read (never raised: one bad file stops nothing).
        """
        pending: list[ScanReadError | Scan] = []
        for path in paths:
            try:
                pending.append(load_scan(path, min_side=WORKING_SIDE))
            except ScanReadError as exc:
                pending.append(exc)
            if sum(isinstance(x, Scan) for x in pending) >= self.batch_size:
                yield from self._flush(pending)
                pending = []
        yield from self._flush(pending)

    def _flush(self, pending: list[ScanReadError | Scan],
               ) -> Iterator[Prediction | ScanReadError]:
        preds = iter(self.predict_scans([x for x in pending if isinstance(x, Scan)]))
        for item in pending:
            yield next(preds) if isinstance(item, Scan) else item

    def _describe(self, scan: Scan, logits: torch.Tensor,
                  feature_distance: float | None = None) -> Prediction:
        probs = torch.softmax(logits / self.temperature, dim=-1)
        order = torch.argsort(probs, descending=True).tolist()
        ranked = [(self.labels[i], float(probs[i])) for i in order]
        p = probs.clamp_min(1e-12)
        entropy = float(-(p * p.log()).sum() / math.log(len(self.labels)))
        top_label, confidence = ranked[0]
        t = self.thresholds
        uncertain = []
        if confidence < t.min_confidence:
            uncertain.append(f"the top class has only {confidence:.0%} probability")
        if entropy > t.max_entropy:
            uncertain.append(f"the probabilities are spread out (entropy {entropy:.2f} of 1)")
        energy = float(energy_score(logits[None])[0])
        return Prediction(
            name=scan.meta.name, label=top_label, label_index=order[0], confidence=confidence,
            probabilities=dict(ranked), top_k=ranked[:self.top_k], entropy=entropy,
            uncertain=bool(uncertain), uncertain_reasons=uncertain,
            ood_reasons=(ood := self.ood_reasons(scan, energy, feature_distance)),
            out_of_distribution=bool(ood), energy=energy, temperature=self.temperature,
            feature_distance=feature_distance,
            feature_threshold=self.detector.threshold if feature_distance is not None else None)

    def ood_reasons(self, scan: Scan, energy: float | None = None,
                    feature_distance: float | None = None) -> list[str]:
        """Why ``scan`` is probably not a chest X-ray or retinal OCT (empty if no reason).

        Args:
            scan: the decoded scan (its pixels and metadata feed the rules).
            energy: its energy score, checked against the checkpoint's energy threshold.
            feature_distance: its distance from the training classes, checked against the
                checkpoint's feature detector (ignored when the checkpoint has none).

        Returns:
            One sentence per reason.
        """
        t = self.thresholds
        meta = scan.meta
        reasons = []
        std = float(np.std(scan.pixels))
        if std < t.blank_std:
            reasons.append(f"the image is blank or nearly uniform (pixel spread {std:.3f})")
        if meta.color_saturation is not None and meta.color_saturation > t.color_saturation:
            reasons.append(f"it is a colour image (saturation {meta.color_saturation:.2f}); "
                           "chest X-rays and OCT scans are grayscale - probably a photo")
        if meta.modality and meta.modality.upper() not in EXPECTED_MODALITIES:
            kind = _MODALITY_NAMES.get(meta.modality.upper(), f"a {meta.modality} image")
            reasons.append(f"the DICOM says it is {kind}; the model reads chest radiographs "
                           "and retinal OCT")
        if (energy is not None and self.energy_threshold is not None
                and energy > self.energy_threshold):
            reasons.append("the model's evidence is unlike anything in its training data "
                           f"(energy {energy:.2f} above {self.energy_threshold:.2f})")
        if (feature_distance is not None and self.detector is not None
                and feature_distance > self.detector.threshold):
            reasons.append("unlike the scans this model was trained on (feature distance "
                           f"{feature_distance:.1f} above threshold {self.detector.threshold:.1f})")
        return reasons
