"""``lungvit-app``: start the LungViT web app on this computer.

Loopback only unless told otherwise; a server reachable from the network needs
``--auth``, reads dataset folders only under ``--data-root`` and shows patient identifiers
only with ``--allow-phi``. Torch and the model load after the page is served.
"""
from __future__ import annotations

import argparse
import atexit
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from lungvit.app.security import (
    AccessRefused, AuthError, ServerPolicy, is_loopback, parse_auth,
)
from lungvit.cli import exit_codes
from lungvit.core.owner_only import owner_only_files, tighten

if TYPE_CHECKING:
    from lungvit.app.state import AppContext

log = logging.getLogger("lungvit.app")


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``lungvit-app``."""
    p = argparse.ArgumentParser(
        prog="lungvit-app",
        description="Start the LungViT web app: predict and explain chest X-ray / retinal "
                    "OCT scans, fine-tune on your own data, manage runs and models. Open the "
                    "printed URL in a browser.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this computer only); "
                        "another address needs --auth")
    p.add_argument("--port", type=int, default=7860,
                   help="port (default 7860; 0: any free port)")
    p.add_argument("--model", metavar="MODEL",
                   help="checkpoint to serve (.safetensors, or a reference-design .pth); "
                        "default: the bundled real-data model")
    p.add_argument("--db", metavar="URL",
                   help="tracking store (SQLAlchemy URL); default: a SQLite file in the "
                        "data directory")
    p.add_argument("--data-dir", metavar="DIR",
                   help="where the app keeps models, runs and scratch files (default "
                        "$LUNGVIT_HOME or ~/.local/share/lungvit)")
    p.add_argument("--auth", metavar="USER:PASS|FILE",
                   help="require a login: USER:PASSWORD, or a file of such lines")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer to this Host name (e.g. behind a reverse proxy)")
    p.add_argument("--data-root", action="append", default=[], metavar="DIR",
                   help="a folder under which the Fine-tune tab may read dataset folders "
                        "(repeatable). A server reachable from the network reads no folder "
                        "of its own without it (uploaded zips always work); given on "
                        "loopback, it limits the local user too")
    p.add_argument("--allow-phi", action="store_true",
                   help="let clients of a server reachable from the network ask for patient "
                        "identifiers (\"Show patient identifiers\"); on loopback they "
                        "always may")
    p.add_argument("--max-unpacked", type=float, default=2.0, metavar="GIB",
                   help="GiB that one uploaded zip, and one browser session in all, may "
                        "unpack to (default 2)")
    return p


def server_policy(args: argparse.Namespace) -> ServerPolicy:
    """What clients may ask of this server, from its options (see ``--help``).

    Raises:
        AccessRefused: a ``--data-root`` that is not a folder.
    """
    roots = []
    for root in args.data_root:
        path = Path(root).expanduser()
        if not path.is_dir():
            raise AccessRefused(f"--data-root {root}: no such folder")
        roots.append(path.resolve())
    return ServerPolicy(exposed=not is_loopback(args.host), allow_phi=bool(args.allow_phi),
                        data_roots=tuple(roots))


def _prepare_temp(work_dir: Path) -> Path:
    """A private upload cache for this process, removed at exit."""
    temp = work_dir / f"gradio-{os.getpid()}"
    temp.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(temp)  # read when the components are created
    atexit.register(shutil.rmtree, temp, ignore_errors=True)
    return temp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_uploads(work_dir: Path, keep: Sequence[Path] = ()) -> list[Path]:
    """Remove the upload caches (``gradio-<pid>``) of app processes that no longer run.

    A process killed without a chance to clean up (SIGKILL, a crash, a power cut) leaves
    its uploads, patient scans among them, behind.

    Args:
        work_dir: the app's scratch folder.
        keep: folders still in use (e.g. the uploaded dataset of a job that is running);
            a cache holding one of them stays.

    Returns:
        The folders removed.
    """
    removed = []
    for folder in sorted(work_dir.glob("gradio-*")):
        pid = folder.name.removeprefix("gradio-")
        if not (pid.isdigit() and folder.is_dir()) or int(pid) == os.getpid():
            continue
        if _pid_alive(int(pid)) or any(Path(k).is_relative_to(folder) for k in keep):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def _active_job_data(db_url: str) -> list[Path]:
    """The dataset folders of jobs that are queued or running."""
    from lungvit.training.store import open_store

    with open_store(db_url) as store:
        jobs = store.list_jobs(limit=10_000)
    folders = []
    for job in jobs:
        data = ((job.request_config or {}).get("train") or {}).get("data")
        if str(job.status) in ("queued", "running") and data:
            folders.append(Path(data))
    return folders


def _stop_on_sigterm() -> Callable[[], None]:
    """Handle SIGTERM (a service or container stop) as Ctrl-C, so the app closes and its
    upload cache is removed; returns what puts the previous handler back."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread (main() called from a thread): leave it
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def _warm_up(context: object) -> None:
    """Load torch and the model in the background so the first prediction is quick."""
    try:
        context.holder.get()  # type: ignore[attr-defined]
    except Exception:  # reported again, readably, on first use
        log.exception("loading the model failed")


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lungvit-app``; returns the exit code (2: unsafe or invalid options; 3: the store
    named by --db cannot be used)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup probes
    auth = None
    if args.auth:
        try:
            auth = parse_auth(args.auth)
        except AuthError as exc:
            print(f"lungvit-app: {exc}", file=sys.stderr)
            return exit_codes.USAGE
    if not is_loopback(args.host) and auth is None:
        print(f"lungvit-app: refusing to listen on {args.host} without a login: anyone on "
              "the network could read the scans and run jobs. Add --auth USER:PASSWORD (or "
              "a file of such lines), or keep the default --host 127.0.0.1.", file=sys.stderr)
        return exit_codes.USAGE
    if not 0 <= args.port <= 65535:
        print("lungvit-app: --port must be 0..65535", file=sys.stderr)
        return exit_codes.USAGE
    if args.model and not Path(args.model).is_file():
        print(f"lungvit-app: no such model file: {args.model}", file=sys.stderr)
        return exit_codes.USAGE
    try:
        policy = server_policy(args)
    except AccessRefused as exc:
        print(f"lungvit-app: {exc}", file=sys.stderr)
        return exit_codes.USAGE
    if not args.max_unpacked > 0:
        print("lungvit-app: --max-unpacked must be a positive number of GiB", file=sys.stderr)
        return exit_codes.USAGE
    from lungvit.app.uploads import set_unpack_limit

    set_unpack_limit(int(args.max_unpacked * 2**30))
    # Uploads, unpacked scans, the store, run folders and the job processes' files are the
    # user's only (600/700), whatever the umask.
    from lungvit.core.errors import LungViTError

    try:
        with owner_only_files():
            return _run(args, auth, policy)
    except LungViTError as exc:  # e.g. a --db URL that is wrong or a server that refuses
        print(f"lungvit-app: {exc}", file=sys.stderr)
        return exit_codes.ERROR


def _run(args: argparse.Namespace, auth: list[tuple[str, str]] | None,
         policy: ServerPolicy) -> int:
    """Serve the app until it is stopped; returns the exit code."""
    from lungvit.app.state import make_context

    ctx = make_context(args.model, db_url=args.db, data_dir=args.data_dir)
    ctx.policy = policy
    db_files = ([] if ctx.paths.db_file is None else [ctx.paths.db_file] + [
        ctx.paths.db_file.with_name(ctx.paths.db_file.name + s) for s in ("-wal", "-shm")])
    # As an older version may have left them:
    tighten([ctx.paths.data_dir, ctx.paths.work_dir, ctx.paths.models_dir, *db_files])
    restore_sigterm = _stop_on_sigterm()
    try:
        return _serve(args, auth, ctx)
    finally:
        restore_sigterm()


def _serve(args: argparse.Namespace, auth: list[tuple[str, str]] | None,
           ctx: AppContext) -> int:
    """Prepare the upload cache and the store, then serve until Ctrl-C or SIGTERM."""
    _prepare_temp(ctx.paths.work_dir)
    from lungvit.training.jobs.runner import recover_interrupted

    recovered = recover_interrupted(ctx.paths.db_url)
    if recovered:
        log.info("marked interrupted (resumable in the Runs tab): jobs %s", recovered)
    stale = remove_stale_uploads(ctx.paths.work_dir, keep=_active_job_data(ctx.paths.db_url))
    if stale:
        log.info("removed the upload caches of %d app process(es) that no longer run",
                 len(stale))

    from lungvit.app.ui import build_app, launch_options, serve

    app = build_app(ctx)
    options = launch_options(app, host=args.host, port=args.port or _free_port(args.host),
                             auth=auth, extra_hosts=tuple(args.allow_host))
    threading.Thread(target=_warm_up, args=(ctx,), name="model-warm-up", daemon=True).start()
    try:
        serve(app, options)
        shown = "localhost" if args.host in ("127.0.0.1", "::1") else args.host
        print(f"LungViT is running at http://{shown}:{app.server_port}/ (Ctrl-C to stop)",
              flush=True)
        app.block_thread()
    except KeyboardInterrupt:
        pass
    finally:
        app.close()
    return exit_codes.OK


def stop_app(proc: subprocess.Popen, timeout: float = 60.0,
             sig: int = signal.SIGINT) -> int:
    """Stop a ``lungvit-app`` subprocess as Ctrl-C would (so it cleans its upload cache),
    killing it if it has not exited after ``timeout`` seconds.

    Args:
        proc: the process, started by the caller.
        timeout: seconds to wait after the interrupt.
        sig: the signal that stops it (SIGTERM, as a service manager sends, works alike).

    Returns:
        Its exit code.
    """
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def _free_port(host: str) -> int:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
