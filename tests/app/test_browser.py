"""The app in a real browser: upload a phantom DICOM, see the label and an overlay; fine-tune.

Drives Debian's Chromium through Playwright (never downloads a browser). Screenshots go to
``$LUNGVIT_SCREENSHOTS`` when set (``LUNGVIT_SCREENSHOTS=docs/screenshots``), else to the
test's temporary folder.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser
sync_api = pytest.importorskip("playwright.sync_api")
if not Path(CHROMIUM).exists():
    pytest.skip(f"{CHROMIUM} is not installed", allow_module_level=True)

from .conftest import free_port  # noqa: E402

sync_api.expect.set_options(timeout=120_000)  # a shared 2-core machine is slow

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = os.environ.get("LUNGVIT_SCREENSHOTS")
    path = Path(target) if target else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The app serving the bundled demo model, or an untrained stand-in labelled as a demo."""
    import torch

    from lungvit.app.state import make_context
    from lungvit.app.ui import build_app, launch_options, serve
    from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
    from lungvit.core.model.network import create_model
    from lungvit.core.predict import bundled_model_path

    model = bundled_model_path()
    if model is None and os.environ.get("LUNGVIT_SCREENSHOTS"):
        pytest.fail("README screenshots must show the bundled demo model, which is not "
                    "installed")
    if model is None:
        torch.manual_seed(0)
        model = tmp_path_factory.mktemp("model") / "stand-in-demo.safetensors"
        save_checkpoint(model, create_model("lungvit_tiny").eval(), CheckpointInfo(
            notes="Untrained stand-in for the demo model (synthetic phantoms only)."))
    ctx = make_context(model, data_dir=tmp_path_factory.mktemp("appdata"))
    app = build_app(ctx)
    serve(app, launch_options(app, port=free_port()))
    try:
        yield f"http://127.0.0.1:{app.server_port}/"
    finally:
        app.close()


@pytest.fixture(scope="module")
def page(served: str) -> Iterator[object]:
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            pg = browser.new_page(viewport={"width": 1400, "height": 1000})
            pg.set_default_timeout(120_000)
            pg.goto(served)
            yield pg
        finally:
            browser.close()


@pytest.fixture(scope="module")
def phantom_dicom(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lungvit.cli.main import main as cli

    root = tmp_path_factory.mktemp("phantoms")
    assert cli(["demo-data", str(root), "--per-class", "1", "--dicom", "--size", "128",
                "--classes", "lung-normal"]) == 0
    return next(root.rglob("*.dcm"))


def test_predict_and_explain_in_browser(page: object, phantom_dicom: Path, shots: Path) -> None:
    from lungvit.core.model.checkpoint import DEFAULT_LABELS

    pg = page
    banner = pg.locator("#banner")
    sync_api.expect(banner).to_contain_text("not a medical device")
    pg.locator("#scan-upload input[type=file]").set_input_files(str(phantom_dicom))
    prediction = pg.locator("#prediction")
    sync_api.expect(prediction.locator("h3")).to_be_visible()
    label = prediction.locator("h3").inner_text()
    assert any(lbl in label for lbl in DEFAULT_LABELS), label
    sync_api.expect(pg.locator("#scan-viewer .lv-scan img.lv-base")).to_be_visible()
    sync_api.expect(pg.locator("#probabilities")).to_contain_text(label.split(" ")[0])
    presets = pg.locator("#window-preset")
    sync_api.expect(presets).to_contain_text("percentile")
    sync_api.expect(presets).not_to_contain_text("CT lung")  # Hounsfield presets: CT only
    level = pg.get_by_label("Level (center)")
    sync_api.expect(level).not_to_have_value("")
    before = level.input_value()
    pg.get_by_label("Auto (0.5-99.5 percentile)").check()  # re-reads the scan, shows its window
    sync_api.expect(level).not_to_have_value(before)
    sync_api.expect(pg.get_by_label("Auto (0.5-99.5 percentile)")).to_be_checked()
    pg.locator("#explain-button").click()
    overlay = pg.locator("#explanations .overlay img").first
    sync_api.expect(overlay).to_be_visible()
    assert overlay.evaluate("img => img.naturalWidth") > 0
    # The whole map is shown (scaled to fit, never cropped) at a readable size.
    assert overlay.evaluate("img => getComputedStyle(img).objectFit") == "contain"
    box = overlay.bounding_box()
    assert box is not None and min(box["width"], box["height"]) >= 200, box
    sync_api.expect(pg.locator("#explanations")).to_contain_text("deletion AUC")
    sync_api.expect(pg.locator("#explanations")).to_contain_text("insertion AUC")
    # Each map carries its verdict; one that is not better than random is framed in red.
    sync_api.expect(pg.locator("#explanations")).to_contain_text("than random")
    panel = pg.locator("#explanations .overlay").first
    caption = panel.locator(".prose.overlay-caption").inner_text()
    framed = panel.evaluate("el => getComputedStyle(el).borderTopColor")
    if caption.strip().startswith("better than random"):
        assert "unfaithful" not in panel.get_attribute("class")
    else:
        assert "unfaithful" in panel.get_attribute("class") and framed == "rgb(220, 38, 38)"
    check_viewer(pg)
    # The full-resolution files are made only when asked for.
    downloads = pg.locator("#downloads")
    sync_api.expect(downloads).not_to_contain_text("-report")
    pg.locator("#explain-files-button").click()
    sync_api.expect(downloads).to_contain_text("-report")
    pg.wait_for_timeout(500)  # let the panel's image finish painting before the screenshot
    pg.screenshot(path=str(shots / "predict-explain.png"), full_page=True)


def check_viewer(pg: object) -> None:
    """Zoom, pan and the live opacity of the map beside the scan."""
    viewer = pg.locator("#scan-viewer")
    root = viewer.locator(".lv-viewer")
    sync_api.expect(viewer.locator(".lv-overlay img.lv-map").first).to_be_visible()
    assert viewer.locator(".lv-scan img.lv-base").evaluate("img => img.naturalWidth") > 0
    sync_api.expect(root).to_have_attribute("data-zoom", "1.00")
    pane = viewer.locator(".lv-overlay")
    pane.hover()
    pg.mouse.wheel(0, -240)  # zoom in about the pointer
    sync_api.expect(root).not_to_have_attribute("data-zoom", "1.00")
    assert float(root.get_attribute("data-zoom")) > 1.0
    stages = viewer.locator(".lv-stage").evaluate_all(
        "els => els.map(e => e.style.transform)")
    assert len(stages) == 2 and stages[0] == stages[1] and "scale" in stages[0], stages
    box = pane.bounding_box()
    assert box is not None
    pg.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    pg.mouse.down()
    pg.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2 + 30)
    pg.mouse.up()
    panned = viewer.locator(".lv-stage").first.evaluate("e => e.style.transform")
    assert panned != stages[0], (panned, stages[0])  # dragging moved both sides
    viewer.locator(".lv-opacity").fill("0.8")
    sync_api.expect(viewer.locator(".lv-opacity-label")).to_have_text("80%")
    assert viewer.locator(".lv-map").first.evaluate("m => m.style.opacity") == "0.8"
    pane.dblclick()
    sync_api.expect(root).to_have_attribute("data-zoom", "1.00")


def open_advanced(pg: object) -> None:
    """Open the fine-tune's advanced settings (an earlier test may have opened them)."""
    if not pg.get_by_label("Epochs").is_visible():
        pg.get_by_text("Advanced settings").click()
    sync_api.expect(pg.get_by_label("Epochs")).to_be_visible()


def start_finetune(pg: object, data: Path, *, classes: int, epochs: str, steps: str,
                   base: str) -> None:
    """Check a dataset folder in the Fine-tune tab and start a job on it (batch 8)."""
    pg.get_by_role("tab", name="Fine-tune").click()
    pg.locator("#dataset-folder textarea, #dataset-folder input").first.fill(str(data))
    pg.get_by_role("button", name="Check dataset").click()
    sync_api.expect(pg.locator("#dataset-summary")).to_contain_text(f"{classes} classes")
    open_advanced(pg)
    pg.get_by_label("Epochs").fill(epochs)
    pg.get_by_label("Stop after N steps (0: no limit)").fill(steps)
    pg.get_by_label("Batch size").fill("8")
    pg.get_by_label("Start from").click()
    pg.get_by_role("option", name=base).click()
    pg.locator("#finetune-button").click()


def test_progress_and_cancel_in_browser(page: object, tmp_path: Path) -> None:
    """A long fine-tune shows a progress bar with percent and steps; Cancel answers
    "cancelled" (the job stopped its workers) and the bar goes."""
    from lungvit.cli.main import main as cli

    data = tmp_path / "dataset"
    # Enough scans that the job is still in its first epochs when Cancel is clicked (early
    # stopping may end a run on a handful of scans within seconds).
    assert cli(["demo-data", str(data), "--per-class", "60", "--size", "64", "--classes",
                "lung-normal", "lung-covid"]) == 0
    pg = page
    start_finetune(pg, data, classes=2, epochs="500",  # far longer than the test waits
                   steps="0", base="lungvit_tiny (from scratch)")
    status = pg.locator("#job-status")
    sync_api.expect(status).to_contain_text("running", timeout=180_000)
    sync_api.expect(status).to_contain_text(" of ", timeout=180_000)  # "(step N of M)"
    bar = status.locator("code").inner_text()
    assert "%" in bar and "step" in bar and "\u25b1" in bar, bar  # ▱: steps to go
    pg.get_by_role("button", name="Cancel").click()
    # The job trains in its own process (one worker): the issue asks for "cancelled" within
    # 3 s of the click; the app polls the job once a second.
    sync_api.expect(status).to_contain_text("cancelled", timeout=3_000)
    sync_api.expect(status.locator("code")).to_have_count(0)
    shutil.rmtree(data, ignore_errors=True)


@pytest.mark.slow
def test_finetune_in_browser(page: object, tmp_path: Path, shots: Path) -> None:
    from lungvit.cli.main import main as cli

    # For the README, a run worth looking at: the demo model fine-tuned for a few epochs;
    # otherwise the shortest run that goes through every stage.
    readme = bool(os.environ.get("LUNGVIT_SCREENSHOTS"))
    per_class, epochs, steps = ("24", "3", "0") if readme else ("8", "1", "4")
    data = tmp_path / "dataset"
    assert cli(["demo-data", str(data), "--per-class", per_class, "--size", "64", "--classes",
                "lung-normal", "lung-covid", "lung-oct-cnv"]) == 0
    pg = page
    start_finetune(pg, data, classes=3, epochs=epochs, steps=steps, base="Current model")
    status = pg.locator("#job-status")
    sync_api.expect(status).to_contain_text("Job", timeout=60_000)
    sync_api.expect(status).to_contain_text("succeeded", timeout=540_000)
    sync_api.expect(pg.locator("#use-model")).to_be_enabled(timeout=30_000)
    # A fine-tune of the current model says how it kept what that model knew.
    sync_api.expect(pg.get_by_text("Keeping what the base knew: distilled from the base "
                                   "(weight 1); kept weights 0.5 x the base's")).to_be_visible()
    pg.screenshot(path=str(shots / "finetune.png"), full_page=True)
    # A run this small is compared on fewer than 30 test scans: the warning must be
    # acknowledged before the model can be used.
    sync_api.expect(pg.locator("#job-verdict")).to_contain_text("test scans")
    anyway = pg.locator("#use-anyway input")
    if anyway.is_visible():
        anyway.check()
    pg.locator("#use-model").click()
    sync_api.expect(pg.get_by_text("This browser session now uses the model of job")
                    ).to_be_visible()
    pg.get_by_role("tab", name="Runs").click()
    pg.get_by_role("button", name="Refresh").click()
    sync_api.expect(pg.locator("#runs-table")).to_contain_text("succeeded")
    sync_api.expect(pg.locator("#run-confusion img")).to_be_visible()
    sync_api.expect(pg.locator("#banner")).to_contain_text("model.safetensors")
    pg.screenshot(path=str(shots / "runs.png"), full_page=True)
    shutil.rmtree(data, ignore_errors=True)
