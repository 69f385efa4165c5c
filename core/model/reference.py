"""Reading reference-design ``.pth`` files (the model of DESIGN.md) into the timm model.

:func:`reference_config` and :func:`reference_to_timm` map such state dicts onto the timm
LungViT model; :func:`lungvit.core.model.checkpoint.import_reference` is the user-facing importer;
:func:`load_weights_only` reads a ``.pth`` without running code from it. The reference model
itself, an independent implementation the importer is tested against and the benchmarks
compare with, is :class:`lungvit.synthetic.reference_model.ReferenceViT`.
"""
from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lungvit.core.errors import CheckpointError
from lungvit.core.model.network import VARIANTS, ModelConfig

__all__ = ["STEM_CHANNELS", "STEM_STRIDES", "load_weights_only",
           "read_training_checkpoint", "reference_config", "reference_to_timm",
           "torch_state_dict"]

STEM_CHANNELS = (64, 64, 128, 128)
STEM_STRIDES = (1, 1, 2, 2)


# --- reading reference-design state dicts into the timm model ---------------------------

def _first_global(data: bytes, max_ops: int = 100_000) -> str | None:
    """The first global a pickle stream names (``GLOBAL posix.system``), read without
    unpickling it (:mod:`pickletools` only parses opcodes); None if it names none."""
    strings: list[str] = []
    try:
        for n, (op, arg, _) in enumerate(pickletools.genops(io.BytesIO(data))):
            if op.name == "GLOBAL":
                return "GLOBAL " + str(arg).replace(" ", ".")
            if op.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"GLOBAL {strings[-2]}.{strings[-1]}"
            if isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP" or n >= max_ops:
                break
    except (ValueError, EOFError, IndexError):  # a damaged stream: nothing more to say
        pass
    return None


def _refused(name: str, found: str | None) -> CheckpointError:
    what = f" ({found})" if found else ""
    return CheckpointError(f"{name} was refused: it holds Python objects other than "
                           f"tensors{what}, and LungViT never runs code from a model file")


def load_weights_only(name: str, source: bytes | str | os.PathLike[str]) -> Any:
    """``torch.load(weights_only=True)`` of a file or its bytes: tensors and plain
    containers only, no code run, and nothing of PyTorch's on the user's terminal.

    A plain Python pickle of protocol 3 or more is not a ``torch.save`` file (its legacy
    format writes protocol 2, its zip format a zip); it is refused before PyTorch reads it,
    which would warn about the protocol on stderr and then refuse it anyway.

    Args:
        name: the file's name, for messages.
        source: the file's bytes, or its path.

    Returns:
        What the file holds.

    Raises:
        CheckpointError: the file is truncated or not a PyTorch file, or it holds anything
            but tensors and plain containers (refused unread).
    """
    if isinstance(source, bytes):
        head = source[:4]
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    is_zip = head.startswith(b"PK\x03\x04")
    if not is_zip and len(head) >= 2 and head[0] == 0x80 and head[1] > 2:
        if isinstance(source, bytes):
            data = source[:1 << 20]
        else:
            with open(source, "rb") as f:
                data = f.read(1 << 20)  # the first global comes early in any real pickle
        raise _refused(name, _first_global(data))
    try:
        if isinstance(source, bytes):
            return torch.load(io.BytesIO(source), map_location="cpu", weights_only=True)
        return torch.load(source, map_location="cpu", weights_only=True, mmap=is_zip)
    except pickle.UnpicklingError as exc:
        found = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        raise _refused(name, found[0] if found else None) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as exc:
        reason = str(exc).strip().split(". ")[0][:200] or type(exc).__name__
        raise CheckpointError(f"{name} is truncated or is not a PyTorch file ({reason})") from None


def read_training_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A Lightning ``.ckpt`` of a LungViT run, read without running code (what
    ``lungvit train --resume`` continues from, and the best weights of a run).

    Raises:
        CheckpointError: it holds anything but tensors and plain containers, or it is not a
            Lightning checkpoint.
    """
    name = Path(path).name
    ckpt = load_weights_only(name, path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{name} is not a training checkpoint of a LungViT run (a "
                              ".ckpt file in the checkpoints/ folder of its run folder)")
    return ckpt


def torch_state_dict(name: str, data: bytes) -> dict[str, torch.Tensor]:
    """Read the bytes of a PyTorch file called ``name`` as a state dict, running no code.

    :func:`load_weights_only` refuses any pickled object but tensors and plain
    containers. ``{"state_dict": ...}`` / ``{"model": ...}`` containers and the ``module.`` /
    ``model.`` prefixes of DataParallel and Lightning are unwrapped.

    Raises:
        CheckpointError: the data is truncated, holds anything but tensors (a pickle that
            would run code is refused unread), or is not a state dict.
    """
    obj = load_weights_only(name, data)
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise CheckpointError(f"{name} is not a state dict (a mapping of names to tensors)")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in obj):
            obj = {k[len(prefix):]: v for k, v in obj.items()}
    return obj



# Reference key -> timm key (lungvit.core.model.network). The 2-D Linear after flattening becomes
# HybridEmbed's 1x1 conv; everything else keeps its shape.
_KEY_MAP: tuple[tuple[str, str], ...] = (
    (r"conv_stem\.(\d+)\.(.+)", r"patch_embed.backbone.\1.\2"),
    (r"to_patch_embedding\.1\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"cls_token", "cls_token"),
    (r"pos_embedding", "pos_embed"),
    (r"transformer\.layers\.(\d+)\.0\.norm\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.layers\.(\d+)\.0\.fn\.to_out\.0\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.layers\.(\d+)\.1\.norm\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.net\.0\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.layers\.(\d+)\.1\.fn\.net\.3\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
    (r"mlp_head\.0\.(weight|bias)", r"norm.\1"),
    (r"mlp_head\.1\.(weight|bias)", r"head.\1"),
)


def reference_config(state_dict: Mapping[str, torch.Tensor], *, heads: int = 16,
                     img_size: int | None = None) -> ModelConfig:
    """Infer the :class:`ModelConfig` of a reference-design state dict from its shapes.

    The number of heads cannot be read from ``to_qkv`` (only ``heads * dim_head`` can), so
    it is an argument: 16 in the reference design.

    Raises:
        CheckpointError: a key is missing or the shapes do not fit the reference design.
    """
    def get(key: str) -> torch.Tensor:
        if key not in state_dict:
            raise CheckpointError(f"not a reference-design state dict: it has no {key!r}")
        return state_dict[key]

    dim = get("cls_token").shape[-1]
    n_tokens = get("pos_embedding").shape[1] - 1
    convs = sorted(int(m.group(1)) for k in state_dict
                   if (m := re.fullmatch(r"conv_stem\.(\d+)\.weight", k))
                   and state_dict[k].ndim == 4)
    if len(convs) != len(STEM_STRIDES):
        raise CheckpointError(f"the reference stem has {len(STEM_STRIDES)} convolutions; "
                              f"this state dict has {len(convs)}")
    depth = sum(1 for k in state_dict
                if re.fullmatch(r"transformer\.layers\.\d+\.0\.fn\.to_qkv\.weight", k))
    inner = get("transformer.layers.0.0.fn.to_qkv.weight").shape[0] // 3
    if heads < 1 or inner % heads:
        raise CheckpointError(f"the attention is {inner} wide, which {heads} heads do not divide; "
                              "give the right number of heads")
    cfg = ModelConfig(
        name="reference", in_chans=get("conv_stem.0.weight").shape[1],
        stem_channels=tuple(state_dict[f"conv_stem.{i}.weight"].shape[0] for i in convs),
        stem_strides=STEM_STRIDES, embed_dim=dim, depth=depth, num_heads=heads,
        head_dim=inner // heads, mlp_dim=get("transformer.layers.0.1.fn.net.0.weight").shape[0],
        act="relu", qkv_bias="transformer.layers.0.0.fn.to_qkv.bias" in state_dict,
        num_classes=get("mlp_head.1.weight").shape[0],
        img_size=img_size or 4 * math.isqrt(n_tokens))
    grid = cfg.grid_size
    if grid[0] * grid[1] != n_tokens:
        raise CheckpointError(
            f"the positional embedding holds {n_tokens} image tokens, but a {cfg.img_size}x"
            f"{cfg.img_size} input makes {grid[0]}x{grid[1]}; give the right image size")
    ref = replace(VARIANTS["lungvit_ref64"], num_classes=cfg.num_classes)
    return replace(cfg, name="lungvit_ref64") if replace(cfg, name=ref.name) == ref else cfg


def reference_to_timm(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename (and, for the token projection, reshape) reference weights for the timm model.

    Raises:
        CheckpointError: the state dict has keys the reference design does not.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, tensor in state_dict.items():
        for pattern, target in _KEY_MAP:
            if match := re.fullmatch(pattern, key):
                new_key = match.expand(target)
                if new_key == "patch_embed.proj.weight" and tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]  # Linear (D, C) -> 1x1 conv (D, C, 1, 1)
                out[new_key] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        more = f" (and {len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise CheckpointError("not a reference-design state dict: unexpected keys "
                              f"{', '.join(unknown[:5])}{more}")
    return out
