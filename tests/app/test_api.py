"""Every API of the app through gradio_client: predict, explain, runs, model, fine-tune."""
from __future__ import annotations

import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from lungvit.app import windows  # noqa: E402

from .conftest import PHI_NAME  # noqa: E402


@pytest.fixture(scope="module")
def client(running_app: tuple[str, object]) -> Client:
    return Client(running_app[0], verbose=False)


def _view(client: Client, files: list[Path], preset: str = windows.FILE,
          center: float | None = None, width: float | None = None, phi: bool = False) -> tuple:
    return client.predict([handle_file(str(f)) for f in files], None, preset, center, width,
                          phi, api_name="/predict")


PUBLIC = {"/predict", "/explain", "/start_finetune", "/job_status", "/cancel_job",
          "/list_runs", "/run_details", "/load_model"}
UNDOCUMENTED = {"/predict_batch", "/use_job_model", "/compare_runs", "/resume_run",
                "/model_summary", "/use_default_model", "/preview_dataset", "/job_results"}
INTERNAL = {"/show_scan", "/show_scan_phi", "/show_scan_window", "/show_scan_level",
            "/show_scan_width", "/window_level", "/window_width", "/upload", "/upload_batch",
            "/poll_job", "/list_runs_on_load", "/model_summary_after_use", "/fan_out",
            "/explain_files", "/to_custom"}


def test_api_lists_only_the_public_endpoints(client: Client) -> None:
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert names == PUBLIC
    text = client.view_api(print_info=False, return_format="str")
    assert "/explain" in text and "/show_scan" not in text and "/window_level" not in text
    # The internal events are not reachable by name at all (private), the unlisted ones are.
    endpoints = {e.api_name: e for e in client.endpoints.values()}
    for name in UNDOCUMENTED:
        assert name in endpoints and endpoints[name].is_valid, name
    assert not {n for n, e in endpoints.items() if e.is_valid} & INTERNAL
    for name in ("/show_scan_phi", "/window_level", "/upload"):
        with pytest.raises(ValueError, match="Cannot find a function"):
            client.predict(api_name=name)


def test_predict_dicom_hides_phi_by_default(client: Client, scans: dict[str, Path],
                                            running_app: tuple[str, object]) -> None:
    image, model_input, probs, flags, meta, *_ = _view(client, [scans["dicom"]])
    shown = np.asarray(Image.open(image))
    assert shown.shape[:2] == (96, 80)
    assert np.asarray(Image.open(model_input)).shape[:2] == (64, 64)
    confidences = {c["label"]: c["confidence"] for c in probs["confidences"]}
    labels = running_app[1].holder.get().labels  # type: ignore[attr-defined]
    assert set(confidences) == set(labels)
    assert sum(confidences.values()) == pytest.approx(1.0, abs=1e-4)
    assert probs["label"] == max(confidences, key=confidences.get)
    assert probs["label"] in flags
    assert meta["source_format"] == "dicom" and meta["modality"] == "DX"
    assert "phi" not in meta and PHI_NAME not in str(meta)
    meta_phi = _view(client, [scans["dicom"]], phi=True)[4]
    assert meta_phi["phi"]["PatientName"] == PHI_NAME


def test_window_presets_rerun_the_pipeline(client: Client, scans: dict[str, Path],
                                           running_app: tuple[str, object]) -> None:
    first = _view(client, [scans["dicom"]])
    default = np.asarray(Image.open(first[0]), dtype=np.int16)
    presets, center, width = first[5:]
    assert presets["value"] == windows.FILE and (center, width) == (1400.0, 2800.0)  # its VOI
    offered = [c[0] for c in presets["choices"]]
    assert windows.AUTO in offered and not set(windows.CT_PRESETS) & set(offered)  # X-ray
    narrow = _view(client, [scans["dicom"]], windows.CUSTOM, 2500, 200)
    img = np.asarray(Image.open(narrow[0]), dtype=np.int16)
    assert narrow[4]["window"]["kind"] == "window"
    assert narrow[4]["window"]["center"] == pytest.approx(2500)
    assert np.abs(img - default).mean() > 5  # a narrow window changes what the model sees
    auto = _view(client, [scans["dicom"]], windows.AUTO)
    assert auto[5]["value"] == windows.AUTO and auto[4]["window"]["source"] == "override"
    assert auto[7] < 2800.0  # the percentile window is narrower than the file's
    # An X-ray is never shown through a Hounsfield preset: once a session has seen it, the
    # preset is no longer offered; a fresh session asking for one gets the file's window.
    with pytest.raises(AppError, match="not in the list of choices"):
        _view(client, [scans["dicom"]], "CT lung")
    ct_on_dx = _view(Client(running_app[0], verbose=False), [scans["dicom"]], "CT lung")
    assert ct_on_dx[5]["value"] == windows.FILE and "Hounsfield" in ct_on_dx[3]
    assert np.array_equal(np.asarray(Image.open(ct_on_dx[0]), dtype=np.int16), default)
    with pytest.raises(AppError, match="width of at least 1"):
        _view(client, [scans["dicom"]], windows.CUSTOM, None, None)


def test_same_scan_at_once_gives_whole_files(client: Client, scans: dict[str, Path],
                                             running_app: tuple[str, object]) -> None:
    """Gradio rewrites a cached output file when the same content comes back, so two
    requests for one scan must not produce byte-identical files (a reader could get a
    half-written one); here eight clients ask for the same scan at once."""
    first, second = _view(client, [scans["dicom"]]), _view(client, [scans["dicom"]])
    assert Path(first[0]).read_bytes() != Path(second[0]).read_bytes()
    assert np.array_equal(np.asarray(Image.open(first[0])), np.asarray(Image.open(second[0])))
    errors: list[BaseException] = []
    want = np.asarray(Image.open(_view(client, [scans["png"]])[0]))

    def view() -> None:
        try:
            got = _view(Client(running_app[0], verbose=False), [scans["png"]])
            # Every client gets the whole image, decoded to the same pixels.
            assert np.array_equal(np.asarray(Image.open(got[0])), want)
        except BaseException as exc:  # collected, asserted below
            errors.append(exc)

    threads = [threading.Thread(target=view) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_batch_table_and_csv(client: Client, scans: dict[str, Path], tmp_path: Path) -> None:
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(scans["png"], "study/retina.png")
        zf.write(scans["dicom"], "study/chest.dcm")
        zf.writestr("../../evil.png", b"x")
    table, csv_path, selector = client.predict(
        [handle_file(str(archive)), handle_file(str(scans["text"]))], windows.FILE, None,
        None, api_name="/predict_batch")
    rows = {r[0]: r for r in table["data"]}
    assert set(rows) == {"study/chest.dcm", "study/retina.png", "notes.dcm"}
    assert rows["notes.dcm"][1] == "" and "not read" in rows["notes.dcm"][5]
    assert rows["study/chest.dcm"][1] and 0 < rows["study/chest.dcm"][2] <= 1
    text = Path(csv_path).read_text()
    assert text.splitlines()[0].startswith("file,prediction,confidence")
    assert len(text.strip().splitlines()) == 4
    assert selector["value"] == "study/retina.png" or selector["value"] in rows


def test_unreadable_file_gives_a_readable_error(client: Client, scans: dict[str, Path]) -> None:
    with pytest.raises(AppError) as exc:
        _view(client, [scans["text"]])
    message = str(exc.value)
    assert "notes.dcm" in message and "Traceback" not in message
    assert str(scans["text"].parent) not in message


def test_explain_returns_overlays_with_verdicts(client: Client,
                                               scans: dict[str, Path]) -> None:
    from lungvit.core.explain.faithfulness import BETTER, NO_BETTER, WORSE

    gallery, faith = client.predict(
        [handle_file(str(scans["dicom"]))], None, windows.FILE, None, None,
        ["Attention rollout", "Grad-CAM"], "lung-normal", 0.6, api_name="/explain")
    assert len(gallery) == 2
    overlay = np.asarray(Image.open(gallery[0]["image"]).convert("RGB"))
    assert overlay.shape[:2] == (96, 80)
    assert "deletion" in gallery[0]["caption"] and "lung-normal" in gallery[0]["caption"]
    assert Path(gallery[0]["image"]).name == "chest-rollout.png"  # what a download is named
    rows = faith["data"]
    assert [r[0] for r in rows] == ["rollout", "gradcam"]
    assert all(r[1] == "lung-normal" and 0 <= r[3] <= 1 and 0 <= r[5] <= 1 for r in rows)
    for row, item in zip(rows, gallery):
        assert row[2] in (BETTER, NO_BETTER, WORSE)
        assert item["caption"].split(": ", 1)[1].startswith(row[2] + ";")
    with pytest.raises(AppError, match="at least one"):
        client.predict([handle_file(str(scans["dicom"]))], None, windows.FILE, None, None,
                       [], "Predicted class", 0.5, api_name="/explain")


def test_explain_files_are_made_on_request(running_app: tuple[str, object],
                                           scans: dict[str, Path],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The full-resolution overlays and the report come from their own (private) event,
    reusing the explanation the explain event made."""
    import lungvit.core.explain as core_explain
    from lungvit.app import handlers

    ctx = running_app[1]
    args = ([str(scans["dicom"])], None, windows.FILE, None, None,
            ["Attention rollout", "Grad-CAM"], "lung-normal", 0.6)
    handlers.explain_scan(ctx, *args)
    calls: list[int] = []
    real = core_explain.explain
    monkeypatch.setattr(core_explain, "explain",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    downloads = handlers.explain_files(ctx, *args)
    assert calls == []  # the explanation was reused
    names = [Path(d).name for d in downloads]
    assert names == ["chest-rollout.png", "chest-gradcam.png", "chest-report.html"]
    assert np.asarray(Image.open(downloads[0])).shape[:2] == (96, 80)
    report = Path(downloads[-1]).read_text()
    assert "data:image/png;base64," in report and "tiny.safetensors" in report
    assert "than random" in report
    assert PHI_NAME not in report and "SENTINEL-42" not in report


def test_a_large_jpeg2000_is_shown_smaller_and_downloaded_full_size(
        running_app: tuple[str, object], tmp_path: Path) -> None:
    """A 1,600 x 1,200 JPEG 2000 DICOM is read once at half size for the view, the
    prediction and the maps (the note says so); the download is read in full, with the
    window the scan was shown with."""
    from lungvit.app import handlers
    from lungvit.synthetic.dicom_write import write_dicom

    ctx = running_app[1]
    yy, xx = np.mgrid[0:1600, 0:1200]
    stored = (xx * 3 + (np.hypot(yy - 800, xx - 600) < 400) * 800).astype(np.uint16)
    path = write_dicom(tmp_path / "big.dcm", stored, bits_stored=12, phi={},
                       transfer_syntax="JPEG2000Lossless")
    shown, _, _, flags, meta, *_ = handlers.show_scan(ctx, [str(path)], None, windows.AUTO,
                                                      None, None, False)
    assert Image.open(shown).size == (600, 800)
    assert meta["resolution_level"] == 1 and meta["original_shape"] == [1600, 1200]
    assert "1/2 size" in flags
    args = ([str(path)], None, windows.AUTO, None, None, ["Attention rollout"],
            "Predicted class", 0.5)
    gallery, _ = handlers.explain_scan(ctx, *args)
    assert Image.open(gallery[0][0]).size == (600, 800)
    decodes = ctx.scans.decodes
    overlay, report = handlers.explain_files(ctx, *args)
    assert Image.open(overlay).size == (1200, 1600)
    assert ctx.scans.decodes == decodes + 1  # the one full-size read, for the files
    assert "data:image/png;base64," in Path(report).read_text()


def test_reading_scans_does_not_wait_behind_explanations(running_app: tuple[str, object]
                                                         ) -> None:
    """Reading and predicting scans (under one core each) are wired into a concurrency
    group of their own with more slots than the explanations (1.4-1.8 cores each); what
    that does to a view beside explanations is measured by bench_app.py, not here."""
    from lungvit.app.ui import build_app

    app = build_app(running_app[1])
    groups = {f.api_name: (f.concurrency_id, f.concurrency_limit) for f in app.fns.values()
              if f.api_name in ("predict", "predict_batch", "explain")}
    assert groups == {"predict": ("view", 4), "predict_batch": ("view", 4),
                      "explain": ("model", 2)}


def test_overlay_panels_show_each_map_with_its_verdict_and_numbers() -> None:
    from lungvit.app.ui_predict import SLOTS, fan_out

    numbers = "deletion AUC 0.100 (random 0.200, lower is better)"
    updates = fan_out([("a.png", "Attention rollout for lung-normal: better than random; "
                                 "deletion AUC 0.300"),
                       ("b.png", f"Grad-CAM for lung-normal: worse than random; {numbers}")])
    shown, images, captions = updates[:SLOTS], updates[SLOTS:2 * SLOTS], updates[2 * SLOTS:]
    assert [u["visible"] for u in shown] == [True, True] + [False] * (SLOTS - 2)
    assert images[1]["value"] == "b.png" and images[1]["label"] == "Grad-CAM for lung-normal"
    # A map no better than random is marked (a class the page draws in red, a sign).
    assert "unfaithful" in shown[1]["elem_classes"]
    assert "faithful" in shown[0]["elem_classes"]
    assert captions[1]["value"] == f"**\u26a0 worse than random**: {numbers}"
    assert captions[0]["value"] == "**better than random**: deletion AUC 0.300"
    assert all(u["value"] is None for u in images[2:])
    assert len(fan_out(None)) == 3 * SLOTS


def test_model_summary_and_loading(client: Client, tiny_checkpoint: Path,
                                   scans: dict[str, Path]) -> None:
    banner, card, target, covered, covered_tab = client.predict(api_name="/model_summary")
    assert "tiny.safetensors" in banner and "not a medical device" in banner
    assert card.startswith("# LungViT model card")
    assert "lung-covid" in str(target)
    assert "9 classes" in covered and "lung-viral-pneumonia" in covered
    assert covered_tab == covered
    banner, card, *_ = client.predict(handle_file(str(tiny_checkpoint)), False, "",
                                      api_name="/load_model")
    assert "tiny.safetensors" in banner and "This browser session uses" in banner
    with pytest.raises(AppError) as exc:
        client.predict(handle_file(str(scans["png"])), False, "", api_name="/load_model")
    assert "Traceback" not in str(exc.value)
    assert "tiny.safetensors" in client.predict(api_name="/model_summary")[0]


def test_runs_from_the_store(client: Client, running_app: tuple[str, object]) -> None:
    from lungvit.training.store import open_store

    ctx = running_app[1]
    with open_store(ctx.paths.db_url) as store:  # type: ignore[attr-defined]
        a = store.create_job({"train": {"data": "/x"}}, name="run a")
        b = store.create_job({"train": {"data": "/y"}}, name="run b")
        store.record_metrics(a, 1, {"train/loss": 2.0})
        store.record_metrics(a, 2, {"train/loss": 1.5, "val/acc": 0.5})
        store.record_metrics(b, 2, {"val/acc": 0.75})
    table, run, first, second = client.predict(api_name="/list_runs")
    ids = [r[0] for r in table["data"]]
    assert a in ids and b in ids
    assert {str(a), str(b)} <= {c[0] for c in run["choices"]}
    curves, cm, per_class, config, card, verdict = client.predict(str(a),
                                                                  api_name="/run_details")
    assert curves is not None and cm is None and config["train"]["data"] == "/x"
    assert "no model yet" in card and verdict == ""
    compared = client.predict(str(a), str(b), api_name="/compare_runs")
    values = {r[0]: (r[1], r[2]) for r in compared["data"]}
    assert values["val/acc"] == (0.5, 0.75)
    with pytest.raises(AppError, match="only an interrupted job"):
        client.predict(str(a), api_name="/resume_run")
    status = client.predict(a, api_name="/job_status")
    assert f"Job {a}: queued" in status[0]


def test_preview_dataset(client: Client, tmp_path: Path) -> None:
    from lungvit.cli.main import main as cli

    assert cli(["demo-data", str(tmp_path / "ds"), "--per-class", "6", "--size", "64",
                "--classes", "lung-normal", "lung-covid"]) == 0
    (tmp_path / "ds" / "lung-normal" / "broken.png").write_bytes(b"")
    summary, counts, root = client.predict(str(tmp_path / "ds"), None,
                                           api_name="/preview_dataset")
    assert "2 classes" in summary and "Ready" in summary
    rows = {r[0]: r for r in counts["data"]}
    assert rows["lung-covid"][1] == 6
    assert rows["lung-covid"][2] + rows["lung-covid"][3] + rows["lung-covid"][4] == 6
    with pytest.raises(AppError, match="No such folder"):
        client.predict(str(tmp_path / "missing"), None, api_name="/preview_dataset")


@pytest.mark.slow
def test_finetune_to_completion_and_use(client: Client, tmp_path: Path,
                                        running_app: tuple[str, object]) -> None:
    """A tiny fine-tune through the API: start, follow, results, serve its model."""
    from lungvit.cli.main import main as cli

    data = tmp_path / "ft"
    assert cli(["demo-data", str(data), "--per-class", "8", "--size", "64",
                "--classes", "lung-normal", "lung-covid", "lung-oct-cnv"]) == 0
    job_id, status = client.predict(str(data), None, 1, 1, False, 8, 1e-3,
                                    "lungvit_tiny (from scratch)", 4, api_name="/start_finetune")
    assert job_id > 0 and "queued" in status
    deadline = time.monotonic() + 540
    text = ""
    while time.monotonic() < deadline:
        text = client.predict(job_id, api_name="/job_status")[0]
        if any(f": {s}**" in text for s in ("succeeded", "failed", "cancelled")):
            break
        time.sleep(3)
    assert "succeeded" in text, text
    per_class, cm, calibration, *_, verdict, anyway = client.predict(
        job_id, api_name="/job_results")
    assert {r[0] for r in per_class["data"]} == {"lung-normal", "lung-covid", "lung-oct-cnv"}
    assert cm is not None and "Test accuracy" in calibration
    from lungvit.training.store import open_store

    with open_store(running_app[1].paths.db_url) as store:  # type: ignore[attr-defined]
        final = store.final_metrics(job_id)
    # Compared with the session's model (the tiny checkpoint) on the job's few test scans:
    # the verdict names the difference and warns (fewer than 30 scans) before switching.
    n = int(final["compare/n_test"])
    delta = (final["compare/tuned_acc"] - final["compare/base_acc"]) * 100
    assert 0 < n < 30 and f"by {abs(delta):.1f} points" in verdict
    assert f"on {n} test scans" in verdict and "fewer than 30" in verdict
    assert anyway["visible"] is True
    with pytest.raises(AppError, match="Not switched"):
        client.predict(job_id, False, api_name="/use_job_model")
    message = client.predict(job_id, True, api_name="/use_job_model")
    assert f"job {job_id}" in message
    banner = client.predict(api_name="/model_summary")[0]
    assert "model.safetensors" in banner and "3 classes" in banner
    with open_store(running_app[1].paths.db_url) as store:  # type: ignore[attr-defined]
        assert any(c.promoted for c in store.checkpoints(job_id))


def test_the_readme_example_runs_as_written(running_app: tuple[str, object],
                                            scans: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's gradio_client example, run verbatim against the app (its URL and
    file name swapped for the test's)."""
    import re
    import shutil

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    code = re.search(r"### The API.*?```python\n(.*?)```", readme, re.S).group(1)
    assert 'api_name="/predict"' in code and 'api_name="/explain"' in code
    shutil.copy(scans["dicom"], tmp_path / "chest.dcm")
    monkeypatch.chdir(tmp_path)
    code = code.replace("http://127.0.0.1:7860/", running_app[0])
    printed: list[str] = []
    namespace = {"print": lambda *a: printed.append(" ".join(map(str, a)))}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    labels = running_app[1].holder.get().labels  # type: ignore[attr-defined]
    assert namespace["probs"]["label"] in labels
    assert len(namespace["overlays"]) == 2 and len(namespace["faithfulness"]["data"]) == 2
    assert any("than random;" in line for line in printed)
