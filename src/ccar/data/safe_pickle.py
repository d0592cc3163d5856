"""A pickle reader for the CIFAR python files that can neither run code nor build an unsafe numpy array.

The CIFAR batches are Python-2 pickles of a dict holding lists, bytes and numpy arrays. numpy's own unpickling
(``_reconstruct`` + ``ndarray.__setstate__``) trusts the file: it builds an array of whatever dtype the file names
from the file's raw bytes, object dtype included, and numpy then reads those bytes as object pointers. So numpy's
globals are never handed to the unpickler here. Each admitted global is replaced by a stand-in:

- ``numpy.dtype(code, align, copy)`` + its ``BUILD`` state -> a :class:`_DTypeStub` that resolves only to a
  fixed-size bool, integer or float dtype (no object, void, structured, subarray, string or datetime dtypes);
- ``numpy...._reconstruct(ndarray, shape, typecode)`` + its ``BUILD`` state -> an :class:`_ArrayStub` whose
  ``__setstate__`` checks the version, shape (0..8 non-negative dimensions, at most :data:`MAX_ELEMENTS`
  elements), dtype (a resolved stub) and that the raw buffer holds exactly ``prod(shape) * itemsize`` bytes,
  then builds a plain array with ``np.frombuffer(...).copy()``;
- ``numpy...._frombuffer(buffer, dtype, shape, order)`` (how numpy writes arrays at protocol 5): the same checks;
- ``_codecs.encode(text, "latin1")`` (how Python 3 writes bytes at protocol 2): that one codec only.

Every other global (``os.system``, ``builtins.eval``, ...) is refused before any lookup, and the opcode stream is
checked first (:func:`check_opcodes`) so that the unpickler itself cannot be made to allocate gigabytes. Anything malformed raises
:class:`pickle.UnpicklingError` (the caller turns it into a ``DataError`` naming the file). After loading,
:func:`plain_arrays` replaces the finished stubs among the dict's values with their arrays; any other stub stays a
stub, which no CIFAR check accepts.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
from typing import Any

import numpy as np

MAX_ELEMENTS = 1 << 31  # elements in one array (the file-size cap bounds the bytes anyway)
MAX_NDIM = 8
_NUMERIC_KINDS = "biuf"  # bool, signed, unsigned, float: fixed-size and pointer-free
_BYTE_ORDERS = {"<", ">", "|", "="}


class _Refused(pickle.UnpicklingError):
    pass


def _text(value: Any, what: str) -> str:
    if isinstance(value, bytes):  # Python-2 str read with encoding="bytes"
        value = value.decode("latin1")
    if not isinstance(value, str) or len(value) > 16:
        raise _Refused(f"{what} must be a short string, got {type(value).__name__}")
    return value


class _DTypeStub:
    __slots__ = ("code", "dtype")

    def __init__(self, code: str) -> None:
        self.code = code
        self.dtype = None  # resolved by __setstate__ (numpy always pickles a dtype with its state)

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) not in (8, 9):
            raise _Refused("a dtype's state must be the 8- or 9-tuple numpy writes")
        version, order, subarray, names, fields = state[:5]
        if version not in (3, 4) or subarray is not None or names is not None or fields is not None:
            raise _Refused("only plain numeric dtypes are allowed (no structured or subarray dtypes)")
        if len(state) == 9 and state[8] is not None:
            raise _Refused("dtype metadata is not allowed")
        order = _text(order, "a dtype's byte order")
        if order not in _BYTE_ORDERS:
            raise _Refused(f"byte order {order!r} is not one of < > | =")
        try:
            dtype = np.dtype(self.code)
        except (TypeError, ValueError) as exc:
            raise _Refused(f"unknown dtype code {self.code!r}") from exc
        if dtype.kind not in _NUMERIC_KINDS or dtype.fields is not None or dtype.subdtype is not None:
            raise _Refused(f"dtype {self.code!r} is not a plain bool/integer/float type")
        self.dtype = dtype.newbyteorder(order) if order in "<>" else dtype


class _ArrayStub:
    __slots__ = ("array",)

    def __init__(self) -> None:
        self.array = None

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise _Refused("an array's state must be the 5-tuple numpy writes")
        version, shape, dtype, fortran, raw = state
        if version != 1 or not isinstance(fortran, bool):
            raise _Refused("unsupported array state")
        self.array = _build_array(raw, dtype, shape, "F" if fortran else "C")


def _build_array(raw, dtype, shape, order: str) -> np.ndarray:
    if not isinstance(dtype, _DTypeStub) or dtype.dtype is None:
        raise _Refused("an array's dtype must be a plain numeric numpy dtype")
    if not isinstance(shape, tuple) or len(shape) > MAX_NDIM or not all(type(n) is int and n >= 0 for n in shape):
        raise _Refused(f"an array's shape must be up to {MAX_NDIM} non-negative integers")
    count = math.prod(shape)
    if count > MAX_ELEMENTS:
        raise _Refused(f"an array of {count} elements is larger than {MAX_ELEMENTS}")
    if not isinstance(raw, (bytes, bytearray)):
        raise _Refused("an array's data must be raw bytes (object arrays are not allowed)")
    if len(raw) != count * dtype.dtype.itemsize:
        raise _Refused(f"an array of shape {shape} and dtype {dtype.dtype} needs {count * dtype.dtype.itemsize} "
                       f"bytes, the file holds {len(raw)}")
    flat = np.frombuffer(raw, dtype=dtype.dtype, count=count).copy()
    return flat.reshape(shape, order=order)


# --- the stand-ins for the admitted globals ---------------------------------------------------------------------------


class _Global:
    """What ``find_class`` hands the unpickler: callable, stateless, and refusing any state of its own."""

    __slots__ = ("name", "fn")

    def __init__(self, name: str, fn) -> None:
        self.name, self.fn = name, fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state) -> None:
        raise _Refused(f"{self.name} takes no state")


def _no_call(*args):
    raise _Refused("numpy.ndarray may only be named as _reconstruct's first argument")


_NDARRAY = _Global("numpy.ndarray", _no_call)


def _dtype(code=None, align=False, copy=True, *extra) -> _DTypeStub:
    if extra or not isinstance(align, bool) or not isinstance(copy, bool):
        raise _Refused("numpy.dtype called with unexpected arguments")
    return _DTypeStub(_text(code, "a dtype code"))


def _reconstruct(cls=None, shape=None, typecode=None, *extra) -> _ArrayStub:
    if extra or cls is not _NDARRAY:
        raise _Refused("_reconstruct may only make a numpy.ndarray")
    return _ArrayStub()


def _frombuffer(buffer=None, dtype=None, shape=None, order="C", *extra) -> _ArrayStub:
    order = _text(order, "an array order")
    if extra or order not in ("C", "F"):
        raise _Refused("_frombuffer called with unexpected arguments")
    stub = _ArrayStub()
    stub.array = _build_array(buffer, dtype, shape, order)
    return stub


def _codecs_encode(text=None, encoding=None, *extra) -> bytes:
    if extra or not isinstance(text, str) or encoding != "latin1":
        raise _Refused("_codecs.encode is only allowed as encode(text, 'latin1')")
    try:
        return text.encode("latin1")
    except UnicodeEncodeError as exc:
        raise _Refused("latin1 data out of range") from exc


_FACTORIES = {
    ("numpy", "ndarray"): lambda: _NDARRAY,
    ("numpy", "dtype"): lambda: _Global("numpy.dtype", _dtype),
    ("numpy.core.multiarray", "_reconstruct"): lambda: _Global("_reconstruct", _reconstruct),
    ("numpy._core.multiarray", "_reconstruct"): lambda: _Global("_reconstruct", _reconstruct),
    ("numpy.core.numeric", "_frombuffer"): lambda: _Global("_frombuffer", _frombuffer),
    ("numpy._core.numeric", "_frombuffer"): lambda: _Global("_frombuffer", _frombuffer),
    ("_codecs", "encode"): lambda: _Global("_codecs.encode", _codecs_encode),
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickler with stand-ins for the few globals the CIFAR files use; every other global is refused."""

    def find_class(self, module, name):
        factory = _FACTORIES.get((module, name))
        if factory is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR file")
        return factory()

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent references are not allowed in a CIFAR file")


def plain_arrays(obj: Any) -> Any:
    """A loaded dict with every finished :class:`_ArrayStub` among its values replaced by its array (where the CIFAR
    files keep theirs); stubs anywhere else stay stubs, which no CIFAR check accepts."""
    if type(obj) is not dict:
        return obj
    return {k: v.array if isinstance(v, _ArrayStub) and v.array is not None else v for k, v in obj.items()}


_MEMO_OPS = {"PUT", "BINPUT", "LONG_BINPUT", "GET", "BINGET", "LONG_BINGET"}


def check_opcodes(raw: bytes) -> None:
    """Walk the opcode stream without running it and refuse memo indices beyond the number of opcodes.

    CPython's unpickler sizes its memo table by the largest index it sees, so a 10-byte ``LONG_BINPUT 1260915825``
    would allocate ~10 GB before any check of ours runs (found by the fuzzer). A real pickle numbers its memo
    entries from 0 upwards, one per opcode at most, so an index never exceeds the number of opcodes before it.
    One pass, holding one opcode's argument at a time.
    """
    for n, (op, arg, pos) in enumerate(pickletools.genops(raw)):
        if op.name in _MEMO_OPS and not (isinstance(arg, int) and 0 <= arg <= n):
            raise _Refused(f"memo index {arg} at byte {pos} is out of range after {n} opcodes")


def loads(raw: bytes) -> Any:
    """Unpickle ``raw`` with :class:`SafeUnpickler` (``encoding="bytes"``, as the CIFAR files are Python 2)."""
    check_opcodes(raw)
    return plain_arrays(SafeUnpickler(io.BytesIO(raw), encoding="bytes").load())
