"""The app reports to no one: Gradio's version check and usage analytics stay off."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.app.conftest import free_port


def test_building_and_serving_the_app_sends_no_telemetry(
        tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gradio.analytics as analytics

    from lungvit.app.state import make_context
    from lungvit.app.ui import build_app, launch_options, serve

    monkeypatch.delenv("GRADIO_ANALYTICS_ENABLED", raising=False)  # Gradio's default: on
    calls: list[str] = []
    monkeypatch.setattr(analytics, "_do_analytics_request",
                        lambda topic, data: calls.append(f"analytics {topic}"))
    monkeypatch.setattr(analytics, "version_check", lambda: calls.append("version check"))
    app = build_app(make_context(tiny_checkpoint, data_dir=tmp_path / "data"))
    serve(app, launch_options(app, port=free_port()))
    try:
        assert app.analytics_enabled is False
        assert app.get_config_file()["analytics_enabled"] is False
    finally:
        app.close()
    assert calls == []
