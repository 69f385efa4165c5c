"""Where the default tracking database lives."""
from __future__ import annotations

import os
from pathlib import Path

DB_FILENAME = "lungvit.db"


def default_data_dir() -> Path:
    """The user's LungViT data directory.

    ``$LUNGVIT_HOME`` if set, else ``$XDG_DATA_HOME/lungvit``, else
    ``~/.local/share/lungvit``. The directory is not created here.
    """
    home = os.environ.get("LUNGVIT_HOME")
    if home:
        return Path(home).expanduser().absolute()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "lungvit"


def default_db_path() -> Path:
    """The default SQLite file: ``<data dir>/lungvit.db``."""
    return default_data_dir() / DB_FILENAME


def default_db_url() -> str:
    """SQLAlchemy URL of the default SQLite file."""
    return f"sqlite:///{default_db_path()}"
