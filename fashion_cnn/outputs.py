"""Outputs written atomically: each file through a temporary beside it, renamed into place once complete, and
a run's files as one set that appears together or not at all (output_set).

Needs the standard library (and matplotlib for figures). A failed write is one UserError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fashion_cnn.common import UserError, first_line

# The one piece of state the writers share: the (temporary, final) files of the output_set() that is open, if one
# is, so that every writer need not pass the set along. A plain list, not a ContextVar: Ray ships the program's
# functions by value, with the globals they use, and a ContextVar cannot be pickled.
OPEN_OUTPUT_SET: list[list[tuple[Path, Path]]] = []  # at most one open set


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success, fsync it and rename it into place.

    Inside output_set() the rename waits for the end of the set. A failed write names the file.
    """
    def cannot_write(e: OSError) -> UserError:
        return UserError(f"cannot write {path} ({e.strerror or first_line(e)})")

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise cannot_write(e) from None
    os.close(fd)
    tmp = Path(tmp_name)
    kept = False
    try:
        tmp.chmod(0o666 & ~current_umask())  # mkstemp makes 0600; outputs get the usual permissions
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if not OPEN_OUTPUT_SET:
            os.replace(tmp, path)
        else:
            OPEN_OUTPUT_SET[-1].append((tmp, path))
            kept = True
    except OSError as e:
        raise cannot_write(e) from None
    finally:
        if not kept:
            tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def output_set(retry_hint: str = "") -> Iterator[None]:
    """The files written inside this block appear together when it ends; if it fails, none of them do.

    So a run that fails part-way through writing (a full disk, say) leaves the earlier run's set as it was,
    instead of new plots beside an old metrics.json. retry_hint ends the error message.
    """
    staged: list[tuple[Path, Path]] = []
    OPEN_OUTPUT_SET.append(staged)
    try:
        yield
    except BaseException as e:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)
        if isinstance(e, UserError):
            raise UserError(f"{e}; none of this run's outputs were written and the earlier ones are as they "
                            f"were{retry_hint}", e.exit_code) from None
        raise
    else:
        for tmp, final in staged:
            os.replace(tmp, final)
    finally:
        OPEN_OUTPUT_SET.pop()


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (works without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)


def check_writable(*folders: Path) -> None:
    """Fail before training, not after it, if an output folder cannot be written."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise UserError(f"cannot write to {folder} ({e.strerror or e}); choose another folder") from None


def json_safe(value: Any) -> Any:
    """Replace NaN and infinities (not valid JSON) with None, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Pretty JSON, atomically."""
    write_text(path, json.dumps(json_safe(payload), indent=2) + "\n")
