"""bench/bench_train.py: its parts on CPU, and a smoke run without the packages the GPU
machine lacks."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from lungvit.core.model.network import DEFAULT_VARIANT

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "bench_train.py"
# Packages the GPU machine does not have: the benchmark must run without them.
MISSING_ON_GPU = ("pydicom", "safetensors", "captum", "gradio", "ray", "sqlalchemy")


@pytest.fixture(scope="module")
def bench() -> Iterator[ModuleType]:
    spec = importlib.util.spec_from_file_location("bench_train_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_step_flops_counts_forward_and_backward_matmuls(bench: ModuleType) -> None:
    side, batch, classes = 8, 3, 9
    model = nn.Sequential(nn.Flatten(), nn.Linear(side * side, classes))
    # forward x @ W^T: 2*B*I*O; backward: dW only (the input needs no gradient): 2*B*I*O.
    assert bench.step_flops(model, side, batch, "cpu") == 4 * batch * side * side * classes


def test_step_flops_of_a_lungvit_match_the_hand_count(bench: ModuleType) -> None:
    # lungvit_tiny at 64 px: stem 1-16-16-32-32 (strides 1, 1, 2, 2) -> 16x16 grid, N = 257
    # tokens of width 64; 4 blocks of 4 heads x 16 (inner 64), MLP 128; head 64 -> 9.
    n, d, inner, heads, head_dim, mlp = 257, 64, 64, 4, 16, 128
    stem = 2 * 9 * (64 * 64 * 16 * 1 + 64 * 64 * 16 * 16 + 32 * 32 * 32 * 16 + 16 * 16 * 32 * 32)
    embed = 2 * 16 * 16 * 64 * 32  # the 1x1 projection to tokens
    block = (2 * n * d * 3 * inner + 2 * 2 * heads * n * n * head_dim + 2 * n * inner * d
             + 2 * 2 * n * d * mlp)
    forward = stem + embed + 4 * block + 2 * d * 9
    first_conv = 2 * 9 * 64 * 64 * 16  # its input needs no gradient: no grad-input conv
    expected = 3 * forward - first_conv  # backward: grad-input + grad-weight per layer
    model = bench.create_model("lungvit_tiny")
    assert bench.step_flops(model, 64, 1, "cpu") == expected
    assert bench.step_flops(model, 64, 3, "cpu") == 3 * expected  # linear in the batch


def test_memory_case_reports_oom_and_recovers(bench: ModuleType) -> None:
    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 9)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB")

    assert bench.memory_case(Boom, 8, 2, "cpu") == ["OOM", "OOM"]
    rate, peak = bench.memory_case(lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 9)),
                                   8, 2, "cpu")
    assert float(rate.replace(",", "")) > 0 and peak == "n/a"


def test_time_steps_separates_loader_wait_from_the_step(bench: ModuleType) -> None:
    calls = []

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            time.sleep(0.02)
            yield torch.zeros(4, 1, 2, 2), torch.zeros(4, dtype=torch.int64)

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        calls.append(len(x))
        time.sleep(0.02)

    t = bench.time_steps(step, batches(), device="cpu", batch=4, warmup=2, windows=3,
                         per_window=2)
    assert len(calls) == 2 + 3 * 2 and len(t.rates) == 3
    assert 0.3 < t.wait_frac < 0.7  # half the time is spent waiting for the "loader"
    assert 0.3 * 4 / 0.04 < t.images_per_s <= 1.05 * 4 / 0.04  # sleeps only overshoot
    assert t.peak_gib is None and t.util == []


def test_png_files_decode_and_normalise(bench: ModuleType, tmp_path: Path) -> None:
    files = bench.write_pngs(tmp_path / "pngs", 9, 32)
    assert sorted(label for _, label in files) == list(range(9))
    for path, label in files:
        assert Path(path).name.startswith(bench.CLASS_NAMES[label])
    flat = tmp_path / "flat.png"
    Image.fromarray(np.full((16, 16), 51, np.uint8)).save(flat)  # 51 / 255 = 0.2
    other = tmp_path / "other.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(other)
    x, y = bench.Collate(bench.PreprocessConfig(), None)(
        [bench.PngScans([(str(flat), 4)])[0], bench.PngScans([(str(other), 7)])[0]])
    assert x.shape == (2, 1, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.full((1, 16, 16), (0.2 - 0.5) / 0.5), atol=1e-6)
    assert torch.allclose(x[1], torch.full((1, 16, 16), -1.0))
    assert y.tolist() == [4, 7] and y.dtype == torch.int64
    decoded, _ = bench.PngScans(files)[0]
    assert decoded.shape == (32, 32) and decoded.dtype == torch.uint8


def test_a_failed_section_is_reported_and_fails_the_run(bench: ModuleType, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.md"
    code = bench.main(["--device", "cpu", "--quick", "--threads", "0", "--sections", "memory",
                       "--memory-cases", "32", "--results", str(report)])  # "32" lacks ":BATCH"
    assert code == 1
    text = report.read_text()
    assert "## memory: FAILED" in text and "ValueError" in text
    assert "ValueError" in capsys.readouterr().err


def test_smoke_run_without_the_gpu_machines_missing_packages(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in MISSING_ON_GPU)
    code = (f"import runpy, sys; {block}; sys.argv = sys.argv[1:]; "
            f"runpy.run_path(sys.argv[0], run_name='__main__')")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(SCRIPT), "--device", "cpu", "--quick", "--depth", "1",
         "--size", "32", "--files", "16", "--windows", "2", "--steps", "1",
         "--sections", "throughput,memory", "--results", str(report)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    tables = markdown_tables(report.read_text())
    throughput = tables["Training throughput at 32x32, batch 8"]
    assert [(r["model"], r["data"]) for r in throughput] == [
        ("reference (explicit attention)", "on device"),
        ("loader alone (decode, augment, copy)", "PNG files"),
        ("lungvit_ref64 (fused SDPA)", "on device"),
        ("lungvit_ref64 (fused SDPA)", "PNG files, end to end")]
    assert throughput[0]["vs reference"] == "1.00x"
    ref_rate = float(throughput[0]["images/s"].replace(",", ""))
    for row in throughput[2:]:  # the ratio is of unrounded rates; allow for the rounding
        rate = float(row["images/s"].replace(",", ""))
        ratio = rate / ref_rate
        assert rate > 0
        assert abs(float(row["vs reference"][:-1]) - ratio) <= \
            ratio * (0.5 / rate + 0.5 / ref_rate) + 0.006
    assert float(throughput[1]["images/s"].replace(",", "")) > 0
    assert throughput[3]["loader wait"].endswith("%")
    memory = tables["Memory at larger inputs"]
    # No variant is native to 32 px, so the third model is the default variant.
    assert [r["model"] for r in memory] == [
        "reference (explicit attention)", "lungvit_ref64 shapes (fused SDPA)",
        f"{DEFAULT_VARIANT} shapes (fused SDPA)"]
    assert all(float(r["images/s"].replace(",", "")) > 0 for r in memory)
    assert all(r["input"] == "32x32" and r["batch"] == "2" for r in memory)


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """{section title: [{column: cell}, ...]} of every "## title" followed by a table."""
    tables: dict[str, list[dict[str, str]]] = {}
    title, header = "", None
    for line in text.splitlines():
        if line.startswith("## "):
            title, header = line[3:], None
        elif line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[title] = []
            else:
                tables[title].append(dict(zip(header, cells, strict=True)))
    return tables
