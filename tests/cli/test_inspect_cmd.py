"""``lungvit inspect``: output formats, saved images, exit codes, and no PHI by default."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from lungvit.cli.main import main
from lungvit.synthetic.dicom_write import PHI_MARKER, PHI_SENTINELS, write_dicom


@pytest.fixture()
def files(tmp_path):
    rng = np.random.default_rng(0)
    dcm = write_dicom(tmp_path / "in" / "chest.dcm", rng.integers(0, 4096, (80, 60)),
                      bits_stored=12, photometric="MONOCHROME1", window_center=2000,
                      window_width=3000, transfer_syntax="JPEG2000Lossless")
    png = tmp_path / "in" / "oct.png"
    Image.fromarray(rng.integers(0, 256, (50, 70), dtype=np.uint8)).save(png)
    bad = tmp_path / "in" / "broken.dcm"
    bad.write_bytes(b"%PDF-1.4 not a scan")
    return dcm, png, bad


def _run(capsys, caplog, *argv):
    caplog.set_level(logging.DEBUG)
    code = main(["-v", "inspect", *map(str, argv)])
    out = capsys.readouterr()
    return code, out.out, out.err + caplog.text


def test_json_lists_every_file_and_one_bad_file_does_not_stop_the_rest(files, capsys, caplog):
    dcm, png, bad = files
    code, out, _ = _run(capsys, caplog, dcm, bad, png, "--json")
    reports = json.loads(out)
    assert code == 1
    assert [r["ok"] for r in reports] == [True, False, True]
    assert reports[0]["metadata"]["inverted"] and reports[0]["metadata"]["name"] == "chest.dcm"
    assert reports[0]["metadata"]["original_shape"] == [80, 60]
    assert reports[0]["model_input"]["size"] == 64
    assert reports[1]["error_type"] == "CorruptFileError" and "PDF" in reports[1]["error"]
    assert reports[2]["metadata"]["source_format"] == "png"


def test_exit_code_is_zero_when_every_file_decodes(files, capsys, caplog):
    dcm, png, _ = files
    code, out, _ = _run(capsys, caplog, dcm, png)
    assert code == 0
    assert "chest.dcm: OK DICOM DX, 60x80, MONOCHROME1 (inverted" in out
    assert "oct.png: OK PNG, 70x50" in out


def test_phi_appears_only_with_show_phi(files, capsys, caplog):
    dcm, png, bad = files
    for argv in ((dcm, png, bad, "--json"), (dcm, png, bad)):
        code, out, err = _run(capsys, caplog, *argv)
        assert PHI_MARKER not in out + err
        for value in PHI_SENTINELS.values():
            assert value not in out + err, value
    code, out, err = _run(capsys, caplog, dcm, "--json", "--show-phi")
    phi = json.loads(out)[0]["metadata"]["phi"]
    for key, value in PHI_SENTINELS.items():
        assert phi[key] == value
    assert "patient-identifying" in err
    code, out, err = _run(capsys, caplog, dcm, "--show-phi")
    assert all(value in out for value in PHI_SENTINELS.values())


def test_patient_key_is_shown_stable_and_not_the_id(files, capsys, caplog, tmp_path):
    dcm, _, _ = files
    twin = write_dicom(tmp_path / "twin.dcm", np.zeros((8, 8), np.uint16), bits_stored=8)
    _, out, _ = _run(capsys, caplog, dcm, twin, "--json")
    keys = [r["metadata"]["patient_key"] for r in json.loads(out)]
    assert keys[0] == keys[1] and len(keys[0]) == 20
    assert PHI_SENTINELS["PatientID"] not in keys[0]


def test_save_writes_full_and_model_resolution_pngs(files, capsys, caplog, tmp_path):
    dcm, png, _ = files
    out_dir = tmp_path / "out"
    code, out, _ = _run(capsys, caplog, dcm, png, "--save", out_dir, "--input-size", "32",
                        "--json")
    assert code == 0
    reports = json.loads(out)
    saved = sorted(p.name for p in out_dir.iterdir())
    assert saved == ["chest.full.png", "chest.model32.png", "oct.full.png", "oct.model32.png"]
    with Image.open(out_dir / "chest.full.png") as im:
        assert im.size == (60, 80) and im.mode == "L"
        full = np.asarray(im) / 255.0
    with Image.open(out_dir / "chest.model32.png") as im:
        assert im.size == (32, 32)
    from lungvit.core.io.ingest import load_scan
    np.testing.assert_allclose(full, load_scan(dcm).pixels, atol=0.5 / 255 + 1e-6)
    assert reports[0]["saved"][0].endswith("chest.full.png")


def test_same_names_from_two_folders_do_not_overwrite(tmp_path, capsys, caplog):
    a = write_dicom(tmp_path / "a" / "x.dcm", np.zeros((8, 8), np.uint16), bits_stored=8)
    b = write_dicom(tmp_path / "b" / "x.dcm", np.ones((8, 8), np.uint16), bits_stored=8)
    _run(capsys, caplog, a, b, "--save", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "x-2.full.png", "x-2.model64.png", "x.full.png", "x.model64.png"]


def test_bad_input_size_is_a_usage_error(files, capsys):
    with pytest.raises(SystemExit) as info:
        main(["inspect", str(files[0]), "--input-size", "0"])
    assert info.value.code == 2
