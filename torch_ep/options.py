"""torch_ep.Options: the settings of an "ep" group, passed as ``pg_options``.

Every field can also come from the environment (for torchrun users); the variables are read
here and nowhere else, when an Options is built.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Optional

from . import _C

# Every TORCH_EP_* variable the library reads, with what it sets.
ENVIRONMENT = {
    "TORCH_EP_TIMEOUT_S": "timeout: seconds any wait may take before the op raises (default: init_process_group's timeout)",
    "TORCH_EP_HOST_TRANSPORT": "0 sends CPU all_to_all through Gloo instead of shared memory",
    "TORCH_EP_HOST_SLOT_BYTES": "shared-memory chunk size in bytes (default 256 KiB)",
    "TORCH_EP_HOST_NUM_SLOTS": "shared-memory chunks in flight per pair of ranks (default 8)",
    "TORCH_EP_HOST_ONE_COPY": "0 keeps large CPU messages in the shared-memory ring instead of one process_vm_readv copy",
    "TORCH_EP_CUDA_BUFFER_BYTES": "registered CUDA receive buffer per rank in bytes (default 64 MiB)",
    "TORCH_EP_COMM_POOL_BYTES": "torch_ep.comm_pool's arena per rank in bytes (default 1 GiB), reserved on the GPU by "
                                "the first comm_pool call on a group; tensors of the pool must fit in it",
    "TORCH_EP_NUM_SMS": "blocks (SMs) a communication kernel may use (default 0, automatic: CUDA dispatch/combine take "
                        "torch_ep/data/sm_table.json's budget for the GPU and group, else every SM; all_to_all's "
                        "direct kernel a block a slice of a message, at most 512)",
    "TORCH_EP_MOE_COPY": "how intranode CUDA dispatch/combine move rows: auto (default: the variant "
                         "torch_ep/data/sm_table.json says reaches the best bandwidth with the fewest SMs on this GPU "
                         "and group, per kernel where its per_kernel_copy is true; with num_sms set, the variant it "
                         "says moves the most at that budget; unroll where it has no say), unroll (a warp per row, a row's "
                         "loads issued together and the next row's lookups a row ahead, about one round trip to "
                         "memory per row), warp (a warp per row, 16-byte loads, one lookup after another) or bulk "
                         "(Hopper bulk async copies through a shared-memory ring: many bytes in flight per SM, for "
                         "few SMs)",
    "TORCH_EP_SM_TABLE": "path of an SM table in place of torch_ep/data/sm_table.json: the budgets and copy variants "
                         "of one's own sweeps (benchmarks/moe.py --sm-sweep; torch_ep/sm_table.py)",
    "TORCH_EP_RELEASE_PEER_MAPPINGS": "0 keeps each rank's mappings of the peers' tensors (CUDA dispatch/combine's "
                                      "inputs, all_to_all_single's outputs) until the group is destroyed, and with them "
                                      "the peers' freed memory; default 1 closes them once their owner's caching "
                                      "allocator frees their segments (torch.cuda.empty_cache()), so that the device "
                                      "gets that memory back",
    "TORCH_EP_MOE_PUSH": "1 makes intranode CUDA dispatch push: each rank writes its own rows straight into the "
                         "receivers' outputs, which dispatch then allocates from a MoE pool every rank maps "
                         "(TORCH_EP_MOE_POOL_BYTES); no input is exported per call. Opt-in until measured; the default "
                         "(0) pulls, each rank reading its peers' inputs. The CPU path ignores it",
    "TORCH_EP_MOE_POOL_BYTES": "the MoE pool's arena per rank in bytes (default 1 GiB), reserved on the GPU at the "
                               "group's first CUDA dispatch with TORCH_EP_MOE_PUSH=1; every live dispatch output must "
                               "fit in it",
    "TORCH_EP_MOE_DEVICE_RECORDS": "1 (with TORCH_EP_MOE_PUSH=1, on every rank alike) makes every eager pushing "
                                   "dispatch and every eager combine exchange its records "
                                   "through the device, not the host: no host rendezvous (a combine's x outside the "
                                   "MoE pool is copied into it first; torch_ep.combine_buffer avoids that); what the "
                                   "device finds wrong raises at the rank's next "
                                   "dispatch/combine or torch_ep.check_errors() (a dispatch without a handle or "
                                   "num_worst_tokens waits for its sizes, and raises then). Every rank must give a "
                                   "handle, or num_worst_tokens, in the same calls, else every rank raises",
    "TORCH_EP_OUTPUTS_TOGETHER": "0 gives each small output of a CUDA dispatch (fp8 scales, top-k ids, top-k weights) "
                                 "an allocation of its own (default 1: the three in one allocation beside recv_x's, "
                                 "each a tensor of its own; read at the first dispatch)",
    "TORCH_EP_MOE_ONE_LAUNCH": "1 (with TORCH_EP_MOE_DEVICE_RECORDS=1) runs a pushing dispatch's notify step as block 0 "
                               "of its push kernel: one launch instead of two (opt-in until measured; combine, and the "
                               "first round of a dispatch that waits for its sizes, keep their own notify launch)",
    "TORCH_EP_RANKS_PER_NODE": "override of ranks per node, to emulate several nodes on one",
    "TORCH_EP_BLOCKING_WAIT": "1 makes CUDA Work.wait() block the CPU and raise on errors, as TORCH_NCCL_BLOCKING_WAIT",
    "TORCH_EP_ALL_TO_ALL_V_DEVICE": "0 makes CUDA all_to_all_v read its splits on the host (one wait, not capturable) "
                                    "instead of keeping them on the device",
    "TORCH_EP_ALL_TO_ALL_DEVICE": "1 runs CUDA all_to_all_single on the device protocol (counts checked by the kernels, "
                                  "no host round trip; staged, two copies per byte)",
    "TORCH_EP_ALL_TO_ALL_LANES": "the device protocol's staged move (CUDA all_to_all_v, all_to_all_single with "
                                 "TORCH_EP_ALL_TO_ALL_DEVICE=1): pipelines per pair of ranks, 1 to 32 (default 0, "
                                 "automatic: 32 at 2 ranks, 8 at 4, 4 at 8; two blocks each); the smallest over the ranks",
    "TORCH_EP_ALL_TO_ALL_SLOT_BYTES": "the device protocol's staged move: a staging slot in bytes, the largest chunk, "
                                      "a multiple of 4 KiB (default 0, automatic: 128 KiB, less where "
                                      "TORCH_EP_CUDA_BUFFER_BYTES / (2 x ranks x lanes) is less); the smallest over the ranks",
    "TORCH_EP_ALL_TO_ALL_POOL_BLOCKS": "the device protocol's one-copy move (tensors of torch_ep.comm_pool): the "
                                       "blocks that copy, one piece of the call each (default 0, automatic: two per SM "
                                       "of this rank's share (TORCH_EP_NUM_SMS, or the SMs its context has, which "
                                       "under MPS is the client's share), less one for the plan's block, and more "
                                       "for large calls, so that no piece passes 128 KiB; a value set is the most a "
                                       "call takes)",
    "TORCH_EP_ALL_TO_ALL_KERNEL_BYTES": "CUDA all_to_all_single on the host protocol: a rank whose largest message "
                                        "to a peer has at most this many bytes sends all of them with one kernel "
                                        "(SM copies, every peer at once); larger ones go by the copy engines, one peer "
                                        "after another (default 8 MiB; 0: the copy engines for every rank that sends); each rank decides "
                                        "for itself",
    "TORCH_EP_DIRECT_GPU_SCOPE": "0 keeps the flags and fences of CUDA all_to_all_single's one kernel (the host "
                                 "protocol's direct kernel) at system scope also where every peer's buffer lies on "
                                 "this GPU (default 1: GPU scope there, as for ranks sharing a GPU under MPS; "
                                 "system scope where a peer is another GPU)",
    "TORCH_EP_DEVICE_GPU_SCOPE": "0 keeps the device protocol's flags and fences (all_to_all_v, the comm pool, "
                                 "Options.all_to_all_device) at system scope also where every peer's block lies on "
                                 "this GPU (default 1: GPU scope there; system scope where a peer is another GPU)",
    "TORCH_EP_EARLY_LAUNCH": "0 launches CUDA all_to_all's kernels in plain stream order (default 1: each is "
                             "launched as a programmatic dependent launch, scheduled while the kernel before it "
                             "ends and waiting for it on the device, so that no launch latency lies between them)",
    "TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES": "the device protocol's one-copy move with its pieces taken in turn "
                                            "(TORCH_EP_POOL_PIECES): a piece in bytes, a multiple of 64 KiB up to "
                                            "16 MiB (default 0, automatic: 64 KiB, one pass of a block's loads); "
                                            "each rank its own",
    "TORCH_EP_POOL_TICKET_AHEAD": "1 makes each block of the one-copy move with pieces taken in turn take its next "
                                  "piece from the counter while it copies the current one, so that the atomic's "
                                  "round trip overlaps the copy (default 0: after it; opt-in until measured)",
    "TORCH_EP_POOL_SELF_FIRST": "1 lets all_to_all_single's one-copy move (tensors of the comm pool, pieces taken in "
                                "turn) copy each rank's rows to itself (1 MiB or more) while the plan meets the "
                                "peers, so that the copy covers the meeting; a call refused for disagreeing splits may then have written "
                                "the rank's own rows (default 0; opt-in until measured)",
    "TORCH_EP_POOL_PIECES": "0 gives each block of the device protocol's one-copy move (tensors of the comm pool) "
                            "one fixed piece of the call (default 1: the blocks that fit at once take 64 KiB pieces "
                            "in turn from a counter until none is left)",
    "TORCH_EP_ALL_TO_ALL_ONE_LAUNCH": "1 runs the device protocol's plan and move in one kernel launch instead of two (measured slower on one H200)",
    "TORCH_EP_ALL_TO_ALL_EAGER_BYTES": "the device protocol's eager path for small CUDA all_to_all_single calls: a "
                                       "message of at most this many bytes (a multiple of 16, up to 1 MiB; default 0, "
                                       "off) rides with the plan's record, and a call whose messages all fit is one "
                                       "launch with no staging; grows each rank's registered block by ranks x this; "
                                       "the smallest over the ranks",
    "TORCH_EP_FORCE_REMOTE": "1 makes the low-latency ops reach ranks on other (virtual) nodes by NVSHMEM puts, as "
                             "across real nodes, even where NVLink could map them (tests that path on one machine)",
    "TORCH_EP_INTERNODE_DEVICE": "0 sends CUDA dispatch/combine across nodes on the host-driven route (host rounds) "
                                 "instead of the device-driven one (NVSHMEM device API, one host wait; the default)",
    "TORCH_EP_INTERNODE_NODE_P2P": "0 makes the device-driven dispatch/combine across nodes use NVSHMEM puts and gets "
                                   "inside a node too, instead of stores and loads through the mapped peer buffers "
                                   "(NVLink P2P; the default where NVSHMEM maps the peer)",
    "TORCH_EP_INTERNODE_A2A_DEVICE": "0 moves CUDA all_to_all's NVSHMEM hop across nodes in rounds the host queues "
                                     "instead of one launch (a block per peer and slot; the default)",
    "TORCH_EP_INTERNODE_CAPACITY": "device route across nodes: the most tokens a rank dispatches per call (default "
                                   "4096); sizes its NVSHMEM buffer, see docs/internode.md",
    "TORCH_EP_INTERNODE_ROW_BYTES": "device route across nodes: the least row stride in bytes its buffer is sized for "
                                    "(default: the first call's rows, at least 16.5 KiB)",
    "TORCH_EP_INTERNODE_COMBINE_ROWS": "device route across nodes: rows (of that stride) of torch_ep.combine_buffer's "
                                       "zero-copy region per rank (default 0: ranks x capacity, every row a rank can "
                                       "receive; 264 MiB at 2x2 and the defaults); a combine_buffer that does not fit "
                                       "is a plain tensor",
    "TORCH_EP_DIRECT_CALL": "0 makes eager dispatch and combine on plain tensors call the torch ops through the "
                            "dispatcher instead of their functions directly (default 1: a few microseconds of host "
                            "time a call less; subclasses, modes, autograd, compile and the jit tracer take the ops)",
    "TORCH_EP_PRELOAD_KERNELS": "0 stops a group's CUDA transport and the low-latency buffer from loading every kernel "
                                "of torch_ep when they are set up (default 1: under CUDA's lazy loading no first launch "
                                "then waits for the device behind a kernel spinning on a lost peer)",
    "TORCH_EP_LL_REMOTE_PUTS": "how the low-latency dispatch puts its tokens to ranks on other nodes: unset picks block "
                               "where NVSHMEM reaches every remote peer by P2P and token where a NIC does; token, "
                               "fenced, grouped, batched or batchedN (N in 1..64), block",
    "TORCH_EP_LL_TRACE": "1 makes the low-latency kernels write their phase timestamps (tools/ll_profile.py)",
}


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected an integer") from None


def _env_timeout() -> Optional[timedelta]:
    value = os.environ.get("TORCH_EP_TIMEOUT_S")
    if not value:
        return None
    try:
        return timedelta(seconds=float(value))
    except ValueError:
        raise ValueError(f"TORCH_EP_TIMEOUT_S={value!r}: expected seconds") from None


MOE_COPIES = ("warp", "unroll", "bulk")  # Options.moe_copy's values, in the order of kernels::MoeCopy
# The default, "auto": the variant torch_ep/data/sm_table.json says reaches the best bandwidth with the
# fewest SMs on this GPU model and group (sm_table.choose_copy; per kernel where the table's
# per_kernel_copy is true, as shipped), picked when the group is made. On an H100 at 2 ranks that is
# warp at 48 SMs for bf16 dispatch (779 GB/s against unroll's 732 at 24, b9d993c's sweep) and unroll
# at 24 for fp8 dispatch and combine (benchmarks/RESULTS.md).
AUTO_MOE_COPY = "auto"
# With Options.num_sms set, "auto" takes the variant the table's sweep measured moving the most at that
# budget (sm_table.choose_copy_at). Where the table has no say (no entry of this variant for the GPU
# and group, or no budget swept at or below num_sms): unroll, which led warp at every SM
# budget of the 2026-12-04 sweep on the H200 (2 ranks; 4 SMs: 167 / 131 / 278 GB/s against 148 / 100 /
# 174 for dispatch bf16 / fp8 / combine).
FALLBACK_MOE_COPY = "unroll"


def _default(name: str, fallback):
    return lambda: (lambda v: fallback if v is None else v)(_env_int(name))


@dataclass
class Options:
    """Settings of an "ep" process group.

    Pass as ``dist.init_process_group(backend="ep", pg_options=torch_ep.Options(...))`` or
    ``dist.new_group(..., pg_options=...)``. Fields left at their defaults take the matching
    ``TORCH_EP_*`` environment variable when it is set (see ``torch_ep.options.ENVIRONMENT``).
    """

    timeout: Optional[timedelta] = field(default_factory=_env_timeout)
    host_transport: bool = field(default_factory=lambda: _env_int("TORCH_EP_HOST_TRANSPORT") != 0)
    host_slot_bytes: int = field(default_factory=_default("TORCH_EP_HOST_SLOT_BYTES", 256 << 10))
    host_num_slots: int = field(default_factory=_default("TORCH_EP_HOST_NUM_SLOTS", 8))
    host_one_copy: bool = field(default_factory=lambda: _env_int("TORCH_EP_HOST_ONE_COPY") != 0)
    cuda_buffer_bytes: int = field(default_factory=_default("TORCH_EP_CUDA_BUFFER_BYTES", 64 << 20))
    comm_pool_bytes: int = field(default_factory=_default("TORCH_EP_COMM_POOL_BYTES", 1 << 30))
    num_sms: int = field(default_factory=_default("TORCH_EP_NUM_SMS", 0))
    ranks_per_node: int = field(default_factory=_default("TORCH_EP_RANKS_PER_NODE", 0))
    moe_copy: str = field(default_factory=lambda: os.environ.get("TORCH_EP_MOE_COPY") or AUTO_MOE_COPY)
    blocking_wait: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_BLOCKING_WAIT")))
    all_to_all_lanes: int = field(default_factory=_default("TORCH_EP_ALL_TO_ALL_LANES", 0))
    all_to_all_slot_bytes: int = field(default_factory=_default("TORCH_EP_ALL_TO_ALL_SLOT_BYTES", 0))
    all_to_all_pool_blocks: int = field(default_factory=_default("TORCH_EP_ALL_TO_ALL_POOL_BLOCKS", 0))
    all_to_all_kernel_bytes: int = field(default_factory=_default("TORCH_EP_ALL_TO_ALL_KERNEL_BYTES", 8 << 20))
    all_to_all_one_launch: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_ALL_TO_ALL_ONE_LAUNCH")))
    all_to_all_eager_bytes: int = field(default_factory=_default("TORCH_EP_ALL_TO_ALL_EAGER_BYTES", 0))
    force_remote: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_FORCE_REMOTE")))
    all_to_all_v_device: bool = field(default_factory=lambda: _env_int("TORCH_EP_ALL_TO_ALL_V_DEVICE") != 0)
    all_to_all_device: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_ALL_TO_ALL_DEVICE")))
    internode_device: bool = field(default_factory=lambda: _env_int("TORCH_EP_INTERNODE_DEVICE") != 0)
    internode_a2a_device: bool = field(default_factory=lambda: _env_int("TORCH_EP_INTERNODE_A2A_DEVICE") != 0)
    internode_node_p2p: bool = field(default_factory=lambda: _env_int("TORCH_EP_INTERNODE_NODE_P2P") != 0)
    internode_capacity: int = field(default_factory=_default("TORCH_EP_INTERNODE_CAPACITY", 4096))
    internode_row_bytes: int = field(default_factory=_default("TORCH_EP_INTERNODE_ROW_BYTES", 0))
    internode_combine_rows: int = field(default_factory=_default("TORCH_EP_INTERNODE_COMBINE_ROWS", 0))
    # Newer fields last, so that no earlier field changes position (Options is a positional dataclass).
    moe_push: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_MOE_PUSH")))
    moe_pool_bytes: int = field(default_factory=_default("TORCH_EP_MOE_POOL_BYTES", 1 << 30))
    moe_device_records: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_MOE_DEVICE_RECORDS")))
    moe_one_launch: bool = field(default_factory=lambda: bool(_env_int("TORCH_EP_MOE_ONE_LAUNCH")))
    all_to_all_pool_piece_bytes: int = field(default_factory=_default("TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES", 0))

    def __post_init__(self) -> None:
        checks = {
            "host_slot_bytes": self.host_slot_bytes >= 64,
            "host_num_slots": self.host_num_slots >= 1,
            "cuda_buffer_bytes": self.cuda_buffer_bytes >= 1 << 16,
            "comm_pool_bytes": self.comm_pool_bytes >= 2 << 20,
            "moe_pool_bytes": self.moe_pool_bytes >= 2 << 20,
            "num_sms": self.num_sms >= 0,
            "ranks_per_node": self.ranks_per_node >= 0,
            "internode_capacity": self.internode_capacity >= 1,
            "internode_row_bytes": self.internode_row_bytes >= 0,
            "internode_combine_rows": self.internode_combine_rows >= 0,
            "all_to_all_lanes": 0 <= self.all_to_all_lanes <= 32,
            "all_to_all_slot_bytes": self.all_to_all_slot_bytes == 0 or (self.all_to_all_slot_bytes >= 4096 and
                                                                        self.all_to_all_slot_bytes % 4096 == 0),
            "all_to_all_pool_blocks": self.all_to_all_pool_blocks >= 0,
            "all_to_all_kernel_bytes": self.all_to_all_kernel_bytes >= 0,
            "all_to_all_eager_bytes": 0 <= self.all_to_all_eager_bytes <= 1 << 20 and self.all_to_all_eager_bytes % 16 == 0,
            "all_to_all_pool_piece_bytes": 0 <= self.all_to_all_pool_piece_bytes <= 16 << 20
                                           and self.all_to_all_pool_piece_bytes % (64 << 10) == 0,
        }
        minimum = {"host_slot_bytes": 64, "host_num_slots": 1, "cuda_buffer_bytes": 1 << 16, "comm_pool_bytes": 2 << 20,
                   "moe_pool_bytes": 2 << 20, "internode_capacity": 1}
        expected = {"all_to_all_lanes": "0 (automatic) to 32",
                    "all_to_all_slot_bytes": "0 (automatic) or a multiple of 4096",
                    "all_to_all_eager_bytes": "0 (off) or a multiple of 16 up to 1048576",
                    "all_to_all_pool_piece_bytes": "0 (automatic) or a multiple of 65536 up to 16777216"}
        for name, ok in checks.items():
            if not ok:
                raise ValueError(f"Options.{name}={getattr(self, name)}: expected "
                                 f"{expected.get(name, f'>= {minimum.get(name, 0)}')}")
        if self.moe_copy not in (*MOE_COPIES, AUTO_MOE_COPY):
            raise ValueError(f"Options.moe_copy={self.moe_copy!r} (TORCH_EP_MOE_COPY): expected one of "
                             f"{', '.join(MOE_COPIES)} or {AUTO_MOE_COPY}")
        if self.moe_device_records and not self.moe_push:
            raise ValueError("Options.moe_device_records (TORCH_EP_MOE_DEVICE_RECORDS) needs Options.moe_push "
                             "(TORCH_EP_MOE_PUSH=1): only a pushing dispatch exchanges its records through the device")
        if self.moe_one_launch and not self.moe_device_records:
            raise ValueError("Options.moe_one_launch (TORCH_EP_MOE_ONE_LAUNCH) needs Options.moe_device_records "
                             "(TORCH_EP_MOE_DEVICE_RECORDS=1): it fuses their notify step into the push kernel")
        if self.timeout is not None and self.timeout.total_seconds() <= 0:
            raise ValueError(f"Options.timeout={self.timeout}: expected a positive duration")

    def _to_config(self, default_timeout: timedelta) -> "_C.Config":
        config = _C.Config()
        config.timeout = self.timeout or default_timeout
        config.host_transport = self.host_transport
        config.host_slot_bytes = self.host_slot_bytes
        config.host_num_slots = self.host_num_slots
        config.host_one_copy = self.host_one_copy
        config.cuda_buffer_bytes = self.cuda_buffer_bytes
        config.comm_pool_bytes = self.comm_pool_bytes
        config.num_sms = self.num_sms
        config.ranks_per_node = self.ranks_per_node
        copy = MOE_COPIES.index(FALLBACK_MOE_COPY if self.moe_copy == AUTO_MOE_COPY else self.moe_copy)
        config.moe_copy_dispatch = config.moe_copy_dispatch_fp8 = config.moe_copy_combine = copy  # until the group picks
        config.moe_push = self.moe_push
        config.moe_pool_bytes = self.moe_pool_bytes
        config.moe_device_records = self.moe_device_records
        config.moe_one_launch = self.moe_one_launch
        config.blocking_wait = self.blocking_wait
        config.all_to_all_lanes = self.all_to_all_lanes
        config.all_to_all_slot_bytes = self.all_to_all_slot_bytes
        config.all_to_all_pool_blocks = self.all_to_all_pool_blocks
        config.all_to_all_kernel_bytes = self.all_to_all_kernel_bytes
        config.all_to_all_one_launch = self.all_to_all_one_launch
        config.all_to_all_eager_bytes = self.all_to_all_eager_bytes
        config.all_to_all_pool_piece_bytes = self.all_to_all_pool_piece_bytes
        config.force_remote = self.force_remote
        config.all_to_all_v_device = self.all_to_all_v_device
        config.all_to_all_device = self.all_to_all_device
        config.internode_device = self.internode_device
        config.internode_a2a_device = self.internode_a2a_device
        config.internode_node_p2p = self.internode_node_p2p
        config.internode_capacity = self.internode_capacity
        config.internode_row_bytes = self.internode_row_bytes
        config.internode_combine_rows = self.internode_combine_rows
        return config
