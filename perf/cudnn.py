"""cuDNN's legacy softmax through ctypes, on the ``libcudnn.so.9`` torch loaded.

PyTorch never routes softmax to cuDNN, and CuPy 14 dropped cuDNN, so the
baseline calls the library directly:

- ``cudnnSoftmaxForward`` / ``cudnnSoftmaxBackward`` (exported and not
  deprecated in cuDNN 9), ``cudnnCreate`` and ``cudnnSetStream`` from the
  same shim library;
- an [rows, cols] softmax over cols is an NCHW tensor with n=rows, c=cols,
  h=w=1 and mode CHANNEL;
- alpha and beta are host scalars: ``double`` for double tensors, ``float``
  otherwise;
- the stream is set to torch's current stream before every call;
- a descriptor refuses 2**31 or more elements, so larger tensors are cut into
  several calls of whole rows (:func:`row_chunks`; the sweep says so in the
  ``note`` column).

Every status is checked; a failure raises :class:`CudnnError` with the code.
"""

from __future__ import annotations

import ctypes
import glob
import os

import torch

__all__ = [
    "ALGO_FAST",
    "ALGO_ACCURATE",
    "ALGO_LOG",
    "MODE_INSTANCE",
    "MODE_CHANNEL",
    "MODE",
    "DTYPE_CODES",
    "MAX_DESC_ELEMENTS",
    "CudnnError",
    "Cudnn",
    "row_chunks",
    "cudnn_path_from_maps",
    "find_libcudnn",
    "softmax_function",
]

ALGO_FAST, ALGO_ACCURATE, ALGO_LOG = 0, 1, 2
MODE_INSTANCE, MODE_CHANNEL = 0, 1
# The rows are [n, c, 1, 1] tensors, where a softmax over the channels of each
# position (MODE_CHANNEL) and over each instance's c x 1 x 1 values
# (MODE_INSTANCE) are the same math. On the H200 run of 2026-12-04,
# MODE_CHANNEL's backward ran at 2-10 GB/s at every shape (0% of copy), its
# forward at 20-54% (perf/results/nvidia-h200/2026-12-04/): the harness
# uses MODE_INSTANCE instead; the summary flags the rows if they stay
# implausible.
MODE = MODE_INSTANCE
TENSOR_NCHW = 0
STATUS_SUCCESS = 0
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 9}
MAX_DESC_ELEMENTS = 1 << 31  # a descriptor refuses this many elements or more


class CudnnError(RuntimeError):
    """A cuDNN call returned a status other than CUDNN_STATUS_SUCCESS."""

    def __init__(self, func: str, status: int, message: str = ""):
        self.func = func
        self.status = status
        super().__init__(f"{func} failed with cuDNN status {status}" + (f" ({message})" if message else ""))


def row_chunks(rows: int, cols: int, max_elements: int = MAX_DESC_ELEMENTS) -> list[tuple[int, int]]:
    """``(first_row, n_rows)`` pieces, each under ``max_elements`` elements."""
    if rows <= 0 or cols <= 0:
        raise ValueError("rows and cols must be positive")
    per = (max_elements - 1) // cols
    if per < 1:
        raise ValueError(f"a single row of {cols} elements exceeds the descriptor limit")
    return [(r, min(per, rows - r)) for r in range(0, rows, per)]


def cudnn_path_from_maps(maps_text: str) -> str | None:
    """The path of the loaded ``libcudnn.so.9*`` shim in ``/proc/<pid>/maps`` text."""
    for line in maps_text.splitlines():
        parts = line.split()
        if len(parts) < 6 or not parts[-1].startswith("/"):
            continue
        path = parts[-1]
        if os.path.basename(path).startswith("libcudnn.so.9"):
            return path
    return None


def _candidate_paths() -> list[str]:
    """Where pip-installed torch keeps cuDNN, when the maps do not show it."""
    dirs = [os.path.join(os.path.dirname(torch.__file__), "lib")]
    site = os.path.dirname(os.path.dirname(torch.__file__))
    dirs += glob.glob(os.path.join(site, "nvidia", "cudnn", "lib"))
    dirs += glob.glob(os.path.join(site, "nvidia", "cu*", "lib"))
    found: list[str] = []
    for d in dirs:
        found += sorted(glob.glob(os.path.join(d, "libcudnn.so.9*")))
    return found


def find_libcudnn() -> str:
    """Path of the ``libcudnn.so.9`` this process loaded through torch.

    Asks torch for cuDNN's version first (which loads it when torch has not
    yet), then reads ``/proc/self/maps``; falls back to torch's lib folder and
    the ``nvidia`` wheels beside it, then to the loader's search path.
    """
    version = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if version is not None and version < 90000:  # cuDNN 9 reports 9xxyy
        raise RuntimeError(f"torch uses cuDNN {version}; this binding needs cuDNN 9")
    try:
        with open("/proc/self/maps") as f:
            path = cudnn_path_from_maps(f.read())
        if path:
            return path
    except OSError:
        pass
    candidates = _candidate_paths()
    return candidates[0] if candidates else "libcudnn.so.9"


def _current_stream() -> int:
    return torch.cuda.current_stream().cuda_stream


class Cudnn:
    """A cuDNN handle and cached descriptors for [rows, cols] softmax.

    ``lib`` may be any object with the cuDNN functions as attributes (tests
    pass a fake); by default the shim is loaded from :func:`find_libcudnn`.
    """

    def __init__(self, lib=None, *, path: str | None = None, stream_fn=_current_stream,
                 max_elements: int = MAX_DESC_ELEMENTS):
        if lib is None:
            self.path = path or find_libcudnn()
            lib = ctypes.CDLL(self.path)
        else:
            self.path = path or "<injected>"
        self.lib = lib
        self.stream_fn = stream_fn
        self.max_elements = max_elements
        self._bind()
        self._handle = None
        self._descs: dict[tuple[int, int, int], ctypes.c_void_p] = {}

    def _bind(self) -> None:
        vp, i = ctypes.c_void_p, ctypes.c_int
        protos = {
            "cudnnCreate": [ctypes.POINTER(vp)],
            "cudnnDestroy": [vp],
            "cudnnSetStream": [vp, vp],
            "cudnnCreateTensorDescriptor": [ctypes.POINTER(vp)],
            "cudnnDestroyTensorDescriptor": [vp],
            "cudnnSetTensor4dDescriptor": [vp, i, i, i, i, i, i],
            "cudnnSoftmaxForward": [vp, i, i, vp, vp, vp, vp, vp, vp],
            "cudnnSoftmaxBackward": [vp, i, i, vp, vp, vp, vp, vp, vp, vp, vp],
        }
        for name, argtypes in protos.items():
            fn = getattr(self.lib, name)  # AttributeError names the missing symbol
            if hasattr(fn, "argtypes"):
                fn.argtypes = argtypes
                fn.restype = ctypes.c_int
        err = getattr(self.lib, "cudnnGetErrorString", None)
        if err is not None and hasattr(err, "restype"):
            err.argtypes = [ctypes.c_int]
            err.restype = ctypes.c_char_p

    def version(self) -> int | None:
        fn = getattr(self.lib, "cudnnGetVersion", None)
        if fn is None:
            return None
        if hasattr(fn, "restype"):
            fn.restype = ctypes.c_size_t
        return int(fn())

    def _check(self, func: str, status) -> None:
        status = int(status)
        if status == STATUS_SUCCESS:
            return
        message = ""
        err = getattr(self.lib, "cudnnGetErrorString", None)
        if err is not None:
            try:
                raw = err(status)
                message = raw.decode() if isinstance(raw, bytes) else str(raw)
            except Exception:  # the message is a courtesy; the code is what matters
                message = ""
        raise CudnnError(func, status, message)

    def handle(self) -> ctypes.c_void_p:
        if self._handle is None:
            h = ctypes.c_void_p()
            self._check("cudnnCreate", self.lib.cudnnCreate(ctypes.byref(h)))
            self._handle = h
        return self._handle

    def _desc(self, dtype: torch.dtype, n: int, c: int) -> ctypes.c_void_p:
        code = DTYPE_CODES.get(dtype)
        if code is None:
            raise TypeError(f"cuDNN softmax: unsupported dtype {dtype}")
        key = (code, n, c)
        d = self._descs.get(key)
        if d is None:
            d = ctypes.c_void_p()
            self._check("cudnnCreateTensorDescriptor", self.lib.cudnnCreateTensorDescriptor(ctypes.byref(d)))
            self._check("cudnnSetTensor4dDescriptor",
                        self.lib.cudnnSetTensor4dDescriptor(d, TENSOR_NCHW, code, n, c, 1, 1))
            self._descs[key] = d
        return d

    @staticmethod
    def _scalars(dtype: torch.dtype):
        ctype = ctypes.c_double if dtype == torch.float64 else ctypes.c_float
        return ctype(1.0), ctype(0.0)

    @staticmethod
    def _rows_2d(*tensors: torch.Tensor) -> tuple[int, int]:
        first = tensors[0]
        for t in tensors:
            if t.dim() != 2 or not t.is_contiguous() or t.shape != first.shape or t.dtype != first.dtype:
                raise ValueError("cuDNN softmax needs contiguous 2-d tensors of one shape and dtype")
        return first.shape[0], first.shape[1]

    def chunks(self, rows: int, cols: int) -> list[tuple[int, int]]:
        return row_chunks(rows, cols, self.max_elements)

    def softmax_forward(self, x: torch.Tensor, y: torch.Tensor, algo: int = ALGO_ACCURATE) -> int:
        """y = softmax (or log-softmax for ALGO_LOG) of x over dim 1. Returns the call count."""
        rows, cols = self._rows_2d(x, y)
        alpha, beta = self._scalars(x.dtype)
        es = x.element_size()
        pieces = self.chunks(rows, cols)
        for r0, n in pieces:
            d = self._desc(x.dtype, n, cols)
            off = r0 * cols * es
            self._check("cudnnSetStream", self.lib.cudnnSetStream(self.handle(), ctypes.c_void_p(self.stream_fn())))
            self._check("cudnnSoftmaxForward", self.lib.cudnnSoftmaxForward(
                self.handle(), algo, MODE, ctypes.byref(alpha), d,
                ctypes.c_void_p(x.data_ptr() + off), ctypes.byref(beta), d,
                ctypes.c_void_p(y.data_ptr() + off)))
        return len(pieces)

    def softmax_backward(self, y: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor,
                         algo: int = ALGO_ACCURATE) -> int:
        """dx from the softmax output y (log-softmax output for ALGO_LOG) and dy."""
        rows, cols = self._rows_2d(y, dy, dx)
        alpha, beta = self._scalars(y.dtype)
        es = y.element_size()
        pieces = self.chunks(rows, cols)
        for r0, n in pieces:
            d = self._desc(y.dtype, n, cols)
            off = r0 * cols * es
            self._check("cudnnSetStream", self.lib.cudnnSetStream(self.handle(), ctypes.c_void_p(self.stream_fn())))
            self._check("cudnnSoftmaxBackward", self.lib.cudnnSoftmaxBackward(
                self.handle(), algo, MODE, ctypes.byref(alpha), d,
                ctypes.c_void_p(y.data_ptr() + off), d, ctypes.c_void_p(dy.data_ptr() + off),
                ctypes.byref(beta), d, ctypes.c_void_p(dx.data_ptr() + off)))
        return len(pieces)

    def close(self) -> None:
        """Destroy the descriptors and the handle."""
        for d in self._descs.values():
            self.lib.cudnnDestroyTensorDescriptor(d)
        self._descs.clear()
        if self._handle is not None:
            self.lib.cudnnDestroy(self._handle)
            self._handle = None


class _SoftmaxFn(torch.autograd.Function):
    """Differentiable cuDNN softmax: forward and backward both in cuDNN."""

    @staticmethod
    def forward(ctx, x, cudnn: Cudnn, algo: int):
        x = x.contiguous()
        y = torch.empty_like(x)
        cudnn.softmax_forward(x, y, algo)
        ctx.save_for_backward(y)
        ctx.cudnn, ctx.algo = cudnn, algo
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = torch.empty_like(y)
        ctx.cudnn.softmax_backward(y, dy.contiguous(), dx, ctx.algo)
        return dx, None, None


def softmax_function(cudnn: Cudnn, algo: int):
    """``f(x) -> y`` over the last dim of a 2-d tensor, differentiable."""
    return lambda x: _SoftmaxFn.apply(x, cudnn, algo)
