"""Config helpers: JSON round trip, flat views, required fields, and the resume-compatibility check."""
from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

import ml_collections


class ConfigMismatchError(ValueError):
    """A requested config disagrees with the one a checkpoint was written with."""


def config_to_dict(config: Any) -> dict:
    """A JSON-serialisable plain dict of a ConfigDict (tuples become lists, odd values strings)."""
    if isinstance(config, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
        return json.loads(config.to_json_best_effort())
    if isinstance(config, Mapping):
        return json.loads(json.dumps(dict(config), default=str))
    raise TypeError(f"config_to_dict: expected a ConfigDict or a mapping, got {type(config).__name__}")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model': {'n_embed': 8}} -> {'model.n_embed': 8}. Lists/tuples stay values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _normalise(value: Any) -> Any:
    # JSON turns tuples into lists; compare in the JSON form so (1, 2) == [1, 2].
    return json.loads(json.dumps(value, default=str))


def _covered(key: str, entries: Iterable[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


def check_config_compatible(saved: Mapping[str, Any], requested: Any,
                            shape_keys: Iterable[str] = ("model",),
                            source: str = "checkpoint") -> list[str]:
    """Refuse a resume whose config changes a shape-defining key; describe every other change in those sections.

    ``shape_keys`` are dotted keys (``'gpt.n_layer'``) or whole sections (``'model'``: every key under it)
    that define the train state's shapes or the meaning of its weights; a task declares them
    (``Task.shape_keys``). A checkpoint cannot be restored under another value of one of them, so a
    difference, or such a key present on one side only, raises :class:`ConfigMismatchError` with one line:
    ``--config.gpt.n_layer=3 disagrees with checkpoint in <dir>: 2``.

    Any other key of the same sections (``gpt.remat``, ``gpt.dtype``, a dropout rate, ``cond.cfg_dropout``)
    may change: the return value has one line per such change, ``resuming with gpt.remat changed: false ->
    true``, for the caller to log. Keys outside those sections (``total_steps``, ``checkpoint.every``) are
    not looked at.
    """
    if not isinstance(saved, Mapping):
        raise TypeError(f"check_config_compatible: saved config must be a dict, got {type(saved).__name__}")
    entries = tuple(shape_keys)
    if not entries:
        raise ValueError("check_config_compatible: no shape-defining keys given")
    sections = sorted({e.split(".")[0] for e in entries})
    requested_dict = config_to_dict(requested)
    for section in sections:
        if section in requested_dict and section not in saved:
            # Not an older layout: a run of another kind, e.g. the other stage's workdir.
            raise ConfigMismatchError(
                f"{source} has no '{section}' config section (its sections: {sorted(saved)}): a run of "
                f"another kind, such as the other stage; use a fresh workdir")
    flat_saved, flat_req = flatten(saved), flatten(requested_dict)
    missing = object()
    notes: list[str] = []
    for key in sorted(k for k in set(flat_saved) | set(flat_req) if _covered(k, sections)):
        want = flat_req.get(key, missing)
        have = flat_saved.get(key, missing)
        if want is not missing and have is not missing and _normalise(want) == _normalise(have):
            continue
        if not _covered(key, entries):
            if have is missing:
                notes.append(f"resuming with {key} added: {json.dumps(_normalise(want))}")
            elif want is missing:
                notes.append(f"resuming with {key} removed (was {json.dumps(_normalise(have))})")
            else:
                notes.append(f"resuming with {key} changed: {json.dumps(_normalise(have))} -> "
                             f"{json.dumps(_normalise(want))}")
        elif want is missing:
            raise ConfigMismatchError(
                f"--config.{key} is missing from the requested config but {source} has {have!r}")
        elif have is missing:
            raise ConfigMismatchError(
                f"--config.{key}={json.dumps(want)} is not in the config of {source} (written by an older "
                f"config layout); start a new workdir or remove the field")
        else:
            raise ConfigMismatchError(
                f"--config.{key}={json.dumps(_normalise(want))} disagrees with {source}: "
                f"{json.dumps(_normalise(have))}")
    return notes


_ABSENT = object()


def require(config: Any, dotted: str, user: str = "run") -> Any:
    """The value of a nested field that ``user`` has no default for; one line naming it when it is absent.

    The defaults live in the configs (``configs/loop.py`` for the training loop's fields), not in the code
    that reads them."""
    value = get(config, dotted, _ABSENT)
    if value is _ABSENT:
        raise ValueError(f"{user}: config.{dotted} is missing; the base configs define it (the loop's fields "
                         f"come from configs.loop.loop_config())")
    return value


def get(config: Any, dotted: str, default: Any = None) -> Any:
    """``get(cfg, 'data.worker_count', 0)``: a nested field or the default when any level is absent."""
    node = config
    for part in dotted.split("."):
        if isinstance(node, (ml_collections.ConfigDict, ml_collections.FrozenConfigDict)):
            if part not in node:
                return default
            node = node[part]
        elif isinstance(node, Mapping):
            if part not in node:
                return default
            node = node[part]
        else:
            return default
    return node
