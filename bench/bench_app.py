"""How fast ``lungvit-app`` serves its page, and predict + explain latency under load.

    .venv/bin/python bench/bench_app.py [--starts 3] [--clients 8] [--requests 4] [--cores 2]
                                        [--model PATH | --variant NAME] [--user-path]

By default this measures the app as shipped: ``lungvit-app`` with its defaults, serving the
bundled default model (``assets/lungvit-real.safetensors``). ``--model`` serves a checkpoint file instead;
``--variant`` an untrained model of a registered variant (latency does not depend on the
weights), e.g. ``--variant lungvit_ref64`` for the reference configuration.

1. Start-up: ``lungvit-app`` (the console script) in a subprocess, polled until ``GET /``
   answers 200; the median of ``--starts`` cold starts (the model loads in the background).
2. Load: the app (one subprocess pinned to ``--cores`` CPU cores); ``--clients``
   gradio_client clients each send ``--requests`` requests; one request is ``/predict`` on
   a 512x512 PNG followed by ``/explain`` with attention rollout, faithfulness scoring on
   (deletion/insertion AUCs beside random maps), as the app always does. Everything stays
   on 127.0.0.1. Reported: one warm request alone, then p50 / p95 / max request latency
   under load and requests per second; the model's concurrency limit is the app's (2).
3. ``--user-path`` (instead of 1 and 2): a 2,394 x 1,969 PNG and a 2,000 px JPEG 2000 DICOM;
   per scan, the time until it is shown (``/predict``: upload, decode, predict, display
   image) and each of rollout, Grad-CAM and Integrated Gradients end to end (``/explain``),
   for one client (median of 3) and ``--clients`` at once (p95, and its ratio to the
   single-client median, beside the floor that the app's CPU use for one request sets:
   ``clients x cores one request uses / cores``); plus prediction of a decoded scan in process, and the decode
   of each file in process in full and at ``WORKING_SIDE`` (the app's size: a JPEG 2000
   file is read at a reduced resolution level), as a ratio.
"""
from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from lungvit.app.main import stop_app
from lungvit.app.windows import FILE

PREDICT_ARGS = (FILE, None, None)  # the file's own window, no custom level/width


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_command(port: int, data_dir: Path, model: Path | None) -> list[str]:
    """``lungvit-app`` with its defaults, on ``port``, keeping its files in ``data_dir``."""
    script = Path(sys.executable).with_name("lungvit-app")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "lungvit.app.main"]
    cmd += ["--port", str(port), "--data-dir", str(data_dir)]
    return cmd + (["--model", str(model)] if model else [])


def start_app(cmd: list[str], port: int, cores: set[int] | None) -> tuple[subprocess.Popen, float]:
    """Start the app; return (process, seconds until GET / answered 200)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None)
    while proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                if r.status == 200:
                    return proc, time.perf_counter() - t0
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the app exited with code {proc.returncode}")


def bench_startup(starts: int, tmp: Path, model: Path | None) -> list[float]:
    times = []
    for i in range(starts):
        port = free_port()
        proc, seconds = start_app(app_command(port, tmp / f"start{i}", model), port, None)
        stop_app(proc)
        times.append(seconds)
    return times


def served_model(args: argparse.Namespace, tmp: Path) -> tuple[Path | None, str]:
    """The checkpoint to pass as ``--model`` (None: the app's default) and its name."""
    if args.model:
        return Path(args.model), Path(args.model).name
    if args.variant:
        import torch

        from lungvit.core.model.checkpoint import CheckpointInfo, save_checkpoint
        from lungvit.core.model.network import create_model

        torch.manual_seed(0)
        path = tmp / f"{args.variant}.safetensors"
        save_checkpoint(path, create_model(args.variant).eval(), CheckpointInfo(notes="bench"))
        return path, f"{args.variant} (untrained)"
    from lungvit.core.predict import bundled_model_path

    bundled = bundled_model_path()
    if bundled is None:
        raise SystemExit("the bundled model is not installed; pass --model or --variant")
    from lungvit.core.model.checkpoint import read_checkpoint_info

    return None, f"bundled model ({read_checkpoint_info(bundled).variant})"


def bench_load(args: argparse.Namespace, tmp: Path, model: Path | None) -> dict[str, object]:
    from gradio_client import Client, handle_file
    from PIL import Image

    rng = np.random.default_rng(0)
    image = tmp / "scan.png"
    yy, xx = np.mgrid[0:512, 0:512]
    body = (np.hypot(yy - 256, xx - 256) < 200) * 160 + rng.integers(0, 60, (512, 512))
    Image.fromarray(body.astype(np.uint8)).save(image)
    cores = set(sorted(os.sched_getaffinity(0))[:args.cores])
    port = free_port()
    proc, _ = start_app(app_command(port, tmp / "load", model), port, cores)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def request(c: Client) -> None:
        c.predict([handle_file(str(image))], None, *PREDICT_ARGS, False, api_name="/predict")
        c.predict([handle_file(str(image))], None, *PREDICT_ARGS, ["Attention rollout"],
                  "Predicted class", 0.5, api_name="/explain")

    try:
        url = f"http://127.0.0.1:{port}/"
        warm = Client(url, verbose=False)
        request(warm)  # loads the model, fills caches
        t0 = time.perf_counter()
        request(warm)
        alone = time.perf_counter() - t0

        def client_loop() -> None:
            c = Client(url, verbose=False)
            for _ in range(args.requests):
                t0 = time.perf_counter()
                try:
                    request(c)
                except Exception as exc:  # counted and reported, the run goes on
                    with lock:
                        errors.append(type(exc).__name__)
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)

        threads = [threading.Thread(target=client_loop) for _ in range(args.clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        stop_app(proc)
    q = np.quantile(latencies, [0.5, 0.95]) if latencies else [float("nan")] * 2
    return {"alone": alone, "p50": float(q[0]), "p95": float(q[1]),
            "max": max(latencies, default=float("nan")), "n": len(latencies),
            "errors": len(errors), "rps": len(latencies) / wall, "wall": wall,
            "cores": len(cores), "error_kinds": sorted(set(errors))}


def user_path_images(tmp: Path, copies: int) -> dict[str, list[Path]]:
    """A 2,394 x 1,969 8-bit PNG (a chest X-ray's size) and a 2,000 x 2,000 12-bit JPEG
    2000 (lossless) DICOM, each in ``copies`` versions differing by one pixel (so no
    cache holds a version before it is first sent)."""
    from PIL import Image

    from lungvit.synthetic.dicom_write import write_dicom

    rng = np.random.default_rng(0)
    out: dict[str, list[Path]] = {"png 2394x1969": [], "j2k dicom 2000x2000": []}
    yy, xx = np.mgrid[0:2394, 0:1969]
    chest = ((np.hypot((yy - 1200) / 1.2, xx - 985) < 900) * 150 + rng.integers(0, 80, yy.shape))
    yy, xx = np.mgrid[0:2000, 0:2000]
    dx = ((np.hypot(yy - 1000, xx - 1000) < 800) * 2500 + rng.integers(0, 800, yy.shape))
    for i in range(copies):
        png = chest.astype(np.uint8)
        png[0, 0] = i
        out["png 2394x1969"].append(tmp / f"chest{i}.png")
        Image.fromarray(png).save(out["png 2394x1969"][-1])
        stored = dx.astype(np.uint16)
        stored[0, 0] = i
        out["j2k dicom 2000x2000"].append(write_dicom(
            tmp / f"dx{i}.dcm", stored, bits_stored=12, window_center=1600, window_width=3200,
            transfer_syntax="JPEG2000Lossless"))
    return out


PATH_METHODS = ("Attention rollout", "Grad-CAM", "Integrated Gradients")


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def path_once(c: object, scan: Path, pid: int | None = None) -> dict[str, float]:
    """One user's path on one scan: shown (upload, decode, predict, display: the
    /predict call), then each explanation method alone, end to end through the API.
    With the app's ``pid``, also the app's CPU seconds for each (key ``"<stage> cpu"``)."""
    from gradio_client import handle_file

    files = [handle_file(str(scan))]
    times = {}
    calls = [("shown", (False,), "/predict")] + [
        (m, ([m], "Predicted class", 0.5), "/explain") for m in PATH_METHODS]
    for stage, extra, api in calls:
        cpu0 = cpu_seconds(pid) if pid else 0.0
        t0 = time.perf_counter()
        c.predict(files, None, *PREDICT_ARGS, *extra, api_name=api)
        times[stage] = time.perf_counter() - t0
        if pid:
            times[f"{stage} cpu"] = cpu_seconds(pid) - cpu0
    return times


def predict_seconds(images: dict[str, list[Path]], model: Path | None, repeats: int = 5
                    ) -> dict[str, float]:
    """In-process prediction of an already decoded scan (preprocess + forward + flags):
    the median of ``repeats``, per image kind."""
    from lungvit.core.io.ingest import WORKING_SIDE, load_scan
    from lungvit.core.predict import Predictor

    predictor = Predictor.from_checkpoint(model)
    out = {}
    for kind, paths in images.items():
        scan = load_scan(paths[0], min_side=WORKING_SIDE)  # as the app reads it
        predictor.predict(scan)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            predictor.predict(scan)
            times.append(time.perf_counter() - t0)
        out[kind] = statistics.median(times)
    return out


def decode_seconds(images: dict[str, list[Path]], repeats: int = 5
                   ) -> dict[str, tuple[float, float]]:
    """``load_scan`` of each kind's first image in full and at ``WORKING_SIDE`` (what the
    app reads), interleaved: the medians of ``repeats``."""
    from lungvit.core.io.ingest import WORKING_SIDE, load_scan

    out = {}
    for kind, paths in images.items():
        data = paths[0].read_bytes()
        times: dict[int | None, list[float]] = {None: [], WORKING_SIDE: []}
        for _ in range(repeats):
            for side, bucket in times.items():
                t0 = time.perf_counter()
                load_scan(data, min_side=side)
                bucket.append(time.perf_counter() - t0)
        out[kind] = (statistics.median(times[None]), statistics.median(times[WORKING_SIDE]))
    return out


def bench_user_path(args: argparse.Namespace, tmp: Path, model: Path | None) -> None:
    """The user's path on large scans, one client then ``--clients`` at once (p95)."""
    from gradio_client import Client

    single_reps = 3
    # Per kind: 1 warm-up, the single client's, the clients', then 3 views and 8 scans
    # for explanations beside them (all unseen when first sent).
    images = user_path_images(tmp, 1 + single_reps + args.clients + 3 + 8)
    for kind, ms in predict_seconds(images, model).items():
        print(f"predict, decoded {kind} in process: median {ms:.3f} s")
    for kind, (full, working) in decode_seconds(images).items():
        print(f"decode {kind} in process: full size median {full:.3f} s; at WORKING_SIDE "
              f"median {working:.3f} s ({working / full:.2f}x)")
    cores = set(sorted(os.sched_getaffinity(0))[:args.cores])
    port = free_port()
    proc, _ = start_app(app_command(port, tmp / "path", model), port, cores)
    url = f"http://127.0.0.1:{port}/"
    try:
        warm = Client(url, verbose=False)
        for paths in images.values():
            path_once(warm, paths[0])  # model loaded, code paths warm
        for kind, paths in images.items():
            alone = [path_once(warm, p, proc.pid) for p in paths[1:1 + single_reps]]
            results: list[dict[str, float]] = []
            lock = threading.Lock()

            def one(p: Path) -> None:
                r = path_once(Client(url, verbose=False), p)
                with lock:
                    results.append(r)

            threads = [threading.Thread(target=one, args=(p,))
                       for p in paths[1 + single_reps:1 + single_reps + args.clients]]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            for stage in ("shown", *PATH_METHODS):
                a = statistics.median(r[stage] for r in alone)
                used = statistics.median(r[f"{stage} cpu"] / r[stage] for r in alone)
                p95 = float(np.quantile([r[stage] for r in results], 0.95))
                # n requests needing `used` cores each for `a` seconds cannot all be done
                # on `cores` cores in less than n * used / cores times `a`.
                floor = args.clients * used / len(cores)
                print(f"{kind}: {stage}: 1 client median {a:.2f} s, using {used:.2f} cores; "
                      f"{args.clients} clients p95 {p95:.2f} s ({p95 / a:.1f}x; the CPU "
                      f"floor {floor:.1f}x)")
        rest = {kind: paths[1 + single_reps + args.clients:] for kind, paths in images.items()}
        shown_beside_explanations(url, rest)
    finally:
        stop_app(proc)


def shown_beside_explanations(url: str, images: dict[str, list[Path]]) -> None:
    """Unseen scans shown by one client while two others run Integrated Gradients on
    unseen PNGs without pause (every explanation slot of the app taken): the median of 3
    views per kind. ``images``: per kind, 3 scans to show, then 8 to explain."""
    from gradio_client import Client, handle_file

    stop = threading.Event()
    busy = images["png 2394x1969"][3:]

    def explaining(paths: list[Path]) -> None:
        c = Client(url, verbose=False)
        while not stop.is_set():
            for path in paths:
                c.predict([handle_file(str(path))], None, *PREDICT_ARGS,
                          ["Integrated Gradients"], "Predicted class", 0.5, api_name="/explain")
                if stop.is_set():
                    return

    workers = [threading.Thread(target=explaining, args=(busy[i::2],)) for i in range(2)]
    for w in workers:
        w.start()
    try:
        viewer = Client(url, verbose=False)
        time.sleep(3.0)  # both explanation loops running
        for kind, paths in images.items():
            times = []
            for path in paths[:3]:
                t0 = time.perf_counter()
                viewer.predict([handle_file(str(path))], None, *PREDICT_ARGS, False,
                               api_name="/predict")
                times.append(time.perf_counter() - t0)
            print(f"{kind}: shown while 2 other clients run Integrated Gradients: median "
                  f"{statistics.median(times):.2f} s")
    finally:
        stop.set()
        for w in workers:
            w.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--starts", type=int, default=3, help="cold starts timed (median shown)")
    p.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    p.add_argument("--requests", type=int, default=4, help="requests per client")
    p.add_argument("--cores", type=int, default=2, help="CPU cores the app may use")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", metavar="PATH",
                       help="serve this checkpoint (default: the bundled model)")
    which.add_argument("--variant", metavar="NAME",
                       help="serve an untrained model of this variant, e.g. lungvit_ref64")
    p.add_argument("--user-path", action="store_true",
                   help="instead: the user's path on a 2,394 px PNG and a 2,000 px JPEG 2000 "
                        "DICOM (shown, predict, each explanation; 1 and --clients clients)")
    args = p.parse_args()
    print(f"# {platform.node()} {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model, name = served_model(args, tmp)
        if args.user_path:
            print(f"model: {name}; app pinned to {args.cores} cores")
            bench_user_path(args, tmp, model)
            return
        starts = bench_startup(args.starts, tmp, model)
        print(f"start to served page ({name}): median {statistics.median(starts):.2f} s "
              f"(runs: {', '.join(f'{s:.2f}' for s in starts)})")
        r = bench_load(args, tmp, model)
        print(f"predict+rollout with faithfulness ({name}, {r['cores']} cores): alone "
              f"{r['alone']:.2f} s; {args.clients} clients x {args.requests}: p50 "
              f"{r['p50']:.2f} s, p95 {r['p95']:.2f} s, max {r['max']:.2f} s, "
              f"{r['rps']:.2f} req/s, {r['n']} ok, {r['errors']} errors"
              + (f" ({', '.join(r['error_kinds'])})" if r["error_kinds"] else ""))


if __name__ == "__main__":
    main()
