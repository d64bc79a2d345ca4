"""The console shows the project, not library noise: the one place that decides what libraries may print.

Every ``python -m launch.<entry>`` runs :func:`quiet_console` first (``launch/__init__.py``), before any
library is imported. By default it hides TensorFlow's C++ log lines and oneDNN banner (TensorFlow only
prepares datasets and writes summaries here), the INFO and WARNING records of TFDS, orbax's INFO records
(per-read throughput, save steps) and JAX's backend probing notice; :func:`library_output` hides what TFDS
prints around preparing a local dataset ("Downloading and preparing dataset Unknown size", progress bars).
Warnings of the other libraries, errors, and every line of the project itself still show.

Back on: ``TAMING_JAX_VERBOSE=1``, or absl's ``--verbosity=1`` (``-v 1``, which also shows DEBUG records).

Importing this module installs nothing; it imports only the standard library and absl's logging, so an entry
point can call it before anything starts threads.
"""
from __future__ import annotations

import contextlib
import io
import logging as pylogging
import os
import sys
from typing import Iterator, Sequence

VERBOSE_ENV = "TAMING_JAX_VERBOSE"

# pathname fragment -> the lowest level that still shows in quiet mode
_THRESHOLDS = (
    ("/tensorflow_datasets/", pylogging.ERROR),
    ("/orbax/", pylogging.WARNING),
    ("/jax/_src/xla_bridge.py", pylogging.WARNING),  # "Unable to initialize backend 'tpu'" on every start
)

_state = {"quiet": False}


def _argv_verbosity(argv: Sequence[str]) -> int:
    """absl's ``--verbosity``/``-v`` value in a command line not parsed yet (0 when absent or unreadable)."""
    names = ("-v", "--v", "-verbosity", "--verbosity")
    value = None
    for i, arg in enumerate(argv):
        name, eq, rest = arg.partition("=")
        if name in names:
            value = rest if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def verbose_requested(argv: Sequence[str] | None = None) -> bool:
    """Whether the user asked for the libraries' output: TAMING_JAX_VERBOSE set (not 0), or --verbosity >= 1."""
    env = os.environ.get(VERBOSE_ENV, "").strip().lower()
    if env not in ("", "0", "false", "no", "off"):
        return True
    return _argv_verbosity(sys.argv[1:] if argv is None else argv) >= 1


class LibraryNoise(pylogging.Filter):
    """Drops library records below their threshold (see ``_THRESHOLDS``); every other record passes."""

    def filter(self, record: pylogging.LogRecord) -> bool:
        path = record.pathname.replace("\\", "/")
        return all(record.levelno >= level for fragment, level in _THRESHOLDS if fragment in path)


_FILTER = LibraryNoise()


def quiet_console(argv: Sequence[str] | None = None) -> bool:
    """Quiet the libraries for this process unless the user asked for them; returns True when quieted.

    Call it before TensorFlow is imported: its environment variables are read when TensorFlow loads.
    Idempotent."""
    if verbose_requested(argv):
        _state["quiet"] = False
        return False
    # TensorFlow's C++ logs; with oneDNN's custom ops off it prints no banner either. TensorFlow only encodes
    # and decodes dataset images and writes summaries here: no model math runs in it.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    from absl import logging as absl_logging
    # absl.app makes this handler the root logger's: it prints every record of an entry point. Other handlers
    # (a test's log capture) are left alone.
    handler = absl_logging.get_absl_handler()
    if _FILTER not in handler.filters:
        handler.addFilter(_FILTER)
    _state["quiet"] = True
    return True


def is_quiet() -> bool:
    return _state["quiet"]


@contextlib.contextmanager
def library_output() -> Iterator[None]:
    """Around a TFDS dataset build from local files: in quiet mode its prints (size notices that say
    "Unknown size" and "downloaded" for data that downloads nothing) and progress bars do not show."""
    if not _state["quiet"]:
        yield
        return
    import tensorflow_datasets as tfds
    tfds.display_progress_bar(False)
    with contextlib.redirect_stdout(io.StringIO()):
        yield
