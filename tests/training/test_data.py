"""Discovering labelled scans: folders of class folders and CSV manifests."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lungvit.cli import main as cli
from lungvit.synthetic.phantoms import CLASS_NAMES
from lungvit.core.io.phi import patient_key
from lungvit.training.data.discover import DatasetError, discover, patient_from_name
from lungvit.training.data.preview import preview


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo")
    assert cli.main(["demo-data", str(root), "--per-class", "6", "--size", "64"]) == 0
    return root


def _copy(demo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(demo, tmp_path / "data"))


@pytest.mark.parametrize("name, patient", [
    ("CNV-1016042-1.jpeg", "1016042"),           # OCT2017
    ("lung-oct-cnv-P0003-2.png", "P0003"),       # LungViT demo data
    ("NORMAL2-IM-1427-0001.jpeg", "1427"),
    ("lung-normal-17.png", None),                # class name with a number: no patient
    ("COVID-1.png", None),
    ("1.2.840.113619.2.55.3.dcm", None),
    ("scan.dcm", None),
])
def test_patient_from_name(name: str, patient: str | None) -> None:
    assert patient_from_name(name) == patient


def test_discover_folders(demo: Path, tmp_path: Path) -> None:
    root = _copy(demo, tmp_path)
    (root / "lung-covid" / ".DS_Store").write_bytes(b"\0\1")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"")
    (root / "lung-covid" / "notes.txt").write_text("not a scan")
    nested = root / "lung-covid" / "more"
    nested.mkdir()
    shutil.copy(next((root / "lung-covid").glob("*.png")), nested / "lung-covid-P9999-1.png")

    index = discover(root)
    assert index.classes == sorted(CLASS_NAMES)
    assert index.class_counts() == {c: 6 for c in CLASS_NAMES} | {"lung-covid": 7}
    assert index.root == str(root.resolve())
    assert index.unreadable == [] and index.too_small == {}
    rel = [index.relpath(s.path) for s in index.samples]
    assert rel == sorted(rel) and "manifest.csv" not in rel
    assert "lung-covid/more/lung-covid-P9999-1.png" in rel
    for s in index.samples:
        assert Path(s.path).is_absolute() and index.relpath(s.path).split("/")[0] == s.label
        # Keys are the salted hash of the file name's patient token, never the token.
        assert s.patient_key == patient_key(patient_from_name(s.path))
        assert s.patient_key is not None and patient_from_name(s.path) not in s.patient_key


def test_discover_manifest_with_patient_column(demo: Path, tmp_path: Path) -> None:
    root = _copy(demo, tmp_path)
    files = sorted(p for p in root.rglob("*.png"))[:24]
    manifest = root / "labels.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        for i, p in enumerate(files):
            w.writerow([p.relative_to(root).as_posix(), f"class-{i % 3}", f"MRN{i // 2:05d}"])
        w.writerow(["missing/ghost.png", "class-0", "MRN99999"])
        w.writerow([files[0].relative_to(root).as_posix(), "class-2", "MRN00000"])  # conflict
        w.writerow([files[0].relative_to(root).as_posix(), "class-0", "MRN00000", "surplus"])
    index = discover(manifest)
    assert index.classes == ["class-0", "class-1", "class-2"]
    assert index.root == str(root.resolve())
    assert ("missing/ghost.png", "file not found") in index.unreadable
    assert any("listed twice" in reason for _, reason in index.unreadable)
    assert len(index.samples) == 23
    by_path = {Path(s.path).resolve(): s for s in index.samples}
    assert by_path[files[5].resolve()].patient_key == patient_key("MRN00002")
    assert all("MRN" not in (s.patient_key or "") for s in index.samples)


def test_manifest_errors(tmp_path: Path) -> None:
    bad = tmp_path / "m.csv"
    bad.write_text("file,class\na.png,x\n")
    with pytest.raises(DatasetError, match="lacks the column"):
        discover(bad)
    bad.write_text("path,label\nnowhere.png,x\nnothere.png,y\n")
    with pytest.raises(DatasetError, match="no readable scans"):
        discover(bad)
    assert preview(bad)["unreadable"] == 2


def test_folder_errors(demo: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "flat").mkdir()
    shutil.copy(demo / "manifest.csv", tmp_path / "flat" / "manifest.csv")
    with pytest.raises(DatasetError, match="no class folders"):
        discover(tmp_path / "flat")
    one = tmp_path / "one"
    shutil.copytree(demo / "lung-covid", one / "lung-covid")
    with pytest.raises(DatasetError, match="single class"):
        discover(one)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir()
    with pytest.raises(DatasetError, match="no readable scans"):
        discover(tmp_path / "empty")
    assert preview(tmp_path / "empty")["problem"]


def test_too_small_class_is_reported_and_left_out(demo: Path, tmp_path: Path) -> None:
    root = _copy(demo, tmp_path)
    for p in sorted((root / "lung-opacity").iterdir())[2:]:
        p.unlink()
    index = discover(root, min_per_class=5)
    assert index.too_small == {"lung-opacity": 2}
    assert "lung-opacity" not in index.classes
    assert all(s.label != "lung-opacity" for s in index.samples)
    info = preview(root)
    assert info["problem"] is None and info["too_small"] == {"lung-opacity": 2}
    assert info["counts"]["lung-opacity"] == 2 and info["total"] == 48
    # When too-small classes leave fewer than two, the preview says so before training.
    assert "fewer than two classes" in preview(root, min_per_class=7)["problem"]


def test_fingerprint_ignores_location_and_tracks_content(demo: Path, tmp_path: Path) -> None:
    a = discover(demo).fingerprint()
    moved = _copy(demo, tmp_path)
    assert discover(moved).fingerprint() == a
    victim = next((moved / "lung-covid").glob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert discover(moved).fingerprint() != a
