"""The app refuses foreign Host headers, serves no private files, unpacks zips safely."""
from __future__ import annotations

import http.client
import zipfile
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import pytest

from lungvit.app.security import (
    AuthError, HostCheckMiddleware, allowed_host_names, host_of, is_loopback, parse_auth,
)
from lungvit.app.uploads import UploadError, ZipLimits, expand_uploads, extract_zip


def _get(base: str, path: str, host: str | None = None) -> tuple[int, bytes]:
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or f"127.0.0.1:{url.port}")
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_loopback_names() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and is_loopback("127.0.0.2")
    assert not is_loopback("0.0.0.0") and not is_loopback("::")
    assert not is_loopback("10.1.2.3") and not is_loopback("192.168.0.5")


def test_host_header_parsing() -> None:
    assert host_of("127.0.0.1:7860") == "127.0.0.1"
    assert host_of("[::1]:7860") == "::1"
    assert host_of("LocalHost") == "localhost"
    assert host_of("evil.example:80") == "evil.example"
    names = allowed_host_names("127.0.0.1")
    assert {"localhost", "127.0.0.1", "::1"} <= names and "evil.example" not in names
    assert "10.0.0.7" in allowed_host_names("10.0.0.7")


def test_parse_auth(tmp_path: Path) -> None:
    assert parse_auth("ana:correct-horse") == [("ana", "correct-horse")]
    with pytest.raises(AuthError):
        parse_auth("ana")
    with pytest.raises(AuthError, match="shorter than 8"):
        parse_auth("ana:short")
    f = tmp_path / "users.txt"
    f.write_text("# clinicians\nana:correct-horse\n\nbo:battery-staple:x\n")
    assert parse_auth(str(f)) == [("ana", "correct-horse"), ("bo", "battery-staple:x")]
    f.write_text("# nobody\n")
    with pytest.raises(AuthError, match="no USER:PASSWORD"):
        parse_auth(str(f))


@pytest.mark.anyio
async def test_middleware_refuses_foreign_host() -> None:
    calls = []

    async def inner(scope, receive, send):  # type: ignore[no-untyped-def]
        calls.append(scope["path"])

    sent: list[dict] = []

    async def send(message):  # type: ignore[no-untyped-def]
        sent.append(message)

    mw = HostCheckMiddleware(inner, {"127.0.0.1", "localhost"})
    await mw({"type": "http", "path": "/a", "headers": [(b"host", b"evil.example")]},
             None, send)  # type: ignore[arg-type]
    await mw({"type": "http", "path": "/b", "headers": [(b"host", b"localhost:1")]},
             None, send)  # type: ignore[arg-type]
    await mw({"type": "http", "path": "/c", "headers": []}, None, send)  # type: ignore[arg-type]
    await mw({"type": "http", "path": "/d", "headers": [(b"host", b"http://localhost:1")]},
             None, send)  # type: ignore[arg-type]
    assert calls == ["/b"]
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [421, 421, 421]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_forged_host_refused(running_app: tuple[str, object]) -> None:
    base, _ = running_app
    assert _get(base, "/")[0] == 200
    status, body = _get(base, "/", host="evil.example")
    assert 400 <= status < 500 and b"Refused" in body
    assert 400 <= _get(base, "/gradio_api/info", host="evil.example:80")[0] < 500
    assert _get(base, "/", host="localhost")[0] == 200


def test_file_route_serves_no_private_files(running_app: tuple[str, object],
                                            tiny_checkpoint: Path) -> None:
    base, ctx = running_app
    db = ctx.paths.db_file  # type: ignore[attr-defined]
    from lungvit.training.store import open_store

    open_store(ctx.paths.db_url).close()  # type: ignore[attr-defined]
    assert db is not None and db.is_file()
    targets = ("/etc/passwd", str(db), str(tiny_checkpoint), str(Path.cwd() / "pyproject.toml"))
    for target in targets:
        for route in ("/gradio_api/file=", "/file="):
            status, body = _get(base, route + quote(target))
            assert status >= 400, (route, target, status)
            assert b"root:" not in body and b"SQLite" not in body


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_zip_extraction_is_contained(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "a.zip", {"../escape.png": b"x", "/abs/evil.png": b"x",
                                         "ok/scan.png": b"png", "__MACOSX/._scan.png": b"x",
                                         "C:/win.png": b"x"})
    out = extract_zip(archive, tmp_path / "out")
    assert [p.relative_to(tmp_path / "out").as_posix() for p in out] == ["ok/scan.png"]
    assert not (tmp_path / "escape.png").exists()
    files = expand_uploads([archive, tmp_path / "plain.png"], tmp_path / "scratch")
    assert [f.name for f in files] == ["scan.png", "plain.png"]


def test_zip_limits(tmp_path: Path) -> None:
    bomb = _zip(tmp_path / "bomb.zip", {"big.png": b"\0" * (4 << 20)})
    with pytest.raises(UploadError, match="refused"):
        extract_zip(bomb, tmp_path / "o1", limits=ZipLimits(max_ratio=50))
    many = _zip(tmp_path / "many.zip", {f"{i}.png": b"x" for i in range(5)})
    with pytest.raises(UploadError, match="holds 5 files"):
        extract_zip(many, tmp_path / "o2", limits=ZipLimits(max_files=4))
    not_zip = tmp_path / "n.zip"
    not_zip.write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(UploadError, match="not a readable zip"):
        extract_zip(not_zip, tmp_path / "o3")


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


def test_zip_of_many_small_blank_members_is_refused_before_writing(tmp_path: Path) -> None:
    # Every member is 1 MiB of zeros: each passes the per-member checks, the archive
    # (a few dozen KB unpacking to 40 MiB) does not.
    fill = _zip(tmp_path / "fill.zip", {f"scan{i}.dcm": bytes(1 << 20) for i in range(40)})
    assert fill.stat().st_size < 200_000
    with pytest.raises(UploadError, match="refused"):
        extract_zip(fill, tmp_path / "out")
    assert _files_under(tmp_path / "out") == []
    assert ZipLimits().max_total_bytes <= 2 << 30


def test_unpacked_bytes_are_capped_per_upload_and_per_session(tmp_path: Path) -> None:
    from lungvit.app.uploads import SessionQuota

    rng = __import__("random").Random(0)
    noise = lambda n: rng.randbytes(n)  # noqa: E731  # incompressible
    big = _zip(tmp_path / "big.zip", {"1.png": noise(300_000), "2.png": noise(300_000)})
    with pytest.raises(UploadError, match="one upload"):
        extract_zip(big, tmp_path / "o1", limits=ZipLimits(max_total_bytes=500_000))
    assert _files_under(tmp_path / "o1") == []

    a = _zip(tmp_path / "a.zip", {"a.png": noise(300_000)})
    b = _zip(tmp_path / "b.zip", {"b.png": noise(300_000)})
    quota = SessionQuota(limit=500_000)
    assert len(extract_zip(a, tmp_path / "qa", quota=quota, session="s1")) == 1
    with pytest.raises(UploadError, match="this session"):
        extract_zip(b, tmp_path / "qb", quota=quota, session="s1")
    assert _files_under(tmp_path / "qb") == [] and quota.used("s1") == 300_000
    assert len(extract_zip(b, tmp_path / "qc", quota=quota, session="s2")) == 1


def test_damaged_zip_is_a_user_error_and_leaves_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "damaged.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("ok/first.png", b"A" * 5000)
        zf.writestr("ok/second.png", b"B" * 5000)
    data = bytearray(archive.read_bytes())
    at = data.index(b"B" * 5000) + 2500
    data[at] ^= 0xFF  # the second member's CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(UploadError, match="the zip is damaged"):
        extract_zip(archive, tmp_path / "out")
    assert _files_under(tmp_path / "out") == [] and list((tmp_path / "out").iterdir()) == []
    with pytest.raises(UploadError, match="damaged"):
        expand_uploads([archive], tmp_path / "scratch")


def test_same_origin_rule() -> None:
    from lungvit.app.security import same_origin

    assert same_origin("http://127.0.0.1:7860", "127.0.0.1:7860")
    assert same_origin("http://LocalHost:7860/page?x=1", "localhost:7860")
    assert same_origin("http://[::1]:7860", "[::1]:7860")
    assert same_origin("https://lungvit.example", "lungvit.example")
    assert same_origin("http://lungvit.example", "lungvit.example:80")
    assert not same_origin("http://evil.example", "127.0.0.1:7860")
    assert not same_origin("http://localhost:8080", "localhost:7860")  # another local site
    assert not same_origin("https://127.0.0.1", "127.0.0.1:7860")  # port 443 by default
    assert not same_origin("null", "127.0.0.1:7860")
    assert not same_origin("file:///home/x.html", "127.0.0.1:7860")
    assert not same_origin("http://127.0.0.1:99999", "127.0.0.1:7860")


def _post_upload(base: str, origin: str | None, name: str) -> tuple[int, bytes]:
    url = urlparse(base)
    boundary = "lungvit-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; "
            f"filename=\"{name}\"\r\nContent-Type: image/png\r\n\r\nnot really a png\r\n"
            f"--{boundary}--\r\n").encode()
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
        if origin is not None:
            headers["Origin"] = origin
        conn.request("POST", "/gradio_api/upload", body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_cross_origin_upload_refused(running_app: tuple[str, object]) -> None:
    from gradio.utils import get_upload_folder

    base, _ = running_app
    own = base.rstrip("/")
    status, body = _post_upload(base, "http://evil.example", "cross-origin-probe.png")
    assert status == 403 and b"other sites" in body
    assert not list(Path(get_upload_folder()).rglob("cross-origin-probe.png"))
    status, body = _post_upload(base, own, "same-origin-probe.png")
    assert status == 200 and b"same-origin-probe.png" in body
    assert _post_upload(base, None, "no-origin-probe.png")[0] == 200  # gradio_client, curl
    assert _get(base, "/", host=None)[0] == 200


def test_user_errors_log_one_line_and_no_traceback(
        running_app: tuple[str, object], tmp_path: Path, capfd: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from lungvit.app import windows

    client = Client(running_app[0], verbose=False)
    empty = _zip(tmp_path / "no-scans.zip", {"readme.txt": b"no scans in here"})
    capfd.readouterr()
    caplog.set_level("INFO", logger="lungvit.app")
    for files in (None, [handle_file(str(empty))]):
        with pytest.raises(AppError, match="(?i)upload"):
            client.predict(files, windows.FILE, None, None, api_name="/predict_batch")
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    lines = [r for r in caplog.records if r.name.startswith("lungvit.app")]
    assert len(lines) == 2 and all(r.exc_info is None and "\n" not in r.getMessage()
                                   for r in lines), [r.getMessage() for r in lines]


@pytest.fixture
def exposed_ctx(tiny_checkpoint: Path, tmp_path: Path) -> Any:
    """A context as ``lungvit-app --host 0.0.0.0`` builds it (the test binds nothing)."""
    from lungvit.app.security import ServerPolicy
    from lungvit.app.state import make_context

    ctx = make_context(tiny_checkpoint, data_dir=tmp_path / "appdata")
    ctx.policy = ServerPolicy(exposed=True)
    return ctx


def test_identifiers_need_allow_phi_when_exposed(exposed_ctx: Any,
                                                 scans: dict[str, Path]) -> None:
    import dataclasses

    import gradio as gr

    from lungvit.app import handlers, windows
    from lungvit.app.main import build_parser, server_policy

    from .conftest import PHI_NAME

    def view(show_phi: bool) -> dict:
        return handlers.show_scan(exposed_ctx, [str(scans["dicom"])], None, windows.FILE,
                                  None, None, show_phi)[4]

    with pytest.raises(gr.Error, match="--allow-phi"):
        view(True)
    assert "phi" not in view(False)
    exposed_ctx.policy = dataclasses.replace(exposed_ctx.policy, allow_phi=True)
    assert view(True)["phi"]["PatientName"] == PHI_NAME
    exposed_ctx.policy = server_policy(build_parser().parse_args([]))  # loopback
    assert view(True)["phi"]["PatientName"] == PHI_NAME
    args = build_parser().parse_args(["--host", "0.0.0.0", "--auth", "a:longpassword"])
    assert server_policy(args).exposed and not server_policy(args).allow_phi


def test_server_folders_only_under_data_roots_when_exposed(
        exposed_ctx: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gradio as gr

    from lungvit.app import handlers_train
    from lungvit.app.main import build_parser, main, server_policy
    from lungvit.cli.exit_codes import USAGE as EXIT_USAGE
    from lungvit.app.security import ServerPolicy

    root = tmp_path / "datasets"
    (root / "mine" / "lung-normal").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    with pytest.raises(gr.Error, match="--data-root"):
        handlers_train.preview_dataset(exposed_ctx, "/etc", None)
    with pytest.raises(gr.Error, match="--data-root"):
        handlers_train.start_finetune(exposed_ctx, "/etc", None, 1, 1, False, 8, 1e-3,
                                      handlers_train.BASE_MODELS[0])
    exposed_ctx.policy = server_policy(build_parser().parse_args(
        ["--host", "0.0.0.0", "--data-root", str(root)]))
    assert exposed_ctx.policy.exposed and exposed_ctx.policy.data_roots == (root.resolve(),)
    for outside in ("/etc", f"{root}/mine/../..", str(root / "escape")):
        with pytest.raises(gr.Error, match="only under"):
            handlers_train.preview_dataset(exposed_ctx, outside, None)
    try:
        handlers_train.preview_dataset(exposed_ctx, str(root / "mine"), None)
    except gr.Error as exc:  # an empty dataset may be refused, but not for where it is
        assert "data-root" not in str(exc) and "only under" not in str(exc)
    assert ServerPolicy().check_folder("/etc") == Path("/etc").resolve()  # a local user
    assert main(["--data-root", str(tmp_path / "missing")]) == EXIT_USAGE
    assert "no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--data-root" in out and "--allow-phi" in out


def test_unpacked_scans_are_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    import os
    import stat

    archive = _zip(tmp_path / "a.zip", {"patient/study/scan.dcm": b"x" * 100,
                                        "top.png": b"png"})
    old = os.umask(0o022)
    try:
        files = extract_zip(archive, tmp_path / "out")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert sorted(mode(f) for f in files) == [0o600, 0o600]
    folders = [tmp_path / "out", tmp_path / "out" / "patient", tmp_path / "out/patient/study"]
    assert [mode(d) for d in folders] == [0o700] * 3


def test_session_quota_applies_to_each_browser_session(
        running_app: tuple[str, object], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    from lungvit.app import uploads, windows

    rng = __import__("random").Random(1)
    zips = [_zip(tmp_path / f"{i}.zip", {f"scan{i}.png": rng.randbytes(200_000)})
            for i in range(3)]
    monkeypatch.setattr(uploads.SESSION_QUOTA, "limit", 300_000)

    def batch(client: Client, archive: Path) -> object:
        return client.predict([handle_file(str(archive))], windows.FILE, None, None,
                              api_name="/predict_batch")

    first = Client(running_app[0], verbose=False)
    batch(first, zips[0])  # unpacked (and not a scan: a row saying so)
    with pytest.raises(AppError, match="this session has already unpacked"):
        batch(first, zips[1])
    batch(Client(running_app[0], verbose=False), zips[2])  # another session has its own


def test_identifier_checkbox_only_where_identifiers_may_be_shown(exposed_ctx: Any) -> None:
    import dataclasses

    import gradio as gr

    from lungvit.app.ui import build_app

    def checkbox_visible(ctx: Any) -> bool:
        app = build_app(ctx)
        boxes = [b for b in app.blocks.values() if isinstance(b, gr.Checkbox)
                 and "patient identifiers" in (b.label or "")]
        assert len(boxes) == 1
        return bool(boxes[0].visible)

    assert not checkbox_visible(exposed_ctx)
    exposed_ctx.policy = dataclasses.replace(exposed_ctx.policy, allow_phi=True)
    assert checkbox_visible(exposed_ctx)
    exposed_ctx.policy = dataclasses.replace(exposed_ctx.policy, exposed=False, allow_phi=False)
    assert checkbox_visible(exposed_ctx)
