"""Self-describing LungViT checkpoints: safetensors weights plus a JSON header.

One file rebuilds the model and says how to use it: the header (safetensors metadata key
``"lungvit"``, a JSON document) holds the model configuration, the ordered labels, the
preprocessing constants, the calibration temperature and the provenance (data, hardware,
time, metrics). Saving is atomic. Loading never runs code from the file: safetensors holds
tensors only, and PyTorch ``.pth`` files (reference-design state dicts, see
:func:`import_reference`) are read with ``torch.load(weights_only=True)``.

Format 2 adds an optional out-of-scope feature detector (:class:`lungvit.core.model.ood.FeatureDetector`):
its description in the header (``"ood_detector"``) and its two float32 arrays as tensors named
``lungvit_ood.*`` beside the weights. A file without one is still written as format 1, so
older LungViT versions keep reading it; format 1 files load with no detector.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from lungvit.core import __version__
from lungvit.core.atomic import atomic_open
from lungvit.core.errors import CheckpointError
from lungvit.core.model.network import DEFAULT_LABELS, ModelConfig, build_model, count_parameters
from lungvit.core.model.ood import TENSOR_PREFIX, FeatureDetector
from lungvit.core.model.preprocess import PreprocessConfig
from lungvit.core.model.reference import reference_config, reference_to_timm, torch_state_dict

__all__ = ["FORMAT_VERSION", "CheckpointInfo", "Provenance", "import_reference",
           "load_checkpoint", "read_checkpoint_info", "read_state_dict", "save_checkpoint"]

FORMAT_VERSION = 2
_PLAIN_FORMAT = 1  # written when the file holds the model's weights and nothing else
METADATA_KEY = "lungvit"
_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")  # zip (torch.save) or a raw pickle stream


@dataclass
class Provenance:
    """Who trained the weights on what, for how long, on which hardware.

    Args:
        dataset: one-line summary of the training data (e.g. "synthetic phantoms, 900 images").
        class_counts: training images per label.
        dataset_fingerprint: a hash identifying the exact training set.
        epochs: training epochs; train_time_s: wall time of training in seconds.
        gpu_type: e.g. "NVIDIA H100 80GB HBM3" ("" = CPU); gpu_count: GPUs used.
        date: ISO 8601 time the checkpoint was written (filled in by :func:`save_checkpoint`).
        lungvit_version: LungViT version that wrote the file (filled in likewise).
        source: where the weights came from when not trained here (e.g. an imported file).
        class_sources: training images per label and data source ({label: {source: n}}),
            where the data name their sources.
        citations: the datasets the weights were trained on, as they ask to be cited.
    """

    dataset: str = ""
    class_counts: dict[str, int] = field(default_factory=dict)
    dataset_fingerprint: str = ""
    epochs: int | None = None
    train_time_s: float | None = None
    gpu_type: str = ""
    gpu_count: int = 0
    date: str = ""
    lungvit_version: str = ""
    source: str = ""
    class_sources: dict[str, dict[str, int]] = field(default_factory=dict)
    citations: list[str] = field(default_factory=list)


@dataclass
class CheckpointInfo:
    """Everything a checkpoint says about its weights (the JSON header).

    Args:
        labels: class names in the order of the head's outputs.
        preprocess: input size and normalisation (None: the model's size, mean/std 0.5).
        model: the model configuration (None: taken from the model at save time).
        temperature: softmax temperature from calibration (1.0 = uncalibrated).
        provenance: training data, hardware, time, date and version.
        metrics: free-form evaluation results, e.g. ``{"accuracy": 0.9, "ece": 0.03,
            "per_class": {"lung-covid": {"precision": ..., "recall": ..., "f1": ...}}}``.
        num_params: parameter count (filled in at save time).
        notes, intended_use: free text shown on the model card.
        ood_detector: the learned out-of-scope detector, if one was fitted (its arrays
            travel as tensors beside the weights, its description in the header).
    """

    labels: tuple[str, ...] = DEFAULT_LABELS
    preprocess: PreprocessConfig | None = None
    model: ModelConfig | None = None
    temperature: float = 1.0
    provenance: Provenance = field(default_factory=Provenance)
    metrics: dict[str, Any] = field(default_factory=dict)
    num_params: int | None = None
    notes: str = ""
    intended_use: str = ""
    format_version: int = _PLAIN_FORMAT
    ood_detector: FeatureDetector | None = None

    def __post_init__(self) -> None:
        self.labels = tuple(self.labels)
        if not self.labels or not all(isinstance(x, str) and x for x in self.labels):
            raise ValueError("labels must be a non-empty list of non-empty strings")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels must be unique: {list(self.labels)}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, not {self.temperature}")
        if self.ood_detector is not None:  # a file with a detector is format 2
            self.format_version = max(self.format_version, FORMAT_VERSION)

    @property
    def variant(self) -> str:
        return self.model.name if self.model else ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON header (the detector's description only; its arrays are tensors)."""
        doc = {
            "format": "lungvit-checkpoint", "format_version": self.format_version,
            "labels": list(self.labels),
            "preprocess": self.preprocess.to_dict() if self.preprocess else None,
            "model": self.model.to_dict() if self.model else None,
            "temperature": self.temperature, "provenance": asdict(self.provenance),
            "metrics": self.metrics, "num_params": self.num_params, "notes": self.notes,
            "intended_use": self.intended_use,
        }
        if self.ood_detector is not None:  # absent, not null: format 1 readers reject the key
            doc["ood_detector"] = self.ood_detector.header()
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any],
                  tensors: Mapping[str, torch.Tensor] | None = None) -> CheckpointInfo:
        """Rebuild from :meth:`to_dict`'s output (ValueError/TypeError when malformed).

        Args:
            data: the header.
            tensors: the file's ``lungvit_ood.*`` tensors, needed when the header
                describes a feature detector.
        """
        data = dict(data)
        data.pop("format", None)
        prov = data.pop("provenance", None) or {}
        pre, model = data.pop("preprocess", None), data.pop("model", None)
        detector = data.pop("ood_detector", None)
        return cls(**data, preprocess=PreprocessConfig.from_dict(pre) if pre else None,
                   model=ModelConfig.from_dict(model) if model else None,
                   provenance=Provenance(**prov),
                   ood_detector=FeatureDetector.from_parts(detector, tensors or {})
                   if detector else None)


def _complete(model: nn.Module, info: CheckpointInfo) -> CheckpointInfo:
    """Fill in what the model and the moment know, and check the two agree."""
    cfg = getattr(model, "lungvit_config", None) or info.model
    if cfg is None:
        raise CheckpointError("the model has no lungvit_config and the info names no model "
                              "configuration; build models with lungvit.core.model.network")
    if info.model is not None and info.model != cfg:
        raise CheckpointError(f"the info's model configuration ({info.model.name}) differs "
                              f"from the model's ({cfg.name})")
    head = getattr(model, "head", None)
    outputs = head.out_features if isinstance(head, nn.Linear) else cfg.num_classes
    det = info.ood_detector
    if det is not None and det.dim != cfg.embed_dim:
        raise CheckpointError(f"the feature detector reads {det.dim}-wide features but the "
                              f"model's embedding is {cfg.embed_dim} wide")
    if outputs != len(info.labels):
        raise CheckpointError(f"head has {outputs} outputs but the checkpoint lists "
                              f"{len(info.labels)} labels")
    preprocess = info.preprocess or PreprocessConfig(input_size=cfg.img_size)
    if preprocess.input_size != cfg.img_size:
        raise CheckpointError(f"preprocessing resizes to {preprocess.input_size} px but the "
                              f"model takes {cfg.img_size} px inputs")
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    prov = replace(info.provenance, date=info.provenance.date or now,
                   lungvit_version=info.provenance.lungvit_version or __version__)
    return replace(info, model=cfg, preprocess=preprocess, provenance=prov,
                   num_params=count_parameters(model), format_version=_PLAIN_FORMAT)


def _json_default(obj: Any) -> Any:
    """numpy / torch scalars and arrays in metrics become plain numbers and lists."""
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} in the checkpoint info is not JSON-serialisable")


def save_checkpoint(path: str | os.PathLike[str], model: nn.Module, info: CheckpointInfo) -> Path:
    """Write ``model``'s weights and ``info`` to ``path`` atomically.

    The file is written beside its destination, flushed to disk and renamed over it, so a
    crash leaves either the old file or the new one, never half of one.

    Returns:
        The path written.
    """
    path = Path(path)
    info = _complete(model, info)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if info.ood_detector is not None:
        tensors.update(info.ood_detector.tensors())
    try:
        header = json.dumps(info.to_dict(), default=_json_default)
    except TypeError as exc:
        raise CheckpointError(str(exc)) from None
    blob = safetensors.torch.save(tensors, metadata={METADATA_KEY: header})
    with atomic_open(path, "wb", fsync=True, fsync_dir=True) as fh:
        fh.write(blob)
    return path


def read_bytes(path: Path) -> bytes:
    """The bytes of a model file (CheckpointError if missing, unreadable or empty)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except OSError as exc:
        raise CheckpointError(f"{path} cannot be read: {exc.strerror or exc}") from None
    if not data:
        raise CheckpointError(f"{path.name} is empty (0 bytes)")
    return data


def _read_header(name: str, data: bytes) -> CheckpointInfo:
    """Check the framing of a safetensors file and parse its LungViT header."""
    size = len(data)
    if size < 8:
        raise CheckpointError(f"{name} is truncated or is not a model file ({size} bytes)")
    (n,) = struct.unpack("<Q", data[:8])
    if 8 + n > size:
        raise CheckpointError(f"{name} is truncated or is not a safetensors file: its "
                              f"header claims {n} bytes, the file has {size}")
    try:
        header = json.loads(data[8:8 + n])
        need = 8 + n + max((v["data_offsets"][1] for k, v in header.items()
                            if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise CheckpointError(f"{name} is not a safetensors file (unreadable header)") from None
    if need > size:
        raise CheckpointError(f"{name} is truncated: its tensors need {need} bytes, "
                              f"the file has {size}")
    metadata = header.get("__metadata__") or {}
    body = memoryview(data)[8 + n:]
    if METADATA_KEY not in metadata:
        raise CheckpointError(
            f"{name} is a safetensors file without a LungViT header (no labels, model "
            "configuration or preprocessing); reference-design .pth files can be imported "
            "with `lungvit import-checkpoint`")
    try:
        doc = json.loads(metadata[METADATA_KEY])
        version = int(doc.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise CheckpointError(f"{name} was written in checkpoint format {version}; "
                                  f"this LungViT reads up to {FORMAT_VERSION}: upgrade LungViT")
        info = CheckpointInfo.from_dict(doc, _detector_tensors(header, body))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise CheckpointError(f"{name} has a damaged LungViT header: {exc}") from None
    if info.model is None:
        raise CheckpointError(f"{name} names no model configuration")
    if info.model.num_classes != len(info.labels):
        raise CheckpointError(f"{name}: head has {info.model.num_classes} outputs but "
                              f"the checkpoint lists {len(info.labels)} labels")
    return info


def _detector_tensors(header: Mapping[str, Any], body: memoryview) -> dict[str, torch.Tensor]:
    """The ``lungvit_ood.*`` float32 tensors, read from the raw bytes (no weights loaded)."""
    out = {}
    for key, spec in header.items():
        if key.startswith(TENSOR_PREFIX):
            if spec.get("dtype") != "F32":
                raise ValueError(f"tensor {key} is {spec.get('dtype')}, expected F32")
            start, end = spec["data_offsets"]
            arr = np.frombuffer(body[start:end], dtype="<f4").reshape(spec["shape"])
            out[key] = torch.from_numpy(arr.copy())
    return out


def read_checkpoint_info(path: str | os.PathLike[str]) -> CheckpointInfo:
    """Read a checkpoint's header without loading its weights into a model.

    A reference-design ``.pth`` has no header: it is imported to describe it.

    Raises:
        CheckpointError: the file is missing, damaged or not a LungViT checkpoint.
    """
    path = Path(path)
    data = read_bytes(path)
    if _is_torch_file(path, data):
        return _import(torch_state_dict(path.name, data), path.name)[1]
    return _read_header(path.name, data)


def _looks_like_safetensors(data: bytes) -> bool:
    """True when ``data`` has safetensors framing: a little-endian u64 header length that
    fits the file, then a JSON object."""
    if len(data) < 10:
        return False
    n = int.from_bytes(data[:8], "little")
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def _is_torch_file(path: Path, data: bytes) -> bool:
    # Safetensors framing is checked first: its header length can start with the byte 0x80
    # that also opens a raw pickle stream (about 1 file in 32).
    if _looks_like_safetensors(data):
        return False
    return data.startswith(_TORCH_MAGIC) or path.suffix.lower() in (".pth", ".pt")


def _load_weights(model: nn.Module, tensors: Mapping[str, torch.Tensor], name: str) -> None:
    """Load ``tensors`` into ``model``, explaining any mismatch by key and shape."""
    expected = model.state_dict()
    head = tensors.get("head.weight")
    if head is not None and head.shape[0] != expected["head.weight"].shape[0]:
        raise CheckpointError(f"{name}: head has {head.shape[0]} outputs but the checkpoint "
                              f"lists {expected['head.weight'].shape[0]} labels")
    missing = [k for k in expected if k not in tensors and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:5])}" if missing else "",
                 f"unexpected {', '.join(unexpected[:5])}" if unexpected else ""]
        raise CheckpointError(f"{name} does not fit its model: " + "; ".join(p for p in parts if p))
    for key, tensor in tensors.items():
        if tensor.shape != expected[key].shape:
            raise CheckpointError(f"{name}: weight {key} has shape {tuple(tensor.shape)}, "
                                  f"expected {tuple(expected[key].shape)}")
    model.load_state_dict({**expected, **tensors}, strict=True)


def load_checkpoint(path: str | os.PathLike[str], *,
                    map_location: str | torch.device = "cpu") -> tuple[nn.Module, CheckpointInfo]:
    """Rebuild a model from a checkpoint file alone.

    A LungViT ``.safetensors`` checkpoint is read with its header; a reference-design
    PyTorch state dict (``.pth``/``.pt``) is imported with the defaults of
    :func:`import_reference`.

    Returns:
        ``(model, info)``: the model in eval mode on ``map_location``, and its header.

    Raises:
        CheckpointError: the file is missing, empty, truncated, unsafe, not a checkpoint,
            or its weights do not fit the model it describes.
    """
    path = Path(path)
    data = read_bytes(path)
    if _is_torch_file(path, data):
        model, info = _import(torch_state_dict(path.name, data), path.name)
    else:
        info = _read_header(path.name, data)
        try:
            tensors = safetensors.torch.load(data)
            model = build_model(info.model)
        except ValueError as exc:
            raise CheckpointError(f"{path.name}: {exc}") from None
        except SafetensorError as exc:
            raise CheckpointError(f"{path.name} has damaged tensor data: {exc}") from None
        weights = {k: v for k, v in tensors.items() if not k.startswith(TENSOR_PREFIX)}
        _load_weights(model, weights, path.name)
    return model.to(map_location).eval(), info


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a PyTorch state dict file without executing code (see :func:`torch_state_dict`)."""
    path = Path(path)
    return torch_state_dict(path.name, read_bytes(path))


def import_reference(path_or_state_dict: str | os.PathLike[str] | Mapping[str, torch.Tensor], *,
                     labels: list[str] | tuple[str, ...] | None = None,
                     img_size: int | None = None,
                     heads: int = 16) -> tuple[nn.Module, CheckpointInfo]:
    """Convert a reference-design state dict exactly into the timm LungViT model.

    Args:
        path_or_state_dict: a ``.pth`` file (read with ``weights_only=True``) or a state dict.
        labels: class names in head order (default: the nine of the reference design).
        img_size: input side; default inferred from the positional embedding (grid x 4).
        heads: attention heads (not recoverable from the weights; 16 in the reference).

    Returns:
        ``(model, info)`` in eval mode; save with :func:`save_checkpoint`.

    Raises:
        CheckpointError: the file is unsafe or damaged, or its keys and shapes do not fit
            the reference design, or ``labels`` does not match the head.
    """
    if isinstance(path_or_state_dict, Mapping):
        return _import(dict(path_or_state_dict), "state dict", labels, img_size, heads)
    path = Path(path_or_state_dict)
    return _import(read_state_dict(path), path.name, labels, img_size, heads)


def _import(state_dict: dict[str, torch.Tensor], name: str,
            labels: list[str] | tuple[str, ...] | None = None, img_size: int | None = None,
            heads: int = 16) -> tuple[nn.Module, CheckpointInfo]:
    labels = tuple(labels) if labels is not None else DEFAULT_LABELS
    try:
        cfg = reference_config(state_dict, heads=heads, img_size=img_size)
        if cfg.num_classes != len(labels):
            raise CheckpointError(f"{name}: head has {cfg.num_classes} outputs but "
                                  f"{len(labels)} labels were given")
        info = CheckpointInfo(
            labels=labels, provenance=Provenance(source=f"imported from reference-design {name}"),
            notes="Imported from a reference-design checkpoint: its training data, hardware "
                  "and metrics are not recorded in that file.")
        model = build_model(cfg)
    except CheckpointError:
        raise
    except (ValueError, IndexError) as exc:  # impossible shapes or configuration, bad labels
        raise CheckpointError(f"{name}: {exc}") from None
    _load_weights(model, reference_to_timm(state_dict), name)
    return model.eval(), _complete(model, info)
