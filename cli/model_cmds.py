"""``lungvit import-checkpoint`` and ``lungvit card``: bring a model in, say what it is."""
from __future__ import annotations

import argparse
from pathlib import Path

from lungvit.core.errors import CheckpointError
from lungvit.cli import exit_codes



def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``import-checkpoint`` and ``card`` sub-commands."""
    imp = sub.add_parser(
        "import-checkpoint",
        help="convert a reference-design PyTorch state dict into a LungViT checkpoint",
        description="Convert a reference-design .pth state dict (conv_stem.*, transformer.*, "
        "mlp_head.*) into a self-describing LungViT .safetensors checkpoint. The file is read "
        "with torch.load(weights_only=True): a file holding anything but tensors is refused.")
    imp.add_argument("reference", metavar="REF.pth", type=Path, help="reference state dict")
    imp.add_argument("--out", required=True, type=Path, metavar="MODEL.safetensors",
                     help="checkpoint to write")
    imp.add_argument("--labels", metavar="A,B,...",
                     help="class names in head order, comma-separated "
                     "(default: the nine classes of the reference design)")
    imp.add_argument("--heads", type=int, default=16,
                     help="attention heads (not recoverable from the weights; default 16)")
    imp.add_argument("--img-size", type=int, metavar="PX",
                     help="input side in pixels (default: from the positional embedding)")
    imp.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    imp.set_defaults(func=run_import)

    card = sub.add_parser("card", help="print a checkpoint's model card (Markdown)",
                          description="Print the Markdown model card of a LungViT checkpoint: "
                          "architecture, classes, training data and hardware, metrics, "
                          "calibration and intended use.")
    card.add_argument("model", metavar="MODEL", type=Path,
                      help="a .safetensors checkpoint (or a reference .pth)")
    card.set_defaults(func=run_card)


def run_import(args: argparse.Namespace) -> int:
    from lungvit.core.model.checkpoint import import_reference, save_checkpoint

    if args.out.exists() and not args.force:
        raise CheckpointError(f"{args.out} exists; pass --force to overwrite it")
    if args.out.suffix != ".safetensors":
        raise CheckpointError(f"--out must end in .safetensors, not {args.out.name!r}")
    labels = None
    if args.labels is not None:
        labels = [x.strip() for x in args.labels.split(",") if x.strip()]
    model, info = import_reference(args.reference, labels=labels, img_size=args.img_size,
                                   heads=args.heads)
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        path = save_checkpoint(args.out, model, info)
    except OSError as exc:
        raise CheckpointError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    cfg = info.model
    print(f"wrote {path}: {cfg.name}, {info.num_params:,} parameters, "
          f"{cfg.img_size}x{cfg.img_size} input, {len(info.labels)} classes "
          f"({', '.join(info.labels)})")
    return exit_codes.OK


def run_card(args: argparse.Namespace) -> int:
    from lungvit.core.model.checkpoint import read_checkpoint_info
    from lungvit.core.model.card import model_card

    print(model_card(read_checkpoint_info(args.model)), end="")
    return exit_codes.OK
