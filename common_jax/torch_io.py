"""Reading PyTorch weight files (.pth, .pt, Lightning .ckpt) into numpy, without PyTorch.

Both serialisations ``torch.save`` has written are read:

- the zip archive (torch >= 1.6): ``<dir>/data.pkl`` plus one ``<dir>/data/<key>`` entry per storage;
- the legacy single stream (torch < 1.6, still the format of many published weights): four pickles in a
  row (magic number, protocol version, system info, the object) and a fifth listing storage keys, then
  each storage's raw bytes after its int64 element count.

The object pickle is read by a restricted unpickler. Tensors are rebuilt as numpy arrays; dicts, lists,
tuples and scalars are kept; every other global the pickle names (Lightning callbacks, omegaconf or
argparse objects, ``os.system``...) becomes an inert :class:`Opaque` placeholder, so no code from the file
ever runs.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import struct
import zipfile
import zlib
from typing import Any, Sequence

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class names -> numpy dtype of one element.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32), "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32), "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8), "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64), "ComplexDoubleStorage": np.dtype(np.complex128),
    "UntypedStorage": np.dtype(np.uint8),
}
# torch dtype objects (``torch.float32`` is pickled as the global ``torch float32``).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32), "float64": np.dtype(np.float64),
    "double": np.dtype(np.float64), "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32), "int16": np.dtype(np.int16),
    "short": np.dtype(np.int16), "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_), "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
}
_FLOAT_DTYPES = {np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)}


class Opaque:
    """Stand-in for an object of any class the reader does not rebuild; it never calls anything.

    ``global_name`` is the class or function the file named; what the pickle passed to it is kept
    (``args``, ``kwargs``, ``state``, appended ``list_items`` and set ``dict_items``) so a caller can look,
    with tensors inside already rebuilt as arrays. Classes are hashable, so a dict keyed by a class (as
    Lightning 1.0 keyed ``callbacks``) loads.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Opaque:
        obj = object.__new__(cls)
        obj.args, obj.kwargs, obj.state = args, kwargs, None
        obj.list_items, obj.dict_items = [], []
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ kept the arguments; nothing to run

    def __call__(self, *args: Any, **kwargs: Any) -> Opaque:
        return type(self)(*args, **kwargs)

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def append(self, item: Any) -> None:
        self.list_items.append(item)

    def extend(self, items: Any) -> None:
        self.list_items.extend(items)

    def __setitem__(self, key: Any, value: Any) -> None:
        self.dict_items.append((key, value))

    def __repr__(self) -> str:
        return f"<opaque {self.global_name}>"


class _StorageType:
    """A torch storage class named in a persistent id; only its element dtype matters."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _DType:
    """A torch dtype object (``torch.float32``) inside the pickle."""

    def __init__(self, name: str, dtype: np.dtype):
        self.name, self.dtype = name, dtype

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage:
    """One storage: its element dtype, declared element count, and raw bytes once read."""

    def __init__(self, key: str, dtype: np.dtype, numel: int):
        self.key, self.dtype, self.numel = key, dtype, numel
        self.data: bytes | None = None
        self.big_endian = False


class _TensorRef:
    """A tensor whose storage bytes may not be read yet (legacy files put them after the pickle)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, dtype: np.dtype | None = None):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride
        self.dtype = storage.dtype if dtype is None else dtype


class _TensorFromState:
    """A tensor pickled the pre-0.4 way: its class (``torch.FloatTensor``...) called with no arguments, then
    BUILD with ``(storage, offset, size, stride)``; or a Variable / Parameter whose state starts with its
    data tensor. Such files are still published (torchvision's 2017 VGG16 weights)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> _TensorFromState:
        obj = object.__new__(cls)
        obj.value = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 4:
            self.value = _rebuild_tensor(*state)
        elif isinstance(state, tuple) and len(state) == 5:
            self.value = state[0]
        else:
            raise ValueError(f"a tensor's pickled state is {_short(state)}, expected (storage, offset, size, "
                             "stride)")


_TENSOR_CLASSES = {name.replace("Storage", "Tensor") for name in _STORAGE_DTYPES if name != "UntypedStorage"}


def _check_ints(what: str, values: Any) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ValueError(f"a tensor's {what} is {values!r}, expected a tuple of non-negative ints")
    return tuple(values)


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any, *rest: Any,
                    dtype: np.dtype | None = None) -> _TensorRef:
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage is {storage!r}, not a storage")
    if not isinstance(storage_offset, int) or storage_offset < 0:
        raise ValueError(f"a tensor's storage offset is {storage_offset!r}")
    size, stride = _check_ints("size", size), _check_ints("stride", stride)
    if len(size) != len(stride):
        raise ValueError(f"a tensor's size {size} and stride {stride} differ in length")
    return _TensorRef(storage, storage_offset, size, stride, dtype)


def _rebuild_tensor_v3(storage: Any, storage_offset: Any, size: Any, stride: Any, requires_grad: Any,
                       backward_hooks: Any, dtype: Any, metadata: Any = None) -> _TensorRef:
    if not isinstance(dtype, _DType):
        raise ValueError(f"a tensor's dtype is {dtype!r}, not a torch dtype")
    return _rebuild_tensor(storage, storage_offset, size, stride, dtype=dtype.dtype)


def _rebuild_parameter(data: Any, *rest: Any) -> Any:
    return data  # a Parameter is its tensor; requires_grad, hooks and state do not matter here


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    # Tensor subclasses: rebuild the plain tensor. ``func`` can only be one of this module's callables
    # or an Opaque class, since find_class hands out nothing else.
    return func(*args)


def _encode_latin1(text: Any, encoding: str = "latin1") -> bytes:
    # Protocol-2 pickles of ``bytes`` go through ``_codecs.encode(str, "latin1")``.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise ValueError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a bytes literal")
    return text.encode("latin1")


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Size"): tuple,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("_codecs", "encode"): _encode_latin1,
}


class _Unpickler(pickle.Unpickler):
    """Hands out only the callables above, storage types, dtypes and Opaque classes; never imports."""

    def __init__(self, file: Any, storages: dict[str, _Storage], load_storage: Any):
        super().__init__(file, encoding="utf-8")  # Python 2 pickles (old weights) hold str as bytes
        self._storages, self._load_storage = storages, load_storage
        self._opaque: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Protocol-2 pickles name Python 3's builtins by their Python 2 module; pickle's own mapping of
        # such names lives in the default find_class, which this one replaces.
        module = {"__builtin__": "builtins", "copy_reg": "copyreg"}.get(module, module)
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.cuda", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if (module in ("torch", "torch.cuda") and name in _TENSOR_CLASSES) or (module, name) in (
                ("torch.autograd.variable", "Variable"), ("torch.nn.parameter", "Parameter")):
            return _TensorFromState
        if module == "torch" and name in _TORCH_DTYPES:
            return _DType(name, _TORCH_DTYPES[name])
        key = (str(module), str(name))
        if key not in self._opaque:
            self._opaque[key] = type(str(name), (Opaque,), {"global_name": f"{module}.{name}",
                                                           "__module__": "common_jax.torch_io.opaque"})
        return self._opaque[key]

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] == "module" and len(pid) == 4:
            return pid[1]  # a pickled nn.Module's class (legacy format); its source is not needed
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise ValueError(f"unknown persistent id {_short(pid)}, expected ('storage', type, key, "
                             "location, numel)")
        storage_type, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(storage_type, _StorageType):
            raise ValueError(f"storage {key} has type {storage_type!r}, not a known torch storage type")
        if not isinstance(numel, int) or numel < 0:
            raise ValueError(f"storage {key} declares {numel!r} elements")
        if key not in self._storages:
            self._storages[key] = _Storage(key, storage_type.dtype, numel)
            self._load_storage(self._storages[key])
        storage = self._storages[key]
        view = pid[5] if len(pid) == 6 else None
        if view is None:
            return storage
        # Legacy files from old torch could name a view (key, offset, numel) into a root storage.
        view_key, offset, view_numel = view
        if not (isinstance(offset, int) and isinstance(view_numel, int) and offset >= 0 and view_numel >= 0):
            raise ValueError(f"storage view {view_key} of storage {key} has offset {offset!r}, size {view_numel!r}")
        vkey = str(view_key)
        if vkey not in self._storages:
            self._storages[vkey] = _StorageView(vkey, storage, offset, view_numel)
        return self._storages[vkey]


class _StorageView(_Storage):
    def __init__(self, key: str, root: _Storage, offset: int, numel: int):
        super().__init__(key, root.dtype, numel)
        self.root, self.offset = root, offset

    def resolve(self) -> None:
        size = self.dtype.itemsize
        if self.root.data is None or len(self.root.data) < (self.offset + self.numel) * size:
            raise ValueError(f"storage view {self.key} reaches past its storage {self.root.key}")
        self.data = self.root.data[self.offset * size:(self.offset + self.numel) * size]
        self.big_endian = self.root.big_endian


def _short(obj: Any) -> str:
    text = repr(obj)
    return text if len(text) <= 120 else text[:117] + "..."


def _storage_array(storage: _Storage, dtype: np.dtype) -> np.ndarray:
    if isinstance(storage, _StorageView) and storage.data is None:
        storage.resolve()
    if storage.data is None:
        raise ValueError(f"storage {storage.key} has no data in the file")
    n = len(storage.data) // dtype.itemsize
    if not storage.big_endian:
        return np.frombuffer(storage.data, dtype=dtype, count=n)
    swapped = np.frombuffer(storage.data, dtype=f">u{dtype.itemsize}" if dtype.kind != "c" else ">f%d"
                            % (dtype.itemsize // 2), count=n if dtype.kind != "c" else 2 * n)
    return swapped.astype(swapped.dtype.newbyteorder("=")).view(dtype)


def _to_array(t: _TensorRef) -> np.ndarray:
    flat = _storage_array(t.storage, t.dtype)
    if 0 in t.size:
        return np.zeros(t.size, t.dtype)
    last = t.offset + sum((n - 1) * s for n, s in zip(t.size, t.stride))
    if last >= flat.size:  # as_strided would read memory outside the storage
        raise ValueError(f"a tensor of size {t.size}, stride {t.stride} at offset {t.offset} reads element "
                         f"{last} of storage {t.storage.key}, which holds {flat.size}")
    view = np.lib.stride_tricks.as_strided(flat[t.offset:], shape=t.size,
                                           strides=tuple(s * t.dtype.itemsize for s in t.stride))
    return np.array(view, copy=True)


def _materialize(obj: Any, memo: dict[int, tuple[Any, Any]]) -> Any:
    """Replace every _TensorRef inside ``obj`` by its numpy array (dicts and lists changed in place).

    ``memo`` maps id -> (original, result): shared objects stay shared, and keeping the original alive
    stops its id from being reused by a new object while the walk runs.
    """
    if id(obj) in memo:
        return memo[id(obj)][1]
    if isinstance(obj, _TensorRef):
        memo[id(obj)] = (obj, _to_array(obj))
    elif isinstance(obj, _DType):
        memo[id(obj)] = (obj, obj.dtype)  # a torch dtype in the file (an optimizer setting...) as numpy's
    elif isinstance(obj, _TensorFromState):
        if obj.value is None:
            raise ValueError("a tensor was pickled without its state (storage, offset, size, stride)")
        memo[id(obj)] = (obj, _materialize(obj.value, memo))
    elif isinstance(obj, dict):
        memo[id(obj)] = (obj, obj)
        for k in list(obj):
            obj[k] = _materialize(obj[k], memo)
        extra = getattr(obj, "__dict__", None)  # e.g. a state dict's _metadata, set by BUILD
        if isinstance(extra, dict):
            for k in list(extra):
                extra[k] = _materialize(extra[k], memo)
    elif isinstance(obj, list):
        memo[id(obj)] = (obj, obj)
        obj[:] = [_materialize(v, memo) for v in obj]
    elif type(obj) is tuple:
        memo[id(obj)] = (obj, tuple(_materialize(v, memo) for v in obj))
    elif isinstance(obj, Opaque):
        memo[id(obj)] = (obj, obj)
        for attr in ("args", "kwargs", "state", "list_items", "dict_items"):
            setattr(obj, attr, _materialize(getattr(obj, attr), memo))
    return memo[id(obj)][1] if id(obj) in memo else obj


def _read_zip(path: str, zf: zipfile.ZipFile) -> Any:
    names = zf.namelist()
    pkl = [n for n in names if n.endswith("data.pkl") and n.count("/") == 1]
    if len(pkl) != 1:
        raise ValueError(f"{path} is not a PyTorch file (a zip archive with "
                         f"{'no' if not pkl else len(pkl)} <dir>/data.pkl entries)")
    prefix = pkl[0][: -len("data.pkl")]
    big = (prefix + "byteorder") in names and zf.read(prefix + "byteorder").strip() == b"big"
    storages: dict[str, _Storage] = {}

    def load_storage(s: _Storage) -> None:
        name = f"{prefix}data/{s.key}"
        if name not in names:
            raise ValueError(f"{path} is truncated or damaged: storage {s.key} ({name}) is missing")
        try:
            s.data, s.big_endian = zf.read(name), big
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path} is truncated or damaged: storage {s.key} cannot be read ({e})") from None
        need = s.numel * s.dtype.itemsize
        if len(s.data) < need:
            raise ValueError(f"{path} is truncated: storage {s.key} needs {need} bytes, {len(s.data)} present")

    return _unpickle(path, io.BytesIO(zf.read(pkl[0])), storages, load_storage)


def _unpickle(path: str, f: Any, storages: dict[str, _Storage], load_storage: Any) -> Any:
    try:
        return _Unpickler(f, storages, load_storage).load()
    except ValueError as e:
        if str(e).startswith(path):
            raise
        raise ValueError(f"{path} is damaged: {e}") from None
    except (EOFError, pickle.UnpicklingError) as e:
        raise ValueError(f"{path} is truncated or damaged: its pickle cannot be read ({e or 'ran out of data'})"
                         ) from None
    except Exception as e:  # noqa: BLE001 - a crafted pickle can provoke any error inside the unpickler
        raise ValueError(f"{path} is damaged: its pickle cannot be read ({type(e).__name__}: {e})") from None


def _read_legacy(path: str, f: Any) -> Any:
    header = _Unpickler(f, {}, None)
    try:
        magic = header.load()
    except Exception:  # noqa: BLE001 - whatever does not start with the magic pickle is not a torch file
        magic = None
    if magic != _LEGACY_MAGIC:
        raise ValueError(f"{path} is not a PyTorch file (neither a zip archive with data.pkl nor a legacy "
                         "torch pickle)")
    try:
        protocol = header.load()
        sys_info = header.load()
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"{path} is truncated or damaged: its header cannot be read ({e})") from None
    if protocol != _LEGACY_PROTOCOL:
        raise ValueError(f"{path}: legacy torch file with protocol version {protocol!r}, expected "
                         f"{_LEGACY_PROTOCOL}")
    # Storage bytes are little-endian whatever machine wrote them (torch converted them on writing); a
    # big-endian writer's element counts would fail the count or length checks below, one clear error.
    del sys_info
    storages: dict[str, _Storage] = {}
    obj = _unpickle(path, f, storages, lambda s: None)
    keys = _unpickle(path, f, {}, None)
    if not isinstance(keys, list):
        raise ValueError(f"{path} is damaged: the storage key list is a {type(keys).__name__}")
    for key in keys:
        s = storages.get(str(key))
        if s is None:
            raise ValueError(f"{path} is damaged: storage {key} is listed but no tensor uses it")
        count_bytes = f.read(8)
        if len(count_bytes) < 8:
            raise ValueError(f"{path} is truncated: storage {key}'s element count is missing")
        (count,) = struct.unpack("<q", count_bytes)
        need = count * s.dtype.itemsize
        if count < 0 or count < s.numel:
            raise ValueError(f"{path} is damaged: storage {key} holds {count} elements, its tensors "
                             f"declared {s.numel}")
        s.data = f.read(need)
        if len(s.data) < need:
            raise ValueError(f"{path} is truncated: storage {key} needs {need} bytes, {len(s.data)} remain")
    missing = [k for k, s in storages.items() if s.data is None and not isinstance(s, _StorageView)]
    if missing:
        raise ValueError(f"{path} is damaged: storages {missing} are used but not in the file")
    return obj


def load_torch_file(path: str) -> Any:
    """The whole object a ``torch.save`` file holds, with tensors as numpy arrays of their own dtype.

    Plain containers and scalars are kept; any other class or function named in the file becomes an
    :class:`Opaque` placeholder (nothing from the file is imported or run). Raises FileNotFoundError for
    a missing file and one ValueError naming the file for anything that is not a readable torch file.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    with open(path, "rb") as f:
        head = f.read(512)
        f.seek(0)
        if head[:4] == b"PK\x03\x04":
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, OSError, EOFError):
                raise ValueError(f"{path} is truncated or damaged: it starts as a zip archive but its end "
                                 "(the zip directory) is missing or unreadable") from None
            with zf:
                try:
                    obj = _read_zip(path, zf)
                except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
                    raise ValueError(f"{path} is truncated or damaged: {type(e).__name__}: {e}") from None
        elif len(head) > 262 and head[257:262] == b"ustar":
            raise ValueError(f"{path} is a tar archive, the format of PyTorch's first releases (until early "
                             "2017), which this reader does not read; re-save it with any later torch")
        else:
            obj = _read_legacy(path, f)
    try:
        return _materialize(obj, {})
    except ValueError as e:
        raise ValueError(f"{path} is damaged: {e}") from None
    except RecursionError:
        raise ValueError(f"{path} is damaged: its containers nest too deeply to walk") from None


# Where training scripts put the weights: Lightning's ``state_dict``, then plain scripts' ``model`` / ``module``.
STATE_DICT_KEYS = ("state_dict", "model", "module")


def find_state_dict(obj: Any, path: str, key: str | None = None, keys: Sequence[str] = STATE_DICT_KEYS,
                    bare_tensors_only: bool = False) -> dict:
    """The state dict inside a loaded file: ``obj[key]`` when given, else the first of ``keys`` that is a
    dict, else ``obj`` itself (with ``bare_tensors_only``, only when every value is a tensor: a bare state dict
    such as an FSDP-consolidated file, not a checkpoint that holds its weights under another name)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict")
    entries = sorted(map(str, obj))
    if key:
        if not isinstance(obj.get(key), dict):
            raise ValueError(f"{path} has no state dict under {key!r}; its entries: {entries}")
        return obj[key]
    for k in keys:
        if isinstance(obj.get(k), dict):
            return obj[k]
    if bare_tensors_only and not (obj and all(isinstance(v, np.ndarray) for v in obj.values())):
        raise ValueError(f"{path} holds no state dict: none of {list(keys)} is one and its top level is not one "
                         f"(a bare state dict such as an FSDP-consolidated file); its entries: {_short(entries)}")
    return obj


def read_torch_state_dict(path: str, key: str | None = None, keys: Sequence[str] = STATE_DICT_KEYS,
                          bare_tensors_only: bool = False) -> dict[str, np.ndarray]:
    """``{name: array}`` from a state dict file or a checkpoint holding one (see :func:`find_state_dict`).

    Floating tensors (float16/bfloat16/float32/float64) come back as float32, integer and bool tensors
    in their own dtype; entries that are not tensors are dropped. No PyTorch is needed.
    """
    sd = find_state_dict(load_torch_file(path), path, key, keys, bare_tensors_only)
    out = {k: v.astype(np.float32) if v.dtype in _FLOAT_DTYPES else v
           for k, v in sd.items() if isinstance(v, np.ndarray)}
    if not out:
        raise ValueError(f"{path} holds no tensors in its state dict (entries: {_short(sorted(map(str, sd)))})")
    return out
