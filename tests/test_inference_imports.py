"""Inference (the Sampler, a frozen stage-one model) loads no training loop, no grain and no data pipeline.

Importing a module is not enough to see this: the Sampler imports some of its helpers inside its methods. So the
child process also imports every project module that any import statement of these modules names, at any depth
(function bodies included), and then looks at ``sys.modules``.
"""
from __future__ import annotations

import ast
import glob
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORBIDDEN = ("vqgan_jax.train", "transformer_jax.train", "common_jax.training", "common_jax.data",
             "common_jax.datasets", "transformer_jax.codes", "transformer_jax.codes_dataset", "grain")

_CHILD = r"""
import ast, importlib, importlib.util, json, sys

PROJECT = ("common_jax", "transformer_jax", "vqgan_jax")
todo, seen = list(sys.argv[1:]), set()


def _is_module(name):
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:     # a name imported from a module (a function, a class), not a module
        return False


while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    importlib.import_module(name)
    spec = importlib.util.find_spec(name)
    tree = ast.parse(open(spec.origin).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        todo += [n for n in names if n.split(".")[0] in PROJECT and _is_module(n)]
print(json.dumps({"reached": sorted(seen), "loaded": sorted(sys.modules)}))
"""


def _closure(*modules: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", _CHILD, *modules], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sampler_and_pretrained_vqgan_import_no_training_or_data_pipeline():
    got = _closure("transformer_jax.sampler", "vqgan_jax.pretrained")
    assert "transformer_jax.code_encoder" in got["reached"]      # the lazily imported helpers were followed
    bad = [f for f in FORBIDDEN if any(m == f or m.startswith(f + ".") for m in got["loaded"])]
    assert not bad, f"inference modules load training / data-pipeline modules: {bad}"


def test_common_jax_imports_neither_stage():
    """The shared layer knows no stage: stage two's codes format registers itself with common_jax.datasets rather
    than common_jax reading it. Every import statement counts, function bodies included."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "common_jax", "*.py"))):
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            found += [f"{os.path.basename(path)}: {n}" for n in names
                      if n.split(".")[0] in ("transformer_jax", "vqgan_jax")]
    assert not found, f"common_jax imports stage modules: {found}"
