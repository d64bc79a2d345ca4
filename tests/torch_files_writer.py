"""Writes numpy state dicts as ``torch.save`` files of the legacy (torch < 1.6) format, without PyTorch.

The weights the converters read are published in that format (torchvision's VGG16, lpips' lin layers,
pytorch-fid's InceptionV3), and too large to commit; tests write stand-ins of the full key sets with this.

``python2=True`` lays the pickle out as torch 0.4 under Python 2 did (byte strings, ``long`` element counts,
``OrderedDict`` rebuilt from a list of pairs, ``_metadata`` set by BUILD, no memo for temporary tuples): with
lpips' own storage keys and metadata it reproduces ``lpips/weights/v0.1/vgg.pth`` byte for byte.
``python2=False`` writes what torch 1.x under Python 3 wrote. Both were checked with ``torch.load``.
"""
from __future__ import annotations

import collections
import pickle
import struct
from typing import Any

import numpy as np

MAGIC = 0x1950A86A20F9469CFC6C
PROTOCOL = 1001
_STORAGE_NAMES = {np.dtype(np.float32): "FloatStorage", np.dtype(np.float64): "DoubleStorage",
                  np.dtype(np.float16): "HalfStorage", np.dtype(np.int64): "LongStorage",
                  np.dtype(np.int32): "IntStorage", np.dtype(np.uint8): "ByteStorage",
                  np.dtype(np.bool_): "BoolStorage"}


class _Global:
    """A module-level name written as a GLOBAL opcode (its module need not be importable here)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __call__(self, *args: Any) -> Any:  # pickle's save_reduce wants a callable; it is never called
        raise TypeError(f"{self.module}.{self.name} is only a name to write")


_GLOBALS: dict[tuple[str, str], _Global] = {}


def _global(module: str, name: str) -> _Global:
    """One object per name, so a name written twice is a memo reference, as torch's pickles have it."""
    return _GLOBALS.setdefault((module, name), _Global(module, name))


class _Long(int):
    """An int Python 2 pickled as ``long`` (LONG1), as torch's element counts were."""


class Storage:
    def __init__(self, key: str, array: np.ndarray, location: str):
        self.key, self.array, self.location = key, np.ascontiguousarray(array).reshape(-1), location


class StorageView:
    """A slice of a root storage, named on its own: the view ids of old (torch < 0.4) legacy files."""

    def __init__(self, key: str, root: Storage, offset: int, numel: int):
        self.key, self.root, self.offset, self.numel = key, root, offset, numel


TENSOR_LAYOUTS = ("rebuild_v2", "rebuild", "class_state")


class Tensor:
    """One tensor, pickled in one of the layouts torch used (``TENSOR_LAYOUTS``):

    - ``rebuild_v2``: ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)``
      (torch >= 0.4);
    - ``rebuild``: ``torch._utils._rebuild_tensor(storage, offset, size, stride)``;
    - ``class_state``: ``torch.FloatTensor()`` then BUILD with ``(storage, offset, size, stride)`` (torch 0.1 /
      0.2, the layout of torchvision's 2017 weight files).
    """

    def __init__(self, storage: Storage | StorageView, shape: tuple[int, ...], python2: bool,
                 layout: str = "rebuild_v2"):
        if layout not in TENSOR_LAYOUTS:
            raise ValueError(f"unknown tensor layout {layout!r}; expected one of {TENSOR_LAYOUTS}")
        self.storage, self.shape, self.python2, self.layout = storage, shape, python2, layout

    def __reduce__(self):
        stride = tuple(int(np.prod(self.shape[i + 1:])) for i in range(len(self.shape)))
        args = (self.storage, 0, tuple(self.shape), stride)
        if self.layout == "class_state":
            array = self.storage.array if isinstance(self.storage, Storage) else self.storage.root.array
            return _global("torch", _STORAGE_NAMES[array.dtype].replace("Storage", "Tensor")), (), args
        if self.layout == "rebuild":
            return _global("torch._utils", "_rebuild_tensor"), args
        hooks = None if self.python2 else collections.OrderedDict()
        return _global("torch._utils", "_rebuild_tensor_v2"), args + (False, hooks)


class _PairsDict:
    """An OrderedDict pickled the Python 2 way: OrderedDict([[k, v], ...]) and BUILD of its __dict__."""

    def __init__(self, items: list[tuple[Any, Any]], state: dict | None):
        self.items, self.state = items, state

    def __reduce__(self):
        return (_global("collections", "OrderedDict"), ([[k, v] for k, v in self.items],), self.state)


class _Pickler(pickle._Pickler):  # the pure-Python pickler, whose dispatch table can be extended
    dispatch = dict(pickle._Pickler.dispatch)

    def __init__(self, f: Any, python2: bool):
        super().__init__(f, protocol=2)
        self.python2 = python2

    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, Storage):
            dtype_name = _STORAGE_NAMES[obj.array.dtype]
            location = "".join(obj.location)  # a fresh object per storage: Python 2 memoised none of them
            return ("storage", _global("torch", dtype_name), obj.key, location, _Long(obj.array.size), None)
        if isinstance(obj, StorageView):
            root = self.persistent_id(obj.root)
            return root[:5] + ((obj.key, obj.offset, _Long(obj.numel)),)
        return None

    def memoize(self, obj: Any) -> None:
        if not self.python2:
            return super().memoize(obj)
        idx = len(self.memo) + 1  # cPickle numbered its memo from 1
        self.write(self.put(idx))
        self.memo[id(obj)] = idx, obj

    def save_global_ref(self, obj: _Global) -> None:
        self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
        self.memoize(obj)
    dispatch[_Global] = save_global_ref

    def save_long(self, obj: _Long) -> None:
        if not self.python2:
            return self.save_long_py3(int(obj))
        data = pickle.encode_long(int(obj))
        self.write(pickle.LONG1 + bytes([len(data)]) + data)
    dispatch[_Long] = save_long

    def save_long_py3(self, obj: int) -> None:
        pickle._Pickler.dispatch[int](self, obj)

    def save_str(self, obj: str) -> None:
        if not self.python2:
            return pickle._Pickler.dispatch[str](self, obj)
        data = obj.encode("ascii")
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        if len(data) > 1:  # Python 2's cPickle memoised no string of length 0 or 1
            self.memoize(obj)
    dispatch[str] = save_str

    def save_tuple(self, obj: tuple) -> None:
        if not self.python2:
            return pickle._Pickler.dispatch[tuple](self, obj)
        # Python 2 memoised only objects referenced elsewhere; these tuples were all temporaries.
        if not obj:
            self.write(pickle.EMPTY_TUPLE)
        elif len(obj) <= 3:
            for item in obj:
                self.save(item)
            self.write(pickle._tuplesize2code[len(obj)])
        else:
            self.write(pickle.MARK)
            for item in obj:
                self.save(item)
            self.write(pickle.TUPLE)
    dispatch[tuple] = save_tuple


def _dump(f: Any, obj: Any, python2: bool) -> None:
    _Pickler(f, python2).dump(obj)


def write_legacy_state_dict(path: str, state_dict: dict[str, np.ndarray], *, python2: bool = True,
                            metadata: dict[str, dict] | None = None, location: str = "cpu",
                            storage_keys: list[str] | None = None, tensors: str = "rebuild_v2") -> None:
    """Write ``state_dict`` (float32/float64/float16/int/uint8/bool arrays) as torch's legacy format does.

    ``metadata`` becomes the state dict's ``_metadata`` (module name -> {"version": n}); ``storage_keys``
    names each tensor's storage (torch used its C pointer), default "0", "1", ...; ``tensors`` is the
    tensor layout (see :class:`Tensor`).
    """
    keys = storage_keys or [str(i) for i in range(len(state_dict))]
    storages = [Storage(k, np.asarray(v), location) for k, v in zip(keys, state_dict.values())]
    tensor_refs = [Tensor(s, tuple(np.shape(v)), python2, tensors) for s, v in zip(storages, state_dict.values())]
    version = "version"  # one string object, so repeats are memo references as in the real files
    meta = None
    if metadata is not None:
        meta = {"_metadata": _PairsDict([(k, {version: v["version"]}) for k, v in metadata.items()], None)}
    top: Any = _PairsDict(list(zip(state_dict, tensor_refs)), meta)
    if not python2:
        top = collections.OrderedDict(zip(state_dict, tensor_refs))
        if metadata is not None:
            top._metadata = collections.OrderedDict(metadata)
    write_legacy_file(path, top, storages, python2=python2)


def write_legacy_file(path: str, top: Any, storages: list[Storage], *, python2: bool = True) -> None:
    """The legacy layout around any object ``top``: magic, protocol, system info, ``top``, storage keys,
    then each storage's int64 element count and bytes. ``storages`` are those ``top`` refers to."""
    sys_info = {"protocol_version": PROTOCOL, "type_sizes": {"int": 4, "short": 2, "long": 4},
                "little_endian": True}
    if not python2:
        sys_info = {"protocol_version": PROTOCOL, "little_endian": True,
                    "type_sizes": {"short": 2, "int": 4, "long": 8}}
    with open(path, "wb") as out:
        for obj in (MAGIC, PROTOCOL, sys_info, top):
            _dump(out, obj, python2)
        _dump(out, sorted(s.key for s in storages), python2)
        for s in sorted(storages, key=lambda s: s.key):
            out.write(struct.pack("<q", s.array.size))
            out.write(s.array.astype(s.array.dtype.newbyteorder("<"), copy=False).tobytes())
