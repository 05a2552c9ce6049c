"""DeepEP's Buffer on torch_ep's ops (see the package's docstring for what differs)."""
from __future__ import annotations

import weakref
from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist

from .. import _C
from .._backend import BACKEND_NAME, get_backend
from ..low_latency import low_latency_combine as _ll_combine
from ..low_latency import low_latency_combine_buffer
from ..low_latency import low_latency_dispatch as _ll_dispatch
from ..moe import _along, _combine_along, _layout, _new_route, _split_payload
from ..options import Options
from ..types import MAX_MATRIX_RANKS, DispatchHandle, DispatchLayout, LowLatencyHandle
from .utils import (Config, EventHandle, EventOverlap, _check_config, _done_event, _Handle, _HostCounts, _Lazy, _native,
                    _pack_ue8m0, _positive_int, _PrefixHandle, _tensors, _to_device, _unpack_bias)


# What each call's result holds for _launch to record on a side stream (_tensors flattens it).
def _itself(result):
    return result


def _first(result):
    return result[0]


def _layout_tensors(result):  # get_dispatch_layout: (DispatchLayout, tokens per node)
    layout, per_node = result
    return layout.num_tokens_per_rank, layout.num_tokens_per_expert, layout.is_token_in_rank, layout.meta, per_node


def _made_tensors(result):  # dispatch: (recv_x, recv_topk_idx, recv_topk_weights, counts list, handle)
    return result[0], result[1], result[2], result[4]


def _ll_dispatch_tensors(result):  # low_latency_dispatch: (recv_x, recv_count, handle, hook)
    return result[0], result[1], result[2]


class Buffer:
    """DeepEP's communication buffer, on torch_ep. See the module's docstring for what differs.

    Attributes: rank, group_size, group (the caller's), num_nvl_bytes, num_rdma_bytes,
    low_latency_mode, explicitly_destroy, runtime (the ProcessGroupEP; None once destroyed),
    ep_group (the "ep" group the calls run on)."""

    num_sms: int = 20
    _num_sms_set: bool = False

    def __init__(self, group: Optional[dist.ProcessGroup], num_nvl_bytes: int = 0, num_rdma_bytes: int = 0,
                 low_latency_mode: bool = False, num_qps_per_rank: int = 24,
                 allow_nvlink_for_low_latency_mode: bool = True, allow_mnnvl: bool = False,
                 explicitly_destroy: bool = False, enable_shrink: bool = False, comm=None) -> None:
        if group is None:
            raise ValueError("comm: torch_ep.deep_ep runs on torch.distributed process groups; pass `group` "
                             "(mpi4py communicators are not supported)" if comm is not None else
                             "group: a torch.distributed process group is required")
        _positive_int("num_nvl_bytes", num_nvl_bytes, 0)
        _positive_int("num_rdma_bytes", num_rdma_bytes, 0)
        if low_latency_mode:
            _positive_int("num_qps_per_rank", num_qps_per_rank)
            if not allow_nvlink_for_low_latency_mode:
                raise ValueError("allow_nvlink_for_low_latency_mode=False: inside a node torch_ep's low-latency ops "
                                 "run over NVLink P2P (or a shared GPU); there is no RDMA-only mode")
        if enable_shrink:
            raise ValueError("enable_shrink=True: torch_ep cannot mask ranks out of a group")
        self.group, self.rank, self.group_size = group, group.rank(), group.size()
        self.num_nvl_bytes, self.num_rdma_bytes = num_nvl_bytes, num_rdma_bytes
        self.low_latency_mode, self.explicitly_destroy, self.enable_shrink = low_latency_mode, explicitly_destroy, False
        self.ep_group = group if dist.get_backend(group) == BACKEND_NAME else _ep_group_over(group)
        self.runtime = get_backend(self.ep_group)
        self._ep_group_name = self.ep_group.group_name  # fixed for the group's life, as ep_group is for ours
        self._num_nodes, self._ranks_per_node = self.runtime.num_nodes, self.runtime.ranks_per_node
        self._comm_streams: dict = {}
        # get_dispatch_layout's routing tables by id(is_token_in_rank), for dispatch(layout=): each entry
        # holds a weak reference to that tensor and goes when it does.
        self._layouts: dict = {}
        self._zero_copy_buffers: dict = {}            # data_ptr -> the combine buffers handed out
        self._cuda_exchange_ready = False             # the prefix matrix's CUDA all_to_all is set up

    # ------------------------------------------------------------------ lifetime and settings

    def destroy(self) -> None:
        """Releases the Buffer; later calls raise. An "ep" group made for it stays for later
        Buffers over the same ranks (released with the default group)."""
        if not self.explicitly_destroy:
            raise RuntimeError("destroy: the Buffer was made without explicitly_destroy=True")
        self.runtime = None
        self._layouts.clear()
        self._zero_copy_buffers.clear()

    def _check_alive(self, op: str) -> None:
        if self.runtime is None:
            raise RuntimeError(f"{op}: this Buffer was destroyed")

    def _require_low_latency(self, op: str) -> None:
        self._check_alive(op)
        if not self.low_latency_mode:
            raise ValueError(f"{op}: low_latency_mode: the Buffer was made with low_latency_mode=False")

    @staticmethod
    def is_sm90_compiled() -> bool:
        return bool(_C.has_cuda)

    @staticmethod
    def set_num_sms(new_num_sms: int) -> None:
        """The SMs the high-throughput kernels of "ep" groups made after this may use."""
        _positive_int("new_num_sms", new_num_sms)
        if new_num_sms % 2:
            raise ValueError(f"new_num_sms must be even, got {new_num_sms}")
        Buffer.num_sms, Buffer._num_sms_set = new_num_sms, True

    @staticmethod
    def capture() -> EventOverlap:
        """An event on the current stream (one already passed where CUDA is not in use)."""
        return EventOverlap(EventHandle())

    @staticmethod
    def get_low_latency_rdma_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int, num_ranks: int,
                                       num_experts: int) -> int:
        """Bytes of symmetric memory torch_ep's low-latency ops take for these sizes on one node
        (a group across nodes takes about twice as much: the regions remote peers push into).
        torch_ep sizes its buffers itself; num_rdma_bytes is not needed."""
        _positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        _positive_int("hidden", hidden)
        _positive_int("num_ranks", num_ranks)
        if _positive_int("num_experts", num_experts) % num_ranks:
            raise ValueError(f"num_experts={num_experts} must be divisible by num_ranks={num_ranks}")
        return int(_C._ll_buffer_bytes(num_ranks, num_experts // num_ranks, num_max_dispatch_tokens_per_rank, hidden,
                                       False))

    @staticmethod
    def get_dispatch_config(num_ranks: int) -> Config:
        _positive_int("num_ranks", num_ranks)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    @staticmethod
    def get_combine_config(num_ranks: int) -> Config:
        _positive_int("num_ranks", num_ranks)
        return Config(Buffer.num_sms, 6, 256, 6, 128)

    def get_comm_stream(self) -> torch.cuda.Stream:
        """The stream this Buffer's calls run on, for the current CUDA device."""
        self._check_alive("get_comm_stream")
        if not torch.cuda.is_available():
            raise RuntimeError("get_comm_stream: CUDA is not available; on CPU tensors the calls run on the "
                               "calling thread and have finished when they return")
        return self._comm_stream(torch.device("cuda", torch.cuda.current_device()))

    def get_local_buffer_tensor(self, dtype: torch.dtype, size: Optional[torch.Size] = None, offset: int = 0,
                                use_rdma_buffer: bool = False) -> torch.Tensor:
        raise NotImplementedError("get_local_buffer_tensor: torch_ep exposes no raw communication buffer")

    def _comm_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._comm_streams.get(device.index)
        if stream is None:
            stream = self._comm_streams[device.index] = torch.cuda.Stream(device)
        return stream

    # ------------------------------------------------------------------ streams

    def _launch(self, like: torch.Tensor, fn: Callable, outputs: Callable, inputs: Sequence, previous_event,
                async_finish: bool, allocate_on_comm_stream: bool, on_comm_stream: bool = True):
        """Runs fn() with DeepEP's stream semantics on the device of `like`; returns (fn's result,
        EventOverlap). outputs(result) lists the tensors it made, asked for only where a side stream
        must record them (the common call builds no such list)."""
        if previous_event is None and not async_finish:
            # The common call, on any device: on the current stream, ordered as DeepEP's comm stream
            # would order it (after the current stream's work, and the current stream waits for it),
            # at the native API's cost: no cross-stream waits, and outputs the allocator reuses in
            # stream order (record_stream would hold them back).
            if allocate_on_comm_stream:
                raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as DeepEP)")
            return fn(), EventOverlap()
        if allocate_on_comm_stream and (previous_event is None or not async_finish):
            raise ValueError("allocate_on_comm_stream=True needs previous_event and async_finish=True (as DeepEP)")
        if previous_event is not None and not isinstance(previous_event, EventOverlap):
            raise TypeError(f"previous_event: expected an EventOverlap, got {type(previous_event).__name__}")
        device = like.device
        if device.type != "cuda":
            if previous_event is not None and previous_event.event is not None:
                previous_event.event._host_wait()
            return fn(), EventOverlap(_done_event()) if async_finish else EventOverlap()
        if not on_comm_stream:
            return fn(), EventOverlap()
        compute = torch.cuda.current_stream(device)
        comm = self._comm_stream(device)
        if previous_event is not None and previous_event.event is not None:
            previous_event.event._stream_wait(comm)
        else:
            comm.wait_stream(compute)
        with torch.cuda.stream(comm):
            result = fn()
        outputs = _tensors(outputs(result))
        if not allocate_on_comm_stream:
            for t in outputs:
                if t.is_cuda:
                    t.record_stream(compute)
        if not async_finish:
            compute.wait_stream(comm)
            return result, EventOverlap()
        inputs = [t for t in _tensors(inputs) if t.is_cuda]
        for t in inputs:
            t.record_stream(comm)
        return result, EventOverlap(EventHandle(comm), tuple(inputs + outputs))

    # ------------------------------------------------------------------ high throughput

    def get_dispatch_layout(self, topk_idx: torch.Tensor, num_experts: int,
                            previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                            allocate_on_comm_stream: bool = False):
        """(num_tokens_per_rank [R] int32, num_tokens_per_rdma_rank [nodes] int32 or None on one node,
        num_tokens_per_expert [E] int32, is_token_in_rank [N, R] bool, EventOverlap)."""
        if self.runtime is None:
            self._check_alive("get_dispatch_layout")
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            (layout, per_node), event = self._layout(topk_idx, num_experts), EventOverlap()  # _launch's common call
        else:
            (layout, per_node), event = self._launch(topk_idx, partial(self._layout, topk_idx, num_experts),
                                                     _layout_tensors, [topk_idx], previous_event, async_finish,
                                                     allocate_on_comm_stream)
        self._remember(layout)
        return layout.num_tokens_per_rank, per_node, layout.num_tokens_per_expert, layout.is_token_in_rank, event

    def _layout(self, topk_idx: torch.Tensor, num_experts: int):
        layout = _layout(topk_idx, num_experts, self.group_size)  # the native get_dispatch_layout on ep_group
        per_node = None
        if self._num_nodes > 1:
            n = layout.is_token_in_rank.shape[0]
            per_node = layout.is_token_in_rank.view(n, self._num_nodes, self._ranks_per_node).any(2).sum(
                0, dtype=torch.int32)
        return layout, per_node

    def _remember(self, layout: DispatchLayout) -> None:
        key, layouts = id(layout.is_token_in_rank), self._layouts
        ref = weakref.ref(layout.is_token_in_rank, lambda _: layouts.pop(key, None))
        # The entry leaves is_token_in_rank out: holding its own key, it would never be dropped.
        layouts[key] = (ref, (layout.meta, layout.header))

    def dispatch(self, x: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]], handle: Optional[Tuple] = None,
                 num_tokens_per_rank: Optional[torch.Tensor] = None,
                 num_tokens_per_rdma_rank: Optional[torch.Tensor] = None,
                 is_token_in_rank: Optional[torch.Tensor] = None, num_tokens_per_expert: Optional[torch.Tensor] = None,
                 topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None,
                 expert_alignment: int = 1, num_worst_tokens: int = 0, config: Optional[Config] = None,
                 previous_event: Optional[EventOverlap] = None, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False):
        """Sends each token to the ranks owning its experts. Returns (recv_x, recv_topk_idx,
        recv_topk_weights, num_recv_tokens_per_expert_list, handle, EventOverlap); with `handle`
        (a cached route) the middle four are None. recv_x is [M, H] (or the fp8 pair), rows by
        source rank then source token order; recv_topk_idx holds local expert ids, -1 elsewhere.
        num_worst_tokens > 0: M = num_worst_tokens and the list is empty (DeepEP's contract)."""
        if self.runtime is None:
            self._check_alive("dispatch")
        if config is not None:
            _check_config(config)
        if type(num_worst_tokens) is not int or num_worst_tokens < 0:  # the common int checked inline
            _positive_int("num_worst_tokens", num_worst_tokens, 0)
        # The payload taken apart once (the native dispatch's _split_payload, inline), and passed
        # on as its two tensors from here. DeepEP's fp8 pair is a tuple: an exact type test finds it
        # first (a failed isinstance(pair, torch.Tensor) looks up the pair's __class__: ~4x a type test).
        if type(x) is tuple and len(x) == 2 and isinstance(x[0], torch.Tensor):
            x_data, x_scales = x
        elif isinstance(x, torch.Tensor):
            x_data, x_scales = x, None
        else:
            x_data, x_scales = _split_payload(x)  # a list or tuple subclass; raises its errors for the rest
            if not isinstance(x_data, torch.Tensor):
                raise TypeError(f"x: expected a tensor or the fp8 pair (x, scales), got {type(x).__name__}")
        if handle is not None:
            native = _native(handle, DispatchHandle)
            if topk_idx is not None or topk_weights is not None:
                raise ValueError("topk_idx/topk_weights: a dispatch with a cached handle sends none (DeepEP's rule)")
            if num_worst_tokens not in (0, native.num_worst_tokens):
                raise ValueError(f"num_worst_tokens={num_worst_tokens}: the handle's dispatch had "
                                 f"{native.num_worst_tokens}; a cached dispatch keeps its route's sizes")
            # The native dispatch(x, handle=native) past its checks of the rest.
            if expert_alignment < 1:
                raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")

            if previous_event is None and not async_finish and not allocate_on_comm_stream:
                # _launch's common call, without the call
                return self._cached(x_data, x_scales, native), None, None, None, None, EventOverlap()
            recv_x, event = self._launch(x_data, partial(self._cached, x_data, x_scales, native), _itself, [x],
                                         previous_event, async_finish, allocate_on_comm_stream)
            return recv_x, None, None, None, None, event

        if num_tokens_per_rank is None or is_token_in_rank is None or num_tokens_per_expert is None:
            missing = [name for name, value in (("num_tokens_per_rank", num_tokens_per_rank),
                                                ("is_token_in_rank", is_token_in_rank),
                                                ("num_tokens_per_expert", num_tokens_per_expert)) if value is None]
            raise ValueError(f"{', '.join(missing)}: dispatch without a handle needs the layout "
                             f"(Buffer.get_dispatch_layout gives it)")
        if topk_idx is None:
            raise ValueError("topk_idx: torch_ep routes tokens by their top-k expert ids; dispatch needs topk_idx "
                             "(is_token_in_rank alone is not supported)")
        num_experts, size, shape = num_tokens_per_expert.numel(), self.group_size, topk_idx.shape
        n = shape[0] if shape else -1
        if num_tokens_per_rank.numel() != size:
            raise ValueError(f"num_tokens_per_rank must have {size} entries (one per rank), got "
                             f"{num_tokens_per_rank.numel()}")
        if is_token_in_rank.shape != (n, size):
            raise ValueError(f"is_token_in_rank must have shape [{n}, {size}] (tokens, ranks), got "
                             f"{list(is_token_in_rank.shape)}")
        # The native dispatch's own checks of what it is given here (the rest hold by the above).
        if expert_alignment < 1:
            raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
        entry = self._layouts.get(id(is_token_in_rank))
        layout_meta, layout_header = entry[1] if entry is not None and entry[0]() is is_token_in_rank else (None, None)

        if not self._cuda_exchange_ready and x_data.is_cuda:  # once per Buffer
            self._ready_cuda_exchange(x_data.device)

        args = (x_data, x_scales, topk_idx, topk_weights, num_experts, num_worst_tokens, expert_alignment,
                is_token_in_rank, num_tokens_per_rank, layout_meta, layout_header)
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            return (*self._route(*args), EventOverlap())  # _launch's common call, without the call
        result, event = self._launch(x_data, partial(self._route, *args), _made_tensors, [x, topk_idx, topk_weights],
                                     previous_event, async_finish, allocate_on_comm_stream)
        return (*result, event)

    # dispatch's work past its checks. Methods, not closures: a closure over a dozen of dispatch's
    # variables costs more to make (~0.5 us) than the call.
    def _route(self, x_data, x_scales, topk_idx, topk_weights, num_experts, num_worst_tokens, expert_alignment,
               is_token_in_rank, num_tokens_per_rank, layout_meta, layout_header):
        # The native dispatch past its checks: no DispatchLayout or DispatchResult to build.
        out, native, _ = _new_route(x_data, x_scales, topk_idx, topk_weights, num_experts, num_worst_tokens,
                                    self._ep_group_name, self.group_size, layout_meta, layout_header)
        host = _HostCounts(native)
        made = self._make_handle(native, host, is_token_in_rank, num_tokens_per_rank)
        per_expert = [] if num_worst_tokens > 0 else host.per_expert(expert_alignment)
        return (out[0] if x_scales is None else (out[0], out[1]), out[2], out[3] if topk_weights is not None else None,
                per_expert, made)

    def _cached(self, x_data, x_scales, native):
        out, _ = _along(x_data, x_scales, native, self._ep_group_name)  # the native dispatch(x, handle=native)
        return out[0] if x_scales is None else (out[0], out[1])

    def _ready_cuda_exchange(self, device: torch.device) -> None:
        """Sets up the CUDA all_to_all that gathers the prefix matrix's counts when they are on the
        device only (under a CUDA-graph capture, the layout has no host copy): once, collectively
        (every rank's first CUDA dispatch), and never inside a capture, where it could not allocate."""
        if self._cuda_exchange_ready or torch.cuda.is_current_stream_capturing():
            return
        probe = torch.zeros(self.group_size, dtype=torch.int64, device=device)
        dist.all_to_all_single(torch.empty_like(probe), probe, group=self.ep_group)
        self._cuda_exchange_ready = True

    def _make_handle(self, native: DispatchHandle, host: "_HostCounts", is_token_in_rank: torch.Tensor,
                     num_tokens_per_rank: torch.Tensor, device: Optional[torch.device] = None) -> _Handle:
        """DeepEP's handle of a dispatch; its tensors go to `device` (default: the dispatch's, as
        native.meta's: the op checks that they agree), worked out only where one is made now."""
        r = self.group_size
        if host.internode:
            def prefix():  # rows received from ranks 0..i; None where only the device knows them
                recv = native.counts[2 + r:2 + 2 * r]
                to = device if device is not None else native.meta.device
                return _to_device(recv.cumsum(0).to(torch.int32), to) if bool((recv >= 0).all()) else None
            return _Handle((is_token_in_rank, None, None, None, None, None, None, None, None, None), native,
                           {6: _Lazy(prefix)})
        matrix = self._rank_prefix_matrix(native, host, num_tokens_per_rank, device)
        if matrix is _PrefixHandle:  # the common case: made when read, by the handle itself
            made = tuple.__new__(_PrefixHandle, (None, None, None, None, is_token_in_rank, None))
            made.native = native  # _Handle.__new__'s work without its frame; _lazy comes when read
            return made
        return _Handle((matrix, None, None, None, is_token_in_rank, None), native)

    def _rank_prefix_matrix(self, native: DispatchHandle, host: "_HostCounts", num_tokens_per_rank: torch.Tensor,
                            device: Optional[torch.device] = None) -> Union[torch.Tensor, type]:
        """[R, R] int32, [i][j] = rows rank j receives from ranks 0..i: every rank's send counts,
        summed down the sources. The handle holds them where the dispatch's records carried them
        (groups of up to 32 ranks, sizes on the host): the matrix is then made when first read
        (returns _PrefixHandle, the handle that does so). Else they are gathered now, on every
        rank (all_to_all_single of the counts to every rank, on torch_ep's own transport: a
        collective cannot wait for a read that some ranks never do)."""
        r = self.group_size
        if r <= MAX_MATRIX_RANKS and host.sizes_on_host:
            return _PrefixHandle
        device = device if device is not None else native.meta.device
        sent = native.send_matrix
        if sent is None:
            send = native.counts[2:2 + r]
            if not bool((send >= 0).all()):
                # A CUDA dispatch with num_worst_tokens: the counts are on the device only; the
                # caller's layout holds them (num_tokens_per_rank; the native handle keeps no routing
                # table when a layout was given). Gather them there, with no host synchronisation.
                send = num_tokens_per_rank.to(torch.int64)
            sent = torch.empty(r * r, dtype=torch.int64, device=send.device)
            dist.all_to_all_single(sent, send.repeat(r), group=self.ep_group)
        return _to_device(sent.view(r, r).cumsum(0).to(torch.int32), device)

    def combine(self, x: torch.Tensor, handle: Tuple, topk_weights: Optional[torch.Tensor] = None,
                bias: Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor], None] = None,
                config: Optional[Config] = None, previous_event: Optional[EventOverlap] = None,
                async_finish: bool = False, allocate_on_comm_stream: bool = False):
        """The reverse of the handle's dispatch: per token, the unweighted sum of the rows sent back
        (plus `bias`: one or two [N, H] tensors). Returns (combined_x [N, H],
        combined_topk_weights [N, K] or None, EventOverlap)."""
        if self.runtime is None:
            self._check_alive("combine")
        if config is not None:
            _check_config(config)
        native = _native(handle, DispatchHandle)
        biases = _unpack_bias(bias, native.num_tokens, x) if bias is not None else ()
        if previous_event is None and not async_finish and not allocate_on_comm_stream:
            return (*self._combine(x, native, topk_weights, biases), EventOverlap())  # _launch's common call
        (out, weights), event = self._launch(x, partial(self._combine, x, native, topk_weights, biases), _itself,
                                             [x, topk_weights, biases], previous_event, async_finish,
                                             allocate_on_comm_stream)
        return out, weights, event

    def _combine(self, x, native, topk_weights, biases):
        (out, weights), _ = _combine_along(x, native, topk_weights, self._ep_group_name)  # the native combine
        if biases:
            total = out.float()
            for b in biases:
                total = total + b.float()
            out = total.to(out.dtype)
        return out, weights if topk_weights is not None else None

    # ------------------------------------------------------------------ low latency

    def clean_low_latency_buffer(self, num_max_dispatch_tokens_per_rank: int, hidden: int, num_experts: int) -> None:
        """Nothing to clean: torch_ep's low-latency buffers never need it. Checks the arguments."""
        self._require_low_latency("clean_low_latency_buffer")
        _positive_int("num_max_dispatch_tokens_per_rank", num_max_dispatch_tokens_per_rank)
        _positive_int("hidden", hidden)
        if _positive_int("num_experts", num_experts) % self.group_size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the group size {self.group_size}")

    def low_latency_dispatch(self, x: torch.Tensor, topk_idx: torch.Tensor, num_max_dispatch_tokens_per_rank: int,
                             num_experts: int, cumulative_local_expert_recv_stats: Optional[torch.Tensor] = None,
                             dispatch_wait_recv_cost_stats: Optional[torch.Tensor] = None, use_fp8: bool = True,
                             round_scale: bool = False, use_ue8m0: bool = False, async_finish: bool = False,
                             return_recv_hook: bool = False):
        """Returns (recv_x, recv_count [E_local] int32, handle, EventOverlap, hook). recv_x:
        [E_local, R*max, H] bf16, or the fp8 pair (scales float32 [E_local, R*max, H/128], or with
        use_ue8m0 packed int32 [E_local, R*max, ceil(H/512)]). Expert e's rows are packed from row
        0 by source rank (handle[1] holds each rank's (begin, count)). With return_recv_hook
        the call only sends; the outputs, the handle's tensors and the stats are valid once the
        hook has run."""
        op = "low_latency_dispatch"
        self._require_low_latency(op)
        if dispatch_wait_recv_cost_stats is not None:
            raise ValueError("dispatch_wait_recv_cost_stats: torch_ep does not time the receive")
        if use_ue8m0 and not (use_fp8 and round_scale):
            raise ValueError("use_ue8m0=True needs use_fp8=True and round_scale=True")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set (as DeepEP)")
        size, local = self.group_size, num_experts // max(self.group_size, 1)
        stats = cumulative_local_expert_recv_stats
        if stats is not None:
            if not isinstance(stats, torch.Tensor) or stats.dtype != torch.int32:
                raise TypeError("cumulative_local_expert_recv_stats must be an int32 tensor")
            if tuple(stats.shape) != (local,) or stats.device != x.device:
                raise ValueError(f"cumulative_local_expert_recv_stats must have shape [{local}] (local experts) on "
                                 f"{x.device}, got {list(stats.shape)} on {stats.device}")
        max_tokens = num_max_dispatch_tokens_per_rank

        def run():
            d = _ll_dispatch(x, topk_idx, max_tokens_per_rank=max_tokens, num_experts=num_experts, use_fp8=use_fp8,
                             round_scale=round_scale, return_recv_hook=return_recv_hook, group=self.ep_group)
            native, k = d.handle, topk_idx.shape[1]
            src_info = torch.empty_like(native.src_info)
            layout_range = torch.empty(native.layout.shape, dtype=torch.int64, device=x.device)
            recv_x, packed = d.recv_x, None
            if use_ue8m0:
                scales = d.recv_x[1]
                width = -(-scales.shape[2] // 4)
                packed = torch.empty(local, width, size * max_tokens, dtype=torch.int32,
                                     device=x.device).transpose(1, 2)
                recv_x = (d.recv_x[0], packed)

            def finish() -> None:
                torch.div(native.src_info, k, rounding_mode="floor", out=src_info)
                counts = native.layout.long()  # packed by source rank: rank r's rows follow ranks < r's
                torch.bitwise_or((counts.cumsum(1) - counts) << 32, counts, out=layout_range)
                if stats is not None:
                    stats.add_(d.recv_count)
                if packed is not None:
                    packed.copy_(_pack_ue8m0(d.recv_x[1]))

            hook = None
            if return_recv_hook:
                def hook() -> None:
                    d.hook()
                    finish()
            else:
                finish()
            made = _Handle((src_info, layout_range, max_tokens, x.shape[1], num_experts), native)
            return recv_x, d.recv_count, made, hook

        (recv_x, count, made, hook), event = self._launch(
            x, run, _ll_dispatch_tensors, [x, topk_idx, stats], None, async_finish, False, on_comm_stream=async_finish)
        return recv_x, count, made, event, hook

    def low_latency_combine(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle: tuple,
                            use_logfmt: bool = False, zero_copy: bool = False, async_finish: bool = False,
                            return_recv_hook: bool = False, out: Optional[torch.Tensor] = None,
                            combine_wait_recv_cost_stats: Optional[torch.Tensor] = None):
        """Sends each expert output row back and sums per token with the weights. Returns
        (combined_x [N, H] bf16, EventOverlap, hook); with return_recv_hook combined_x is valid
        once the hook has run."""
        op = "low_latency_combine"
        self._require_low_latency(op)
        native = _native(handle, LowLatencyHandle)
        if use_logfmt:
            raise ValueError("use_logfmt=True: torch_ep's low-latency combine sends bf16 only")
        if combine_wait_recv_cost_stats is not None:
            raise ValueError("combine_wait_recv_cost_stats: torch_ep does not time the receive")
        if async_finish and return_recv_hook:
            raise ValueError("async_finish and return_recv_hook cannot both be set (as DeepEP)")
        if zero_copy and (not isinstance(x, torch.Tensor) or x.data_ptr() not in self._zero_copy_buffers):
            raise ValueError("zero_copy=True: x must be the tensor get_next_low_latency_combine_buffer returned "
                             "(write the expert outputs into it)")

        def run():
            c = _ll_combine(x, topk_idx, topk_weights, native, return_recv_hook=return_recv_hook, out=out)
            return c.combined_x, c.hook

        (combined, hook), event = self._launch(x, run, _first, [x, topk_idx, topk_weights], None, async_finish, False,
                                               on_comm_stream=async_finish)
        return combined, event, hook

    def get_next_low_latency_combine_buffer(self, handle: object) -> torch.Tensor:
        """The [E_local, R*max, H] bf16 tensor to write expert outputs into for a zero-copy
        low_latency_combine (call it for each combine)."""
        self._require_low_latency("get_next_low_latency_combine_buffer")
        buffer = low_latency_combine_buffer(_native(handle, LowLatencyHandle))
        self._zero_copy_buffers[buffer.data_ptr()] = buffer
        return buffer

    def low_latency_update_mask_buffer(self, rank_to_mask: int, mask: bool = False) -> None:
        raise ValueError("enable_shrink: torch_ep cannot mask ranks (low_latency_update_mask_buffer)")

    def low_latency_query_mask_buffer(self, mask_status: torch.Tensor) -> None:
        raise ValueError("enable_shrink: torch_ep cannot mask ranks (low_latency_query_mask_buffer)")

    def low_latency_clean_mask_buffer(self) -> None:
        raise ValueError("enable_shrink: torch_ep cannot mask ranks (low_latency_clean_mask_buffer)")


# "ep" groups made for Buffers over other groups, by (ranks, SM budget): a later Buffer over the
# same ranks reuses its group. Kept until the default group is destroyed: destroying and making
# again a group of the same ranks with use_local_synchronization would reuse its store prefix.
_ep_groups: dict = {}


def _ep_group_over(group: dist.ProcessGroup) -> dist.ProcessGroup:
    ranks = tuple(dist.get_process_group_ranks(group))
    key = (ranks, Buffer.num_sms if Buffer._num_sms_set else None)
    made = _ep_groups.get(key)
    if made is not None and made in dist.distributed_c10d._world.pg_map:
        return made
    options = Options(num_sms=Buffer.num_sms) if Buffer._num_sms_set else None
    # Over the whole world every rank makes the Buffer: a plain new_group. Over a subgroup only its
    # ranks do (DeepEP's Buffer is made by the group's ranks alone): local synchronisation.
    whole = len(ranks) == dist.get_world_size()
    made = _ep_groups[key] = dist.new_group(list(ranks), backend=BACKEND_NAME, pg_options=options,
                                            use_local_synchronization=not whole)
    return made
