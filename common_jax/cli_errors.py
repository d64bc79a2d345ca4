"""What a command-line user sees when a run fails on their input: one ``error: ...`` line and exit status 1,
not a traceback (TAMING_JAX_TRACEBACK=1 brings tracebacks back)."""
from __future__ import annotations

import os
from typing import Any, Callable


# Errors a user can cause (paths, configs, checkpoints, arguments): one line, no traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, PermissionError, NotADirectoryError)


def user_error_line(e: BaseException) -> str:
    msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    return f"error: {msg.splitlines()[0] if msg else type(e).__name__}" + (
        "" if len(msg.splitlines()) <= 1 else "\n" + "\n".join(msg.splitlines()[1:]))


def config_flag_error_line(e: BaseException, argv: list[str] | None = None) -> str | None:
    """One line for the errors ml_collections' config flags raise (as multi-line OSError / AttributeError
    text or tracebacks), or None when ``e`` is not one of them.

    An unknown ``--config.a.b=...`` field fails while the entry point module defines its flags; a config file
    that cannot be loaded fails when the config is first read.
    """
    import re
    import sys
    argv = sys.argv[1:] if argv is None else argv
    msg = str(e)
    inner: Any = e
    while isinstance(inner, (KeyError, AttributeError)) and inner.args:  # AttributeError(KeyError('...'))
        inner = inner.args[0]
        msg = str(inner) if not isinstance(inner, BaseException) else msg
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if isinstance(e, OSError) and "Failed loading config file" in msg:
        errors = [ln for ln in lines if ln.startswith("[Errno") or "Error" in ln.split(":")[0]]
        attempted = [ln for ln in lines if os.sep in ln and not ln.startswith("[")]
        where = attempted[0] if attempted else "?"
        return f"error: config file {where} could not be loaded: {errors[-1] if errors else lines[-1]}"
    if isinstance(e, (KeyError, AttributeError)) and "Did you mean" in msg or (
            isinstance(e, (KeyError, AttributeError)) and lines and re.fullmatch(r"'[^']+'", lines[0])):
        field = re.search(r"'([^'\\]+)'", msg)
        field = field.group(1) if field else "?"
        overrides = [a.lstrip("-").split("=", 1)[0] for a in argv if a.startswith("--") and "." in a.split("=")[0]]
        named = [o for o in overrides if field in o.split(".")[1:]]
        hint = next((ln for ln in lines if ln.startswith("Did you mean")), "")
        flag = f"--{named[0]}" if named else "a --config override"
        return f"error: {flag}: the config has no field '{field}'" + (f" ({hint})" if hint else "")
    return None


def install_excepthook() -> None:
    """Errors raised before ``run_main`` can catch them (absl parses the flags, config overrides and config files
    included, before it calls main) still print one line and exit 1. Entry points call this when run as programs;
    importing this module changes nothing."""
    import sys
    previous = sys.excepthook

    def hook(tp, e, tb):
        line = None if os.environ.get("TAMING_JAX_TRACEBACK") else config_flag_error_line(e)
        if line is None:
            return previous(tp, e, tb)
        print(line, file=sys.stderr, flush=True)  # the interpreter then exits with status 1
    sys.excepthook = hook


def run_main(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
    """Wrap an absl main: user errors print as ``error: ...`` and exit 1 (TAMING_JAX_TRACEBACK=1 re-raises)."""
    import sys

    from common_jax.checkpoint import CheckpointError

    def wrapped(argv):
        try:
            return main(argv)
        except USER_ERRORS + (CheckpointError, RuntimeError, OSError, AttributeError) as e:
            if os.environ.get("TAMING_JAX_TRACEBACK"):
                raise
            # Only the loop raises TrainingDiverged; an entry point that never loaded it cannot see one.
            diverged = getattr(sys.modules.get("common_jax.training"), "TrainingDiverged", ())
            if isinstance(e, USER_ERRORS + (CheckpointError,)) or isinstance(e, diverged):
                line = user_error_line(e)
            else:
                line = config_flag_error_line(e)
                if line is None:
                    raise
            print(line, file=sys.stderr, flush=True)
            sys.exit(1)
    return wrapped
