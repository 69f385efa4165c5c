"""The served model: loaded once, shared by every session, swappable without a restart."""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch loads only when the first model does (the app starts fast)
    from lungvit.core.predict import Predictor


@dataclass(frozen=True)
class AppPaths:
    """Where the app keeps its files (all under one data directory).

    Attributes:
        data_dir: the app's data directory.
        db_url: the tracking store's SQLAlchemy URL.
        db_file: the SQLite file behind ``db_url``, if it is one.
        models_dir: checkpoints the user loaded or imported through the app.
        work_dir: the app's scratch space (uploads, outputs); emptied at exit.
    """

    data_dir: Path
    db_url: str
    db_file: Path | None
    models_dir: Path
    work_dir: Path


class ModelHolder:
    """Holds the :class:`Predictor` being served; loads it once, on first use.

    Args:
        source: a checkpoint path, or None for the bundled demo model.
    """

    def __init__(self, source: str | Path | None = None) -> None:
        self._source = Path(source) if source is not None else None
        self._predictor: Predictor | None = None
        self._error: str | None = None
        self._loaded = False
        self._lock = threading.Lock()

    @property
    def source(self) -> Path | None:
        """The checkpoint file being served (None: the bundled demo model)."""
        return self._source

    def get(self) -> Predictor | None:
        """The served predictor, loading it the first time; None if none could be loaded."""
        with self._lock:
            if not self._loaded:
                self._load_locked(self._source)
            return self._predictor

    @property
    def error(self) -> str | None:
        """Why no model is served, if none is."""
        return self._error

    def require(self) -> Predictor:
        """The served predictor.

        Raises:
            CheckpointError: no model is loaded (the message says how to load one).
        """
        from lungvit.core.errors import CheckpointError

        predictor = self.get()
        if predictor is None:
            raise CheckpointError(f"no model is loaded ({self._error}); load a checkpoint "
                                  "in the Model tab")
        return predictor

    def load(self, path: str | Path) -> Predictor:
        """Serve the checkpoint at ``path`` from now on (the old model stays if it fails).

        Raises:
            CheckpointError: the file is not a usable checkpoint.
        """
        from lungvit.core.predict import Predictor

        predictor = Predictor.from_checkpoint(path)  # outside the lock: serving goes on
        with self._lock:
            self._predictor, self._source = predictor, Path(path)
            self._error, self._loaded = None, True
        return predictor

    def _load_locked(self, source: Path | None) -> None:
        from lungvit.core.errors import CheckpointError
        from lungvit.core.predict import Predictor

        self._loaded = True
        try:
            self._predictor = Predictor.from_checkpoint(source)
            self._error = None
        except CheckpointError as exc:
            self._predictor, self._error = None, str(exc)

    def is_demo(self) -> bool:
        """Whether the served model is the bundled demo (or says it is synthetic/demo)."""
        predictor = self.get()
        if predictor is None:
            return False
        if self._source is None:
            return True
        info = predictor.info
        text = " ".join((info.notes, info.intended_use, info.provenance.dataset)).lower()
        return any(w in text for w in ("demo", "synthetic", "phantom"))

    def describe(self) -> str:
        """One line naming the served model."""
        predictor = self.get()
        if predictor is None:
            return "No model loaded"
        name = self._source.name if self._source else "bundled demo model"
        info = predictor.info
        return f"{name} ({info.variant}, {len(predictor.labels)} classes)"


@dataclass
class AppContext:
    """What every handler needs: the served model and where things live.

    Attributes:
        holder: the served model.
        paths: the app's folders and store.
    """

    holder: ModelHolder
    paths: AppPaths

    def scratch(self, kind: str) -> Path:
        """A fresh folder under the gradio upload cache (files there can be downloaded)."""
        import tempfile

        from gradio.utils import get_upload_folder

        root = Path(get_upload_folder()) / "lungvit" / kind
        root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=root))

    def unpack_dir(self) -> Path:
        """Where uploaded archives are unpacked (reused across calls)."""
        from gradio.utils import get_upload_folder

        path = Path(get_upload_folder()) / "lungvit" / "unpacked"
        path.mkdir(parents=True, exist_ok=True)
        return path


def make_context(model: str | Path | None = None, *, db_url: str | None = None,
                 data_dir: str | Path | None = None) -> AppContext:
    """The app's context: its folders, the store URL and the (not yet loaded) model.

    Args:
        model: a checkpoint to serve; None: the bundled demo model.
        db_url: the store's SQLAlchemy URL; default ``<data_dir>/lungvit.db``.
        data_dir: the app's data directory; default the store's default directory.

    Returns:
        An :class:`AppContext`.
    """
    from sqlalchemy.engine import make_url

    from lungvit.training.store import default_data_dir

    root = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    url = db_url or f"sqlite:///{root / 'lungvit.db'}"
    parsed = make_url(url)
    db_file = (Path(parsed.database).expanduser().resolve()
               if parsed.drivername.startswith("sqlite") and parsed.database
               not in (None, "", ":memory:") else None)
    paths = AppPaths(data_dir=root, db_url=url, db_file=db_file, models_dir=root / "models",
                     work_dir=root / "tmp")
    return AppContext(holder=ModelHolder(model), paths=paths)
