"""What every part of the app shares: the checkout's paths, limits and notes, the error shown to the user
as it is (:class:`AppError`), the errors that become messages (``USER_ERRORS``) and the helpers that turn
an error into a status line."""

from __future__ import annotations

import logging
import re
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import gradio as gr

from harma.errors import HarmaError, one_line

log = logging.getLogger("harma.app")

ROOT = Path(__file__).resolve().parents[1]  # the checkout (or the Space): app.py, assets/, checkpoints/
ASSETS = ROOT / "assets"
DEMO = ASSETS / "demo"  # the bundled gallery (UCM test split; python -m training.build_demo)
DEMO_MAX_BYTES = 8 * 2**20  # the repository's budget for all of DEMO (as training/build_demo.py's MAX_BYTES)
PRECOMPUTED = DEMO / "precomputed"  # maps shipped for every shipped model on it (python -m harma_app.precompute)
SHIPPED = PRECOMPUTED / "embeddings"  # and its embeddings, keyed by content (harma.retrieval.Retriever.ship)
DEFAULT_PRESET = "rs-minilm-harma"
MAX_QUERY_CHARS = 300
MAX_K = 50
QUERY_CONCURRENCY = 16  # default query events served at once (Gradio: 1); HARMA_QUERY_CONCURRENCY (AppConfig)
MAX_ENCODE = 20_000  # images the app encodes itself for an --index gallery lacking one model's index
USER_ERRORS = (HarmaError, OSError)  # the library's user-facing errors and unreadable files; anything else is a bug

HOW_TO_DATA = ("Start the app with `--data DIR` (or set `HARMA_DATA=DIR`): a dataset folder in any supported format "
               "(HarMA JSON, PE-RSITR txt, csv/tsv, jsonl, or a plain folder of images). Or upload images under "
               "**Gallery source**.")


T = TypeVar("T")
R = TypeVar("R")

# where a query's adapted side runs while the request's own thread runs the baseline's (both_sides); one
# worker per query served at once (size_sides: build_demo sizes it to the app's query_concurrency)
SIDES = ThreadPoolExecutor(max_workers=QUERY_CONCURRENCY, thread_name_prefix="harma-side")
_SIDES_WORKERS = QUERY_CONCURRENCY


def size_sides(workers: int) -> None:
    """Give :data:`SIDES` ``workers`` threads, so as many queries as Gradio serves at once
    (``query_concurrency``) run their two sides at once; queries already in the old pool finish there."""
    global SIDES, _SIDES_WORKERS
    if workers == _SIDES_WORKERS:
        return
    old, SIDES, _SIDES_WORKERS = SIDES, ThreadPoolExecutor(max_workers=workers, thread_name_prefix="harma-side"), workers
    old.shutdown(wait=False)


def both_sides(fn: Callable[[str, T], R], baseline: T, adapted: T) -> tuple[R, R]:
    """``(fn("baseline", baseline), fn("adapted", adapted))``, the two run at once: the adapted side in a
    small pool, the baseline in the calling thread. Each model has its own lock
    (:func:`harma.encode.model_lock`), so the two models encode a query at the same time and a tab answers
    in the time of its slower side, not of both. An error on either side is raised here."""
    adapted_side = SIDES.submit(fn, "adapted", adapted)
    try:
        first = fn("baseline", baseline)
    except BaseException:
        wait([adapted_side])  # the baseline's error is the one raised, once no work is left running
        raise
    return first, adapted_side.result()


class AppError(Exception):
    """A problem to show to the user as it is (no traceback)."""


def progress_cb(progress: Any) -> Optional[Callable[[float, str], None]]:
    """:meth:`AppState.retrievers`' progress callback (overall fraction, "Step x of n: ..."), reported to
    a Gradio progress bar; None without one."""
    if progress is None:
        return None
    return lambda fraction, desc: progress(fraction, desc=desc)


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~/:])/(?:[^\s/'\"():,;]+/)+([^\s/'\"():,;]+)")


def file_names_only(msg: str) -> str:
    """A message for a visitor: absolute paths (server upload folders, the dataset's location)
    shortened to their file names."""
    return _ABSOLUTE_PATH.sub(r"\1", msg)


def fail(e: BaseException) -> str:
    """Log (with paths), show a warning toast and return the message for the status box (file names only)."""
    msg = str(e) if isinstance(e, AppError) else one_line(e)
    log.warning("%s", msg)
    msg = file_names_only(msg)
    gr.Warning(plain_text(msg))  # a toast shows Markdown as typed
    return f"⚠️ {msg}"


def short_list(items: list[str], shown: int = 5) -> str:
    """The first ``shown`` items, then how many more: a long list of files stays one readable line."""
    more = len(items) - shown
    return "; ".join(items[:shown]) + (f"; and {more} more" if more > 0 else "")


def plain_text(markdown: str) -> str:
    """Markdown emphasis and code marks removed, for places that show text as typed (toasts)."""
    return re.sub(r"\*\*(.+?)\*\*|`([^`]*)`", lambda m: m.group(1) or m.group(2), markdown)


def clamp_k(k: Any) -> int:
    try:
        return max(1, min(MAX_K, int(k)))
    except (TypeError, ValueError):
        return 8
