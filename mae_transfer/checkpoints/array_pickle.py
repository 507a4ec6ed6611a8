"""Reading plain pickles of numpy arrays (detectron2's model-zoo .pkl files) without running anything they name.

detectron2 ships its models, ViTDet's among them, as `pickle.dump({'model': {name: ndarray}, '__author__': ...})`
and loads them with pickle.load, which runs whatever the file asks for; torch.load reads only torch's own formats.
Here every global the file names resolves to a stand-in of ours (Python's "Restricting Globals", taken further):
numpy's own constructors are not handed anything from the file, because their __setstate__ takes dtype flags from it
(an object dtype rebuilt from raw bytes makes numpy dereference pointers the file chose). The stand-ins accept only
plain numeric arrays (bool, integers, floats, complex), check every value, and build the array with np.frombuffer.
"""
import codecs
import collections
import math
import pickle
from pathlib import Path
from typing import Any, Callable, Optional, Tuple

import numpy as np
import torch

__all__ = ["ArrayPickleError", "read_array_pickle"]

# The dtypes a model's weights have, as numpy pickles them (np.dtype(spec), then a BUILD with the canonical state of
# a plain dtype: version 3, the byte order, no fields, no subarray, default size and alignment, no flags).
_NUMERIC = {"b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8", "c8", "c16"}


class ArrayPickleError(pickle.UnpicklingError):
    """The pickle asks for something beyond plain numeric arrays in plain containers."""


class _DType:
    """numpy.dtype as pickled, for the numeric dtypes only."""

    def __init__(self, spec: Any, align: Any = False, copy: Any = True):
        if spec not in _NUMERIC:
            raise ArrayPickleError(f"numpy dtype {spec!r} (only bool, integer, float and complex arrays are read)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 8 and state[0] == 3 and state[1] in ("<", ">", "|", "=")
                and state[2:] == (None, None, None, -1, -1, 0)):
            raise ArrayPickleError(f"numpy dtype state {state!r} (not a plain numeric dtype's)")
        if state[1] in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(state[1])


class _Global:
    """A global the file may name, calling `function` (None: not callable). Closed to pickle's BUILD, which would
    otherwise set attributes on it, for every later load in the process."""

    __slots__ = ("function",)

    def __init__(self, function: Optional[Callable]):
        self.function = function

    def __call__(self, *args: Any) -> Any:
        if self.function is None:
            raise ArrayPickleError("a call of numpy.ndarray")
        return self.function(*args)

    def __setstate__(self, state: Any) -> None:
        raise ArrayPickleError("a change to a global")


_NDARRAY = _Global(None)  # numpy.ndarray: only ever the subtype given to _reconstruct


class _Array:
    """An ndarray as pickled by protocols 0-4: _reconstruct(ndarray, (0,), b'b') then __setstate__ with
    (version, shape, dtype, is_fortran, raw bytes)."""

    def __init__(self):
        self.array = None

    def __setstate__(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5 and state[0] == 1):
            raise ArrayPickleError("an ndarray state that is not (1, shape, dtype, is_fortran, data)")
        _, shape, dtype, fortran, data = state
        self.array = _array(data, dtype, shape, "F" if fortran is True else "C" if fortran is False else None)


def _array(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    """The array of `shape` and `dtype` whose bytes are `data`, after checking that they are exactly that."""
    if isinstance(data, str):  # Python 2 pickles (read with encoding='latin1') hold the bytes as str
        data = data.encode("latin-1")
    if isinstance(data, pickle.PickleBuffer):
        data = data.raw()
    if not (isinstance(dtype, _DType) and isinstance(data, (bytes, bytearray, memoryview)) and order in ("C", "F")
            and isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise ArrayPickleError("an ndarray whose shape, dtype, order or data is not plain")
    if len(data) != math.prod(shape) * dtype.dtype.itemsize:
        raise ArrayPickleError(f"an ndarray of shape {shape} and dtype {dtype.dtype} with {len(data)} bytes of data")
    return np.frombuffer(data, dtype=dtype.dtype).reshape(shape, order=order)


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> _Array:
    if subtype is not _NDARRAY:
        raise ArrayPickleError("numpy's _reconstruct of a type other than ndarray")
    return _Array()


def _frombuffer(data: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:  # how protocol 5 pickles arrays
    return _array(data, dtype, shape, order)


def _scalar(dtype: Any, data: Any) -> Any:  # a numpy scalar (np.int64(5)), read as a Python number
    return _array(data, dtype, (), "C").item()


def _empty_bytes() -> bytes:  # protocol 2 spells b'' as a call of bytes without arguments (bytes(n) would allocate)
    return b""


# Every global the file may name, under NumPy 1's and NumPy 2's module names; and how protocol 2 spells bytes in
# Python 3 (_codecs.encode(text, 'latin1'): a codec from the standard library's encodings, as torch's weights-only
# unpickler allows it too; b'' as __builtin__.bytes()).
_GLOBALS = {
    **{(f"numpy.{core}.{module}", name): _Global(function) for core in ("core", "_core")
       for module, name, function in (("multiarray", "_reconstruct", _reconstruct), ("multiarray", "scalar", _scalar),
                                      ("numeric", "_frombuffer", _frombuffer))},
    ("numpy", "ndarray"): _NDARRAY, ("numpy", "dtype"): _Global(_DType), ("_codecs", "encode"): codecs.encode,
    **{(builtins, "bytes"): _Global(_empty_bytes) for builtins in ("__builtin__", "builtins")},
    ("collections", "OrderedDict"): collections.OrderedDict}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _GLOBALS[module, name]
        except KeyError:
            raise ArrayPickleError(f"{module}.{name}") from None


def _resolve(obj: Any) -> Any:
    """Stand-ins to what they stand for: arrays as tensors (copies: np.frombuffer's arrays are read-only), dtypes as
    numpy's; throughout dicts, lists and tuples."""
    if isinstance(obj, _Global):
        raise ArrayPickleError("a global as a value")
    if isinstance(obj, _Array):
        obj = obj.array
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(obj.dtype.newbyteorder("=")))  # a native-order copy
    if isinstance(obj, _DType):
        return obj.dtype
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve(v) for v in obj)
    return obj


def read_array_pickle(path: Path) -> Tuple[Any, bool]:
    """(the file's object with its arrays as tensors, True), or (None, False) when the file is a torch.save file in
    torch's legacy (non-zip) format, whose first pickle is torch's magic number: torch.load reads those.

    Raises ArrayPickleError for anything beyond numeric arrays in plain containers, and pickle's (or the stand-ins')
    own errors for a file that is not a pickle or is cut short. latin1: Detectron1-era files are Python 2 pickles."""
    with open(path, "rb") as f:
        obj = _Unpickler(f, encoding="latin1").load()
    if type(obj) is int and obj == torch.serialization.MAGIC_NUMBER:
        return None, False
    return _resolve(obj), True
