"""The models the app serves: the default one, and the ones browser sessions chose.

The app starts with one default model (``--model``, else the bundled one), loaded once and
shared. A browser session may switch to another model (a fine-tune's result, or a file it
loaded in the Model tab) for itself only: the session keeps the choice in a ``gr.State``
(the model file's path; None for the default) and :meth:`AppContext.model_for` turns it
into the model to use. :class:`SessionModels` loads each chosen file once, shares it
between sessions that chose the same file, and forgets the least recently used past a few.
Other sessions never see a switch; "Back to the bundled model" sets the state to None.
"""
from __future__ import annotations

import html
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from lungvit.app.scans import ScanCache
from lungvit.app.security import ServerPolicy

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
    """Holds the app's default :class:`Predictor`; loads it once, on first use.

    Args:
        source: a checkpoint path, or None for the bundled model.
    """

    def __init__(self, source: str | Path | None = None) -> None:
        self._source = Path(source) if source is not None else None
        self._predictor: Predictor | None = None
        self._error: str | None = None
        self._loaded = False
        self._lock = threading.Lock()

    @property
    def source(self) -> Path | None:
        """The default checkpoint file (None: the bundled model)."""
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

    def _load_locked(self, source: Path | None) -> None:
        from lungvit.core.errors import CheckpointError
        from lungvit.core.predict import Predictor

        self._loaded = True
        try:
            self._predictor = Predictor.from_checkpoint(source)
            self._error = None
        except CheckpointError as exc:
            self._predictor, self._error = None, str(exc)

    def served(self) -> ServedModel:
        """The default model as served.

        Raises:
            CheckpointError: it could not be loaded.
        """
        from lungvit.core.predict import bundled_model_path

        return ServedModel(self.require(), self._source or bundled_model_path(), default=True,
                           bundled=self._source is None)


@dataclass(frozen=True)
class ServedModel:
    """The model one request uses, and what to call it.

    Attributes:
        predictor: the loaded model.
        path: its checkpoint file (None if unknown).
        default: it is the app's default model (not a session's own choice).
        bundled: it is the bundled model.
    """

    predictor: Predictor
    path: Path | None
    default: bool = True
    bundled: bool = False

    @property
    def labels(self) -> tuple[str, ...]:
        return self.predictor.labels

    def is_demo(self) -> bool:
        """Whether its card says it is a demo trained on synthetic/phantom images."""
        info = self.predictor.info
        text = " ".join((info.notes, info.intended_use, info.provenance.dataset)).lower()
        return any(w in text for w in ("demo", "synthetic", "phantom"))

    def describe(self) -> str:
        """One line naming the model."""
        name = ("bundled model" if self.bundled else
                self.path.name if self.path is not None else "model")
        info = self.predictor.info
        return f"{name} ({info.variant}, {len(self.labels)} classes)"

    def covered_classes(self) -> str:
        """Markdown: the classes the model can answer with (its label list)."""
        counts = self.predictor.info.provenance.class_counts or {}
        shown = [f"{html.escape(c)} ({counts[c]} training images)" if c in counts
                 else html.escape(c) for c in self.labels]
        who = "This session's model" if not self.default else "The model"
        return (f"{who} covers **{len(self.labels)} classes**: " + ", ".join(shown)
                + ". It can only answer with one of these.")


class SessionModels:
    """Models chosen by browser sessions, loaded once per file and shared.

    Only files registered with :meth:`allow` (a job's result, a file loaded through the
    Model tab) can be served, whatever a session's state says.

    Args:
        max_models: loaded models kept at most (the least recently used is dropped; a
            session that still wants it loads it again).
    """

    def __init__(self, max_models: int = 4) -> None:
        self.max_models = max_models
        self._models: OrderedDict[Path, Predictor] = OrderedDict()
        self._allowed: set[Path] = set()
        self._lock = threading.Lock()

    def allow(self, path: str | Path) -> Path:
        """Let sessions choose this file; returns its resolved path."""
        resolved = Path(path).resolve()
        with self._lock:
            self._allowed.add(resolved)
        return resolved

    def get(self, path: str | Path) -> Predictor:
        """The model of ``path``, loaded on first use.

        Raises:
            CheckpointError: the file was never allowed, or is not a usable checkpoint.
        """
        from lungvit.core.errors import CheckpointError
        from lungvit.core.predict import Predictor

        resolved = Path(path).resolve()
        with self._lock:
            if resolved not in self._allowed:
                raise CheckpointError(f"{resolved.name} is not a model this app loaded; load "
                                      "it in the Model tab")
            if resolved in self._models:
                self._models.move_to_end(resolved)
                return self._models[resolved]
        predictor = Predictor.from_checkpoint(resolved)  # outside the lock: serving goes on
        with self._lock:
            self._models[resolved] = predictor
            self._models.move_to_end(resolved)
            while len(self._models) > self.max_models:
                self._models.popitem(last=False)
        return predictor

    def load(self, path: str | Path) -> Predictor:
        """Allow ``path`` and load it (to check it before a session switches to it).

        Raises:
            CheckpointError: it is not a usable checkpoint (it is not allowed then).
        """
        from lungvit.core.errors import CheckpointError

        resolved = self.allow(path)
        try:
            return self.get(resolved)
        except CheckpointError:
            with self._lock:
                self._allowed.discard(resolved)
            raise


@dataclass
class AppContext:
    """What every handler needs: the served model and where things live.

    Attributes:
        holder: the app's default model.
        paths: the app's folders and store.
        sessions: models that browser sessions switched to.
        policy: what clients may ask of the server (folders, identifiers).
        scans: decoded scans, predictions and explanations reused between events.
    """

    holder: ModelHolder
    paths: AppPaths
    sessions: SessionModels = field(default_factory=SessionModels)
    policy: ServerPolicy = field(default_factory=ServerPolicy)
    scans: ScanCache = field(default_factory=ScanCache)

    def model_for(self, choice: str | None) -> ServedModel:
        """The model a session uses: its own choice (a path), or the default (None).

        Raises:
            CheckpointError: that model cannot be loaded.
        """
        if not choice:
            return self.holder.served()
        return ServedModel(self.sessions.get(choice), Path(choice), default=False)

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
        model: the default checkpoint to serve; None: the bundled model.
        db_url: the store's SQLAlchemy URL; default ``<data_dir>/lungvit.db``.
        data_dir: the app's data directory; default the store's default directory.

    Returns:
        An :class:`AppContext`.
    """
    from lungvit.training.store import default_data_dir
    from lungvit.training.store.engine import parse_store_url

    root = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
    root.mkdir(parents=True, exist_ok=True)
    url = db_url or f"sqlite:///{root / 'lungvit.db'}"
    parsed = parse_store_url(url)  # StoreError: a URL the store cannot use, said in one line
    db_file = (Path(parsed.database).expanduser().resolve()
               if parsed.drivername.startswith("sqlite") and parsed.database
               not in (None, "", ":memory:") else None)
    paths = AppPaths(data_dir=root, db_url=url, db_file=db_file, models_dir=root / "models",
                     work_dir=root / "tmp")
    return AppContext(holder=ModelHolder(model), paths=paths)
