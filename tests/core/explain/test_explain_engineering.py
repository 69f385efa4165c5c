"""Explaining the served instance: no leaked hooks or memory, correct under concurrency."""
from __future__ import annotations

import gc
import threading
import tracemalloc

import numpy as np
import pytest
import torch

from lungvit.core.explain import explain
from lungvit.core.model.preprocess import PreprocessConfig

CFG = PreprocessConfig(input_size=32)
HOOKED = ["rollout", "grad_rollout", "gradcam"]


def hook_count(model: torch.nn.Module) -> int:
    total = 0
    for m in model.modules():
        for name in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                     "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs"):
            total += len(getattr(m, name, {}) or {})
    return total


def fused_flags(model: torch.nn.Module) -> list[bool]:
    """Each block's fused flag; False too where a capture's instance-level forward was left."""
    return [blk.attn.fused_attn and "forward" not in vars(blk.attn) for blk in model.blocks]


def live_tensors() -> int:
    gc.collect()
    # issubclass on the type: isinstance would poke deprecated torch proxies (FutureWarning).
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_hundred_calls_leave_no_hooks_and_no_growth(vit) -> None:
    model = vit  # a plain small timm ViT: the hooks are the same, the calls cheaper
    flags = fused_flags(model)
    scan = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    for _ in range(5):  # warm-up: allocator pools, lazy imports
        explain(model, scan, preprocess=CFG, methods=HOOKED, faithfulness=False)
    gc.collect()
    tensors0, objects0, rss0 = live_tensors(), len(gc.get_objects()), rss_bytes()
    for _ in range(100):
        explain(model, scan, preprocess=CFG, methods=HOOKED, faithfulness=False)
    assert hook_count(model) == 0
    assert fused_flags(model) == flags
    assert live_tensors() <= tensors0
    objects = len(gc.get_objects()) - objects0
    assert objects < 1000, f"{objects} more live Python objects after 100 calls"
    assert rss_bytes() - rss0 < 64 * 2**20
    assert all(p.grad is None for p in model.parameters())

    # Python-level allocations over a few more calls, traced (tracing is slow, so only 10).
    tracemalloc.start()
    try:
        snap0 = tracemalloc.take_snapshot()
        for _ in range(10):
            explain(model, scan, preprocess=CFG, methods=HOOKED, faithfulness=False)
        gc.collect()
        snap1 = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(s.size_diff for s in snap1.compare_to(snap0, "filename"))
    assert grown < 256 * 1024, f"Python allocations grew by {grown} bytes over 10 calls"


def test_failures_leave_no_hooks(tiny_lungvit) -> None:
    model = tiny_lungvit
    flags = fused_flags(model)
    real_head = model.head

    class Boom(torch.nn.Module):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Boom.calls += 1
            if Boom.calls > 1:  # let the prediction pass, fail inside each method
                raise RuntimeError("boom")
            return real_head(x)

    scan = np.zeros((32, 32), np.float32)
    for method in HOOKED + ["ig"]:
        Boom.calls = 0
        model.head = Boom()
        try:
            with pytest.raises(RuntimeError, match="boom"):
                explain(model, scan, preprocess=CFG, methods=[method])
        finally:
            model.head = real_head
        assert hook_count(model) == 0, method
        assert fused_flags(model) == flags, method


def test_concurrent_explain_and_predict_are_correct(tiny_lungvit) -> None:
    model = tiny_lungvit
    rng = np.random.default_rng(1)
    scans = [rng.random((48, 48)).astype(np.float32) for _ in range(3)]
    methods = HOOKED + ["ig"]
    expected = [explain(model, s, preprocess=CFG, methods=methods, faithfulness=False) for s in scans]
    batch = torch.randn(4, 1, 32, 32)
    with torch.inference_mode():
        logits = model(batch)

    errors: list[str] = []
    stop = threading.Event()

    def predictor() -> None:
        n = 0
        while not stop.is_set() or n < 3:
            with torch.inference_mode():
                out = model(batch)
            if not torch.allclose(out, logits, rtol=1e-4, atol=1e-5):
                errors.append(f"predict differs by {float((out - logits).abs().max())}")
            n += 1

    def explainer(i: int) -> None:
        for _ in range(3):
            got = explain(model, scans[i], preprocess=CFG, methods=methods, faithfulness=False)
            for m in methods:
                if not np.allclose(got[m].raw, expected[i][m].raw, rtol=1e-4, atol=1e-6):
                    errors.append(f"{m} on scan {i} differs under concurrency")

    preds = [threading.Thread(target=predictor) for _ in range(2)]
    exps = [threading.Thread(target=explainer, args=(i,)) for i in range(3)]
    for t in preds + exps:
        t.start()
    for t in exps:
        t.join(timeout=300)
    stop.set()
    for t in preds:
        t.join(timeout=60)
    assert not errors, errors[:5]
    assert hook_count(model) == 0
    assert all(fused_flags(model))


# ----------------------------------------------------------------------------- the command


@pytest.fixture
def cli_inputs(tmp_path, tiny_lungvit):
    from PIL import Image

    from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
    from lungvit.synthetic.phantoms import CLASS_NAMES, make_phantom

    ckpt = save_checkpoint(tmp_path / "tiny.safetensors", tiny_lungvit,
                           CheckpointInfo(labels=CLASS_NAMES, preprocess=CFG, temperature=1.5))
    png = tmp_path / "scan.png"
    Image.fromarray((make_phantom("lung-opacity", size=80, seed=3).image * 255).astype(np.uint8)).save(png)
    return ckpt, png


def test_cli_explain_json_and_files(cli_inputs, tmp_path, capsys) -> None:
    import json

    from PIL import Image

    from lungvit.cli.main import main

    ckpt, png = cli_inputs
    out = tmp_path / "maps"
    code = main(["explain", str(png), "--model", str(ckpt), "--method", "rollout,ig", "--target",
                 "lung-opacity", "--out", str(out), "--json", "--opacity", "0.3"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["target_label"] == "lung-opacity" and res["file"] == "scan.png"
    assert [m["method"] for m in res["methods"]] == ["rollout", "ig"]
    for m in res["methods"]:
        assert set(m["faithfulness"]) == {"deletion_auc", "insertion_auc", "random_deletion_auc",
                                          "random_insertion_auc"}
        img = np.asarray(Image.open(m["files"]["overlay"]))
        assert img.shape == (80, 80, 3)
        assert np.load(m["files"]["map"]).shape == (80, 80)
    assert np.load(res["methods"][0]["files"]["raw"]).shape == (8, 8)
    assert 0 < res["methods"][1]["extras"]["relative_delta"] < 0.01


def test_cli_explain_reads_a_large_jpeg2000_as_predict_does(cli_inputs, tmp_path, capsys) -> None:
    """`lungvit explain` explains the image `lungvit predict` answers (a large JPEG 2000
    read at WORKING_SIDE, here half size) and draws its files on the full-size read."""
    import json

    from PIL import Image

    from lungvit.cli.main import main
    from lungvit.core.io.ingest import WORKING_SIDE, load_scan
    from lungvit.core.predict import Predictor
    from lungvit.synthetic.dicom_write import write_dicom
    from lungvit.synthetic.phantoms import make_phantom

    ckpt, _ = cli_inputs
    stored = np.rint(np.kron(make_phantom("lung-opacity", size=100, seed=3).image,
                             np.ones((16, 16))) * 4095).astype(np.uint16)
    dcm = write_dicom(tmp_path / "big.dcm", stored, bits_stored=12,
                      transfer_syntax="JPEG2000Lossless")
    out = tmp_path / "maps"
    assert main(["explain", str(dcm), "--model", str(ckpt), "--method", "rollout",
                 "--out", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    predicted = Predictor.from_checkpoint(ckpt).predict(load_scan(dcm, min_side=WORKING_SIDE))
    assert res["target_label"] == predicted.label
    files = res["methods"][0]["files"]
    assert np.asarray(Image.open(files["overlay"])).shape == (1600, 1600, 3)
    assert np.load(files["map"]).shape == (1600, 1600)


def test_cli_explain_table_and_errors(cli_inputs, tmp_path, capsys) -> None:
    from lungvit.cli.main import main

    ckpt, png = cli_inputs
    assert main(["explain", str(png), "--model", str(ckpt), "--method", "gradcam", "--target", "2"]) == 0
    text = capsys.readouterr().out
    assert "explaining lung-oct-cnv" in text and "gradcam" in text and "random" in text
    assert main(["explain", str(png), "--model", str(ckpt), "--method", "ig"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("ig "))
    assert "IG delta" in line and "gradient evaluations" in line
    assert main(["explain", str(png), "--model", str(ckpt), "--method", "lime"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["explain", str(png), "--model", str(ckpt), "--target", "lung-unicorn"]) == 2
    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    assert main(["explain", str(bad), "--model", str(ckpt)]) == 1
    assert main(["explain", str(png), "--model", str(tmp_path / "missing.safetensors")]) == 3
