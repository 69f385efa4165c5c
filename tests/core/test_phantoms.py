"""The synthetic phantom generator, its file writers and ``lungvit demo-data``."""
from __future__ import annotations

import csv

import numpy as np
import pydicom
import pytest
from PIL import Image

from lungvit.cli.main import main
from lungvit.synthetic.dicom_write import PHI_MARKER, PHI_SENTINELS
from lungvit.synthetic.phantom_files import (DICOM_VARIANTS, RASTER_FORMATS, dicom_variant,
                                        write_mask, write_phantom)
from lungvit.synthetic.phantoms import (CLASS_NAMES, NORMAL_CLASSES, OCT_CLASSES, label_index,
                                   make_dataset, make_phantom)

SIZE = 96


@pytest.fixture(scope="module")
def dataset():
    return list(make_dataset(6, size=SIZE, seed=3))


def test_class_names_follow_the_design():
    assert CLASS_NAMES == tuple(sorted(CLASS_NAMES)) and len(CLASS_NAMES) == 9
    assert CLASS_NAMES[0] == "lung-covid" and CLASS_NAMES[8] == "lung-viral-pneumonia"
    assert label_index("lung-opacity") == 6 and label_index(2) == 2
    for bad in ("lung-cancer", 9, -1):
        with pytest.raises(ValueError):
            label_index(bad)


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_same_seed_same_phantom(label):
    a, b = make_phantom(label, size=64, seed=11), make_phantom(label, size=64, seed=11)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.mask, b.mask)
    c = make_phantom(label, size=64, seed=12)
    assert not np.array_equal(a.image, c.image)


@pytest.mark.parametrize("label", CLASS_NAMES)
def test_image_mask_and_region(label):
    for seed in range(5):
        p = make_phantom(label, size=SIZE, seed=seed)
        assert p.image.shape == p.mask.shape == p.region.shape == (SIZE, SIZE)
        assert p.image.dtype == np.float32 and p.mask.dtype == bool
        assert 0.0 <= p.image.min() and p.image.max() <= 1.0 and np.isfinite(p.image).all()
        assert p.label == label and p.label_index == CLASS_NAMES.index(label)
        assert p.modality == ("OPT" if label in OCT_CLASSES else "DX")
        assert p.image.std() > 0.05  # not blank
        if label in NORMAL_CLASSES:
            assert not p.mask.any()
        else:
            # A visible lesion (at least ~0.1% of the image), entirely inside the body/retina.
            assert p.mask.sum() >= SIZE * SIZE * 0.001
            assert not (p.mask & ~p.region).any()
            assert p.region.mean() < 0.95  # the region is not simply the whole image


def test_region_is_anatomy():
    xray = make_phantom("lung-normal", size=SIZE, seed=1)
    # The body is brighter than the air around it.
    assert xray.image[xray.region].mean() > xray.image[~xray.region].mean() + 0.2
    oct_ = make_phantom("lung-oct-normal", size=SIZE, seed=1)
    above = np.cumsum(oct_.region, axis=0) == 0  # vitreous: rows above the retina
    assert oct_.image[oct_.region].mean() > oct_.image[above].mean() + 0.15


@pytest.mark.parametrize("sick", ["lung-covid", "lung-opacity", "lung-tuberculosis",
                                  "lung-viral-pneumonia"])
def test_findings_change_pixels_only_near_the_mask(sick):
    # Same patient and image seed: only the finding differs from the normal image.
    a = make_phantom(sick, size=SIZE, seed=4, patient=9)
    b = make_phantom("lung-normal", size=SIZE, seed=4, patient=9)
    assert a.patient_id == b.patient_id == "P0009"
    np.testing.assert_array_equal(a.region, b.region)
    diff = np.abs(a.image.astype(np.float64) - b.image)
    near = a.mask.copy()
    for axis in (0, 1):  # dilate by 3 pixels
        for shift in (-3, -2, -1, 1, 2, 3):
            near |= np.roll(a.mask, shift, axis=axis)
    assert diff[a.mask].mean() > 0.03
    assert diff[near].sum() > 0.8 * diff.sum()


def test_oct_counterfactual_keeps_pose():
    a = make_phantom("lung-oct-drusen", size=SIZE, seed=4, patient=9)
    b = make_phantom("lung-oct-normal", size=SIZE, seed=4, patient=9)
    columns = a.mask.any(axis=0)
    diff = np.abs(a.image.astype(np.float64) - b.image)
    # Drusen lift the retina above them; columns without drusen barely change.
    assert diff[:, columns].mean() > 3 * diff[:, ~columns].mean()


def test_classes_differ_statistically(dataset):
    by_class = {c: [p for p in dataset if p.label == c] for c in CLASS_NAMES}
    assert all(len(v) == 6 for v in by_class.values())

    def lesion_fraction(c):
        return np.mean([p.mask.mean() for p in by_class[c]])

    # Opacity is one large dense region; tuberculosis and DME are small focal lesions.
    assert lesion_fraction("lung-opacity") > 2 * lesion_fraction("lung-tuberculosis")
    # COVID ground glass sits low in the lungs, tuberculosis high.
    def mean_row(c):
        return np.mean([np.argwhere(p.mask)[:, 0].mean() for p in by_class[c]])
    assert mean_row("lung-covid") > mean_row("lung-tuberculosis") + SIZE * 0.1
    # X-ray and OCT images look different on average (bright body vs dark vitreous).
    xr = np.mean([p.image.mean() for c in ("lung-normal", "lung-covid") for p in by_class[c]])
    oc = np.mean([p.image.mean() for c in OCT_CLASSES for p in by_class[c]])
    assert xr > oc + 0.1


def test_patients_group_images(dataset):
    patients = {}
    for p in dataset:
        patients.setdefault(p.patient_id, set()).add(p.label)
    assert all(len(labels) == 1 for labels in patients.values())  # one class per patient
    assert len(patients) < len(dataset)  # several images per patient
    assert all(pid.startswith("P") and pid[1:].isdigit() for pid in patients)
    # Same patient, same anatomy: two of its images are more alike than two patients'.
    normals = [p for p in dataset if p.label == "lung-normal"]
    same = [(a, b) for a in normals for b in normals if a.seed < b.seed
            and a.patient_id == b.patient_id]
    if same:
        a, b = same[0]
        other = next(p for p in normals if p.patient_id != a.patient_id)
        assert np.abs(a.region ^ b.region).mean() < np.abs(a.region ^ other.region).mean() + 0.1


def test_dataset_is_deterministic_and_selectable():
    a = list(make_dataset(2, size=32, seed=5, classes=["lung-covid", "lung-oct-dme"]))
    b = list(make_dataset(2, size=32, seed=5, classes=["lung-covid", "lung-oct-dme"]))
    assert [p.label for p in a] == ["lung-covid"] * 2 + ["lung-oct-dme"] * 2
    assert all(np.array_equal(x.image, y.image) and x.patient_id == y.patient_id
               for x, y in zip(a, b))


@pytest.mark.parametrize("variant", DICOM_VARIANTS)
@pytest.mark.parametrize("label", ["lung-tuberculosis", "lung-oct-drusen"])
def test_dicom_variants_round_trip(tmp_path, variant, label):
    p = make_phantom(label, size=64, seed=2, patient=3)
    path = write_phantom(p, tmp_path / "x.dcm", fmt="dicom", variant=variant)
    ds = pydicom.dcmread(path)
    stored, _ = dicom_variant(p, variant)
    # Bit-exact for every syntax, compressed ones included.
    np.testing.assert_array_equal(ds.pixel_array, stored)
    assert ds.PatientID == "SENTINEL-PID-P0003"
    assert ds.Modality == p.modality
    if p.modality == "OPT" and variant != "rgb":
        assert ds.SOPClassUID == pydicom.uid.OphthalmicTomographyImageStorage
    raw = path.read_bytes() if variant != "deflate" else str(ds).encode()
    assert PHI_SENTINELS["InstitutionName"].encode() in raw


def test_dicom_display_matches_the_phantom(tmp_path):
    """Under its own Modality LUT and first VOI preset, each variant shows the phantom."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    p = make_phantom("lung-covid", size=64, seed=1)
    for variant in DICOM_VARIANTS:
        if variant in ("mono2-16", "rgb"):
            continue  # no window by design / colour
        ds = pydicom.dcmread(write_phantom(p, tmp_path / f"{variant}.dcm", fmt="dicom",
                                           variant=variant))
        arr = ds.pixel_array[1] if variant == "multiframe" else ds.pixel_array
        values = apply_modality_lut(arr, ds)
        if "VOILUTSequence" in ds:
            shown = apply_voi_lut(values.astype(np.int64), ds, index=0) / 65535.0
        else:
            c, w = float(np.ravel(ds.WindowCenter)[0]), float(np.ravel(ds.WindowWidth)[0])
            shown = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            shown = 1 - shown
        np.testing.assert_allclose(shown, p.image, atol=2.5e-3, err_msg=variant)


@pytest.mark.parametrize("fmt", RASTER_FORMATS)
def test_raster_formats(tmp_path, fmt):
    p = make_phantom("lung-oct-cnv", size=64, seed=0)
    path = write_phantom(p, tmp_path / f"x.{fmt}", fmt=fmt)
    arr = np.asarray(Image.open(path)).astype(np.float64)
    scale = 65535.0 if fmt == "png16" else 255.0
    tolerance = 0.05 if fmt == "jpeg" else 1.0 / scale
    assert np.abs(arr / scale - p.image).mean() < tolerance


def test_write_mask_and_bad_arguments(tmp_path):
    p = make_phantom("lung-oct-dme", size=64, seed=0)
    m = np.asarray(Image.open(write_mask(p, tmp_path / "m.png")))
    np.testing.assert_array_equal(m > 0, p.mask)
    with pytest.raises(ValueError):
        write_phantom(p, tmp_path / "x.tif", fmt="tiff")
    with pytest.raises(ValueError):
        write_phantom(p, tmp_path / "x.dcm", fmt="dicom", variant="mono3")
    with pytest.raises(ValueError):
        make_phantom("lung-covid", size=8, seed=0)


def _manifest(root):
    with open(root / "manifest.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def test_demo_data_png(tmp_path, capsys):
    out, masks = tmp_path / "demo", tmp_path / "masks"
    assert main(["demo-data", str(out), "--per-class", "2", "--size", "64",
                 "--masks", str(masks)]) == 0
    assert sorted(d.name for d in out.iterdir() if d.is_dir()) == sorted(CLASS_NAMES)
    rows = _manifest(out)
    assert len(rows) == 18
    modes = set()
    for row in rows:
        path = out / row["path"]
        label, patient, n = path.stem.rsplit("-", 2)
        assert path.parent.name == row["label"] == label and patient == row["patient_id"]
        assert path.suffix == ".png" and n.isdigit()
        modes.add(Image.open(path).mode)
        mask = np.asarray(Image.open(masks / label / path.name))
        assert mask.any() == (label not in NORMAL_CLASSES)
    assert len(modes) == 2  # 8- and 16-bit PNGs
    assert "18/18" in capsys.readouterr().err
    # A non-empty folder is refused unless asked.
    assert main(["demo-data", str(out), "--per-class", "1", "--size", "64"]) == 3
    assert main(["demo-data", str(out), "--per-class", "1", "--size", "64", "--overwrite",
                 "--classes", "lung-covid"]) == 0


def test_demo_data_dicom(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo-data", str(out), "--dicom", "--per-class", "2", "--size", "64",
                 "--seed", "1"]) == 0
    rows = _manifest(out)
    assert len(rows) == 18 and len({r["format"] for r in rows}) >= 9
    for row in rows:
        ds = pydicom.dcmread(out / row["path"])
        assert ds.PatientID == f"{PHI_MARKER}-PID-{row['patient_id']}"
        assert ds.InstitutionName == PHI_SENTINELS["InstitutionName"]
        assert ds.Modality == row["modality"]
        assert ds.pixel_array.size > 0


def test_demo_data_usage_errors(tmp_path):
    for argv in (["--per-class", "0"], ["--size", "8"], ["--classes", "lung-cancer"]):
        with pytest.raises(SystemExit) as exc:
            main(["demo-data", str(tmp_path / "d"), *argv])
        assert exc.value.code == 2


@pytest.mark.parametrize("dicom", [False, True])
def test_every_demo_file_decodes(tmp_path, dicom):
    ingest = pytest.importorskip("lungvit.core.io.ingest")
    out = tmp_path / "demo"
    assert main(["demo-data", str(out), "--per-class", "2", "--size", "64",
                 *(["--dicom"] if dicom else [])]) == 0
    phantoms = {(p.label, p.seed): p for p in make_dataset(2, size=64, seed=0)}
    for row in _manifest(out):
        scan = ingest.load_scan(out / row["path"])
        assert scan.pixels.shape == (64, 64)
        expected = phantoms[(row["label"], int(row["seed"]))].image
        if row["format"] != "mono2-16":  # without a window the reader picks its own
            np.testing.assert_allclose(scan.pixels, expected, atol=3e-3, err_msg=row["path"])
