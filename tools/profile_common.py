"""Set-up shared by tools/moe_profile.py and tools/ll_profile.py: the shape options, the process
group with this rank's GPU current, and the inputs each rank draws."""
import argparse
import os

import torch
import torch.distributed as dist

import torch_ep  # noqa: F401  registers the "ep" backend


def shape_parser(tokens: int) -> argparse.ArgumentParser:
    """--tokens, --hidden, --experts and --top-k; the tools profile different token counts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    return parser


def init_on_local_gpu() -> int:
    """Joins the "ep" process group (torchrun's environment), makes this rank's GPU current and
    returns the rank."""
    dist.init_process_group("ep")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return dist.get_rank()


def make_inputs(args, rank: int):
    """x [tokens, hidden] bf16, topk_idx (the top-k of random scores) and topk_weights, on the
    GPU, drawn from a generator seeded with the rank."""
    g = torch.Generator(device="cuda").manual_seed(rank)
    idx = torch.rand(args.tokens, args.experts, device="cuda", generator=g).topk(args.top_k, dim=1).indices
    w = torch.rand(args.tokens, args.top_k, device="cuda", generator=g)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).bfloat16()
    return x, idx, w
