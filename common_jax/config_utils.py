"""Config helpers: JSON round trip, flat views, and the resume-compatibility check."""
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


def check_config_compatible(saved: Mapping[str, Any], requested: Any,
                            keys_prefixes: Iterable[str] = ("model",),
                            source: str = "checkpoint") -> None:
    """Raise ConfigMismatchError if a shape-defining field differs between ``saved`` and ``requested``.

    Only keys under ``keys_prefixes`` (dotted, e.g. ``'model'`` or ``'model.n_embed'``) are compared:
    those define parameter shapes, so a checkpoint cannot be restored under a different value. Keys
    present on one side only are reported too (a renamed field is as fatal as a changed one).
    The message is one line: ``--config.model.n_embed=512 disagrees with checkpoint in <dir>: 128``.
    """
    if not isinstance(saved, Mapping):
        raise TypeError(f"check_config_compatible: saved config must be a dict, got {type(saved).__name__}")
    flat_saved = flatten(saved)
    prefixes = tuple(keys_prefixes)

    def selected(key: str) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    requested_dict = config_to_dict(requested)
    for section in sorted({p.split(".")[0] for p in prefixes}):
        if section in requested_dict and section not in saved:
            # Not an older layout: a run of another kind, e.g. the other stage's workdir.
            raise ConfigMismatchError(
                f"{source} has no '{section}' config section (its sections: {sorted(saved)}): a run of "
                f"another kind, such as the other stage; use a fresh workdir")
    flat_req = flatten(requested_dict)
    missing = object()
    for key in sorted(k for k in set(flat_saved) | set(flat_req) if selected(k)):
        want = flat_req.get(key, missing)
        have = flat_saved.get(key, missing)
        if want is missing:
            raise ConfigMismatchError(
                f"--config.{key} is missing from the requested config but {source} has {have!r}")
        if have is missing:
            raise ConfigMismatchError(
                f"--config.{key}={json.dumps(want)} is not in the config of {source} (written by an older "
                f"config layout); start a new workdir or remove the field")
        if _normalise(want) != _normalise(have):
            raise ConfigMismatchError(
                f"--config.{key}={json.dumps(_normalise(want))} disagrees with {source}: "
                f"{json.dumps(_normalise(have))}")


def get(config: Any, dotted: str, default: Any = None) -> Any:
    """``get(cfg, 'checkpoint.every', 1000)``: a nested field or the default when any level is absent."""
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
