"""The host phases' own clock (backend/common/phase_clock.hpp), which tools/moe_profile.py and
tools/a2a_profile.py read: host time per phase without torch.profiler. On CPU ranks the MoE ops'
argument checks are such phases."""
import os
import sys

import torch
import torch.distributed as dist

import torch_ep
from conftest import rank_pool

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))


def rank_phase_clock(seed):
    from profile_common import phase_clock_line

    C = torch_ep._C
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + rank)
    num_experts = 2 * size
    x = torch.randn(int(torch.randint(1, 9, (), generator=g)), 16, generator=g)
    idx = torch.randint(0, num_experts, (x.shape[0], 2), generator=g)
    C._take_phase_times()
    d = torch_ep.dispatch(x, idx, num_experts=num_experts)
    assert C._take_phase_times() == [], "the clock is off by default"
    C._phase_clock(True)
    try:
        for _ in range(3):
            d = torch_ep.dispatch(x, idx, num_experts=num_experts)
        for _ in range(2):
            torch_ep.combine(d.recv_x, d.handle)
        try:  # refused in the checks phase: the phase still ends, once
            torch.ops.ep.dispatch(x, None, idx, None, None, None, num_experts, -1, dist.group.WORLD.group_name)
            raise AssertionError("num_worst_tokens=-1 was accepted")
        except ValueError as e:
            assert "num_worst_tokens" in str(e)
    finally:
        C._phase_clock(False)
    times = {name: (calls, ns) for name, calls, ns in C._take_phase_times()}
    assert times["ep::dispatch/checks"][0] == 4, times
    assert times["ep::combine/checks"][0] == 2, times
    assert all(ns > 0 for _, ns in times.values()), times
    assert C._take_phase_times() == [], "a take clears"
    torch_ep.dispatch(x, idx, num_experts=num_experts)
    assert C._take_phase_times() == [], "off again"
    line = phase_clock_line(lambda: torch_ep.dispatch(x, idx, num_experts=num_experts), 3)
    assert line.startswith("total ") and "ep::dispatch/checks" in line and "outside the phases" in line, line


def test_phase_clock():
    rank_pool(2).run(rank_phase_clock, int(torch.randint(0, 2**30, ()).item()))
