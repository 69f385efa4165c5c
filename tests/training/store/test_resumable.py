"""latest_resumable: the newest recorded checkpoint that is still there, intact."""
from __future__ import annotations

import hashlib
from pathlib import Path

from lungvit.training.store import open_store
from lungvit.training.store.resumable import latest_resumable


def test_the_newest_intact_ckpt_is_the_one_resumed_from(tmp_path: Path) -> None:
    with open_store(f"sqlite:///{tmp_path / 'lungvit.db'}") as store:
        job_id = store.create_job({"train": {"data": "d"}})
        assert latest_resumable(store, job_id) is None  # nothing recorded yet

        def record(version: int, name: str, content: bytes | None, sha_of: bytes) -> Path:
            path = tmp_path / name
            if content is not None:
                path.write_bytes(content)
            store.record_checkpoint(job_id, version=version, path=str(path),
                                    sha256=hashlib.sha256(sha_of).hexdigest())
            return path

        good = record(4, "step4.ckpt", b"four", b"four")
        assert latest_resumable(store, job_id) == str(good)
        record(8, "step8.ckpt", b"eight, changed since", b"eight")  # not what was recorded
        record(12, "step12.ckpt", None, b"twelve")  # deleted
        record(16, "model.safetensors", b"final", b"final")  # not resumable
        assert latest_resumable(store, job_id) == str(good)
        newer = record(10, "step10.ckpt", b"ten", b"ten")
        assert latest_resumable(store, job_id) == str(newer)
