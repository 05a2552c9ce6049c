"""DeepEP's small types on torch_ep: Config, EventHandle, EventOverlap, and the handle tuples."""
from __future__ import annotations

import functools
import operator
from typing import List, Optional, Sequence, Tuple

import torch

from ..types import DispatchHandle, LowLatencyHandle, pad_counts, send_matrix_size

def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class Config:
    """DeepEP's performance config. torch_ep's kernels have no channels or chunks to tune: the
    values are checked as DeepEP checks them and kept, and the size hints are estimates for
    callers that size a Buffer with them (torch_ep sizes its own buffers)."""

    def __init__(self, num_sms: int = 20, num_max_nvl_chunked_send_tokens: int = 6,
                 num_max_nvl_chunked_recv_tokens: int = 256, num_max_rdma_chunked_send_tokens: int = 6,
                 num_max_rdma_chunked_recv_tokens: int = 256) -> None:
        self.num_sms = _positive_int("num_sms", num_sms, 0)
        self.num_max_nvl_chunked_send_tokens = _positive_int("num_max_nvl_chunked_send_tokens",
                                                             num_max_nvl_chunked_send_tokens)
        self.num_max_nvl_chunked_recv_tokens = _positive_int("num_max_nvl_chunked_recv_tokens",
                                                             num_max_nvl_chunked_recv_tokens)
        self.num_max_rdma_chunked_send_tokens = _positive_int("num_max_rdma_chunked_send_tokens",
                                                              num_max_rdma_chunked_send_tokens)
        self.num_max_rdma_chunked_recv_tokens = _positive_int("num_max_rdma_chunked_recv_tokens",
                                                              num_max_rdma_chunked_recv_tokens)
        if num_max_nvl_chunked_send_tokens >= num_max_nvl_chunked_recv_tokens:
            raise ValueError("num_max_nvl_chunked_send_tokens must be below num_max_nvl_chunked_recv_tokens")
        if num_max_rdma_chunked_send_tokens >= num_max_rdma_chunked_recv_tokens:
            raise ValueError("num_max_rdma_chunked_send_tokens must be below num_max_rdma_chunked_recv_tokens")

    def _hint(self, hidden_bytes: int, num_ranks: int, chunk_tokens: int) -> int:
        channels = max(self.num_sms // 2, 1)
        per_token = hidden_bytes + 128 * (8 + 4 + 4)  # row, top-k ids, weights and scales at their largest
        return -(-channels * num_ranks * chunk_tokens * per_token // 128) * 128

    def get_nvl_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return self._hint(hidden_bytes, min(num_ranks, 8), self.num_max_nvl_chunked_recv_tokens)

    def get_rdma_buffer_size_hint(self, hidden_bytes: int, num_ranks: int) -> int:
        return 0 if num_ranks <= 8 else self._hint(hidden_bytes, num_ranks // 8, self.num_max_rdma_chunked_recv_tokens)

    def __repr__(self) -> str:
        return (f"Config(num_sms={self.num_sms}, nvl={self.num_max_nvl_chunked_send_tokens}/"
                f"{self.num_max_nvl_chunked_recv_tokens}, rdma={self.num_max_rdma_chunked_send_tokens}/"
                f"{self.num_max_rdma_chunked_recv_tokens})")


class EventHandle:
    """A point on a stream: a CUDA event recorded there (on the current stream by default), or,
    for CPU work and where CUDA is absent, a point already passed."""

    def __init__(self, stream: Optional[torch.cuda.Stream] = None) -> None:
        self.event = None
        if stream is not None or (torch.cuda.is_available() and torch.cuda.is_initialized()):
            self.event = torch.cuda.Event()
            self.event.record(stream if stream is not None else torch.cuda.current_stream())

    def current_stream_wait(self) -> None:
        if self.event is not None:
            torch.cuda.current_stream().wait_event(self.event)

    def _stream_wait(self, stream) -> None:
        if self.event is not None:
            stream.wait_event(self.event)

    def _host_wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()


class EventOverlap:
    """DeepEP's event wrapper: `current_stream_wait()` makes the current stream wait for the
    event; `with event: ...` runs the block's work first and waits on exit. `extra_tensors` keep
    the call's tensors alive until the event is dropped (DeepEP's CUDA-graph-safe record_stream)."""

    def __init__(self, event: Optional[EventHandle] = None,
                 extra_tensors: Optional[Tuple[torch.Tensor, ...]] = None) -> None:
        self.event = event
        self.extra_tensors = extra_tensors

    def current_stream_wait(self) -> None:
        if self.event is None:
            raise RuntimeError("current_stream_wait: this EventOverlap holds no event (the call was made "
                               "without async_finish, so the current stream already waits for it)")
        self.event.current_stream_wait()

    def __enter__(self) -> "EventOverlap":
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        if self.event is not None:
            self.event.current_stream_wait()


class _Lazy(functools.partial):
    """A handle element made when first read: _Lazy(make, *args)() gives it. A partial: made in
    C, with no lambda to build and no Python __init__ to run per dispatch."""
    __slots__ = ()


class _HostCounts:
    """A dispatch handle's counts (DispatchHandle.counts) read once as a list, at the handle's own
    offsets: each value read from the tensor, and each offset worked out again, costs host time
    per call, which a layout-given dispatch on a fast GPU cannot hide. `values` ends at the send
    matrix where more follows than a view costs to make (tolist costs per value: the matrix has
    R*R, 1024 values at 32 ranks; a view costs about 100 values)."""
    __slots__ = ("values", "per_expert_start", "matrix_start", "internode", "sizes_on_host")

    def __init__(self, native: DispatchHandle):
        counts, start, end = native.counts, native._per_expert_start, native._matrix_start
        total = counts.numel()
        values = (counts[:end] if total - end > 100 else counts).tolist()
        self.values, self.per_expert_start, self.matrix_start = values, start, end
        self.internode = total > end + send_matrix_size(native.num_ranks)
        # False where only the device knows the sizes (a CUDA dispatch with num_worst_tokens: -1);
        # an attribute, not a property: every dispatch asks.
        self.sizes_on_host = values[2] >= 0  # the first send count

    def per_expert(self, alignment: int) -> List[int]:
        """As DispatchResult.num_recv_tokens_per_expert."""
        counts = self.values[self.per_expert_start:self.matrix_start]
        return counts if alignment == 1 else pad_counts(counts, alignment)


class _Handle(tuple):
    """A DeepEP handle tuple; `native` is the torch_ep handle behind it. Elements in `lazy` are
    made when first read (indexing, unpacking, iteration): the rank prefix matrix is a copy
    to the GPU that a dispatch would otherwise wait behind (measured: +60 % of a layout-given
    dispatch's time on the H200), and that callers of DeepEP's API rarely read."""

    def __new__(cls, items: Sequence, native, lazy: Optional[dict] = None):
        """`items` with None where `lazy` ({index: _Lazy}) makes the element on first read."""
        handle = tuple.__new__(cls, items)
        handle.native = native
        handle._lazy = lazy if lazy is not None else {}
        return handle

    def __getitem__(self, index):
        if isinstance(index, slice):
            return tuple(self[i] for i in range(*index.indices(len(self))))
        i = operator.index(index)
        i = i + len(self) if i < 0 else i
        value = self._lazy.get(i)
        if value is None:
            return tuple.__getitem__(self, index)
        if isinstance(value, _Lazy):
            value = self._lazy[i] = value()
        return value

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return repr(tuple(self))

    def tensors_made(self) -> List[torch.Tensor]:
        """The tensors among the elements made so far (for record_stream)."""
        return _tensors(*tuple.__iter__(self), *[v for v in self._lazy.values() if not isinstance(v, _Lazy)])


class _PrefixHandle(_Handle):
    """DeepEP's intranode dispatch handle whose element 0, the rank prefix matrix, is made from the
    native handle's send matrix when first read, on the dispatch's device. Its _lazy entry too is
    made then (__getattr__ runs only while the attribute is missing): built with every handle, it
    cost each dispatch more than the rest of the handle."""

    def __getattr__(self, name):
        if name != "_lazy":
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        self._lazy = {0: _Lazy(_prefix_matrix, self.native)}
        return self._lazy


def _prefix_matrix(native: DispatchHandle) -> torch.Tensor:
    """[R, R] int32 on the dispatch's device: rows rank j receives from ranks 0..i."""
    return _to_device(native.send_matrix.cumsum(0).to(torch.int32), native.meta.device)


def _to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor on `device`, copied in stream order (no host wait)."""
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _native(handle, kind, what: str = "handle"):
    native = getattr(handle, "native", None)
    if not isinstance(native, kind):
        raise TypeError(f"{what}: expected the handle a torch_ep.deep_ep Buffer returned from "
                        f"{'low_latency_dispatch' if kind is LowLatencyHandle else 'dispatch'}, got "
                        f"{type(handle).__name__}")
    return native


def _tensors(*values) -> List[torch.Tensor]:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, _Handle):
            out += v.tensors_made()  # iterating would make its deferred elements
        elif isinstance(v, (tuple, list)):
            out += _tensors(*v)
    return out


def _done_event() -> EventHandle:
    event = EventHandle.__new__(EventHandle)
    event.event = None
    return event


def _check_config(config) -> None:
    if config is not None and not isinstance(config, Config):
        raise TypeError(f"config: expected a torch_ep.deep_ep.Config, got {type(config).__name__}")


def _unpack_bias(bias, num_tokens: int, x) -> List[torch.Tensor]:
    if bias is None:
        return []
    biases = list(bias) if isinstance(bias, (tuple, list)) else [bias]
    if not 1 <= len(biases) <= 2:
        raise ValueError(f"bias: expected a tensor or a pair of tensors, got {len(biases)}")
    hidden = x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() >= 1 else -1
    for b in biases:
        if not isinstance(b, torch.Tensor) or not b.dtype.is_floating_point:
            raise TypeError(f"bias must be floating-point tensors, got {getattr(b, 'dtype', type(b).__name__)}")
        if tuple(b.shape) != (num_tokens, hidden) or b.device != x.device:
            raise ValueError(f"bias must have shape [{num_tokens}, {hidden}] (the dispatched tokens, hidden) on "
                             f"{x.device}, got {list(b.shape)} on {b.device}")
    return biases


def _pack_ue8m0(scales: torch.Tensor) -> torch.Tensor:
    """float32 power-of-two scales [..., S] -> their exponent bytes, four to an int32 [..., ceil(S/4)]."""
    exponents = ((scales.contiguous().view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
    pad = -exponents.shape[-1] % 4
    if pad:
        exponents = torch.nn.functional.pad(exponents, (0, pad))
    return exponents.view(torch.int32)
