"""The predictor: calibrated probabilities, per-file errors, uncertainty and OOD flags."""
from __future__ import annotations

import csv
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
from lungvit.cli.main import main as cli_main
from lungvit.core.errors import ScanReadError
from lungvit.core.model.network import create_model
from lungvit.core.predict import Predictor, energy_score
from lungvit.core.model.preprocess import PreprocessConfig, to_model_input
from lungvit.core.io.scan import Scan, ScanMetadata


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = create_model("lungvit_tiny", num_classes=9)
    info = CheckpointInfo(temperature=1.7, preprocess=PreprocessConfig(input_size=64))
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.safetensors", model, info)


@pytest.fixture(scope="module")
def predictor(checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(checkpoint, top_k=4)


def _xray_like(size: int = 96, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-((xx - 0.5) ** 2 / 0.08 + (yy - 0.5) ** 2 / 0.12))
    return np.clip(body * 0.8 + rng.normal(0, 0.03, (size, size)), 0, 1).astype(np.float32)


def _write_png(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(path)
    return path


def test_probabilities_are_calibrated_softmax_sorted(predictor: Predictor) -> None:
    pixels = _xray_like()
    scan = Scan(pixels, ScanMetadata(source_format="png", name="a.png"))
    pred = predictor.predict(scan)
    # Independent computation: forward the same preprocessed input, softmax(logits / T).
    with torch.no_grad():
        logits = predictor.model(to_model_input(pixels, predictor.preprocess)[None])[0]
    expected = torch.softmax(logits / 1.7, dim=-1)
    got = torch.tensor([pred.probabilities[label] for label in predictor.labels])
    assert torch.allclose(got, expected, atol=1e-5)
    values = list(pred.probabilities.values())
    assert values == sorted(values, reverse=True)
    assert abs(sum(values) - 1) < 1e-5
    assert len(pred.top_k) == 4 and pred.top_k[0] == (pred.label, pred.confidence)
    assert pred.label == predictor.labels[int(expected.argmax())]
    assert pred.energy == pytest.approx(float(energy_score(logits[None])[0]), abs=1e-4)


def test_batches_match_single_predictions(predictor: Predictor) -> None:
    scans = [Scan(_xray_like(seed=i), ScanMetadata(source_format="png")) for i in range(5)]
    small = Predictor(predictor.model, predictor.info, batch_size=2)
    batched = small.predict_scans(scans)
    for scan, pred in zip(scans, batched):
        single = predictor.predict(scan)
        assert single.label == pred.label
        assert single.confidence == pytest.approx(pred.confidence, abs=1e-5)


def test_concurrent_calls_give_the_sequential_answers(predictor: Predictor) -> None:
    scans = [Scan(_xray_like(seed=i), ScanMetadata(source_format="png")) for i in range(6)]
    expected = [predictor.predict(s).probabilities for s in scans]
    results: dict[int, dict[str, float]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                results[i] = predictor.predict(scans[i]).probabilities
        except BaseException as exc:  # collected and re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, probs in results.items():
        for label, p in expected[i].items():
            assert probs[label] == pytest.approx(p, abs=1e-5)


def test_blank_and_colour_photo_are_out_of_distribution(predictor: Predictor,
                                                        tmp_path: Path) -> None:
    blank = _write_png(tmp_path / "blank.png", np.full((80, 80), 0.5, np.float32))
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:120, 0:160] / 120
    photo = np.stack([0.6 + 0.4 * np.sin(6 * xx), 0.5 * yy, 0.3 + 0.5 * np.cos(4 * yy)], -1)
    photo = np.clip(photo + rng.normal(0, 0.05, photo.shape), 0, 1)
    photo_path = tmp_path / "holiday.jpg"
    Image.fromarray((photo * 255).astype(np.uint8), "RGB").save(photo_path, quality=90)
    xray = _write_png(tmp_path / "xray.png", _xray_like())
    blank_p, photo_p, xray_p = list(predictor.predict_files([blank, photo_path, xray]))
    assert blank_p.out_of_distribution and "blank" in blank_p.ood_reasons[0]
    assert photo_p.out_of_distribution and any("colour" in r for r in photo_p.ood_reasons)
    assert not xray_p.out_of_distribution, xray_p.ood_reasons


def test_energy_threshold_from_checkpoint_flags_unfamiliar_inputs(predictor: Predictor) -> None:
    scan = Scan(_xray_like(), ScanMetadata(source_format="png"))
    energy = predictor.predict(scan).energy
    info = CheckpointInfo(metrics={"ood": {"energy_threshold": energy - 1.0}})
    strict = Predictor(predictor.model, info)
    assert any("energy" in r for r in strict.predict(scan).ood_reasons)
    info = CheckpointInfo(metrics={"ood": {"energy_threshold": energy + 1.0}})
    assert Predictor(predictor.model, info).predict(scan).ood_reasons == []


def test_bad_files_are_reported_individually(predictor: Predictor, tmp_path: Path) -> None:
    good = _write_png(tmp_path / "good.png", _xray_like())
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not a scan at all" * 10)
    results = list(predictor.predict_files([empty, good, junk, good]))
    assert isinstance(results[0], ScanReadError) and "empty" in str(results[0])
    assert isinstance(results[2], ScanReadError)
    assert results[1].name == "good.png" and results[3].label == results[1].label


def test_files_are_read_at_the_size_the_app_reads_them(predictor: Predictor,
                                                        tmp_path: Path) -> None:
    """``lungvit predict`` and the app give one answer for a large JPEG 2000 DICOM: both
    read it at WORKING_SIDE (here its 1/2 resolution level)."""
    from lungvit.core.io.ingest import WORKING_SIDE, load_scan
    from lungvit.synthetic.dicom_write import write_dicom

    stored = np.rint(_xray_like(1600) * 4095).astype(np.uint16)
    path = write_dicom(tmp_path / "big.dcm", stored, bits_stored=12,
                       transfer_syntax="JPEG2000Lossless")
    (from_file,) = predictor.predict_files([path])
    working = load_scan(path, min_side=WORKING_SIDE)
    assert working.meta.resolution_level == 1
    assert from_file.probabilities == predictor.predict(working).probabilities


def test_cli_predict_json_csv_and_exit_codes(checkpoint: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    good = _write_png(tmp_path / "good.png", _xray_like())
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)  # a truncated PNG
    out_csv = tmp_path / "out.csv"
    code = cli_main(["predict", str(bad), str(good), "--model", str(checkpoint), "--json",
                     "--csv", str(out_csv)])
    assert code == 1
    records = json.loads(capsys.readouterr().out)
    assert [r["file"] for r in records] == ["bad.png", "good.png"]
    assert records[0]["status"] == "error" and records[1]["status"] == "ok"
    rows = list(csv.DictReader(out_csv.open()))
    assert rows[1]["label"] == records[1]["label"] and rows[0]["status"] == "error"
    assert cli_main(["predict", str(good), "--model", str(checkpoint)]) == 0
    assert "good.png: " in capsys.readouterr().out


def test_cli_predict_refuses_a_broken_model(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "model.safetensors"
    broken.write_bytes(b"\x00" * 3)
    good = _write_png(tmp_path / "good.png", _xray_like())
    assert cli_main(["predict", str(good), "--model", str(broken)]) == 3
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "Traceback" not in err
