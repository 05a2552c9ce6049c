"""SM budgets and copy variants of CUDA dispatch and combine, measured per GPU model and group: tuning as data.

torch_ep/data/sm_table.json (or the file TORCH_EP_SM_TABLE names) lists entries, each written by
``benchmarks/moe.py --sm-sweep``::

    {"device": "NVIDIA H200", "ranks": 8, "ranks_per_gpu": 1, "copy": "bulk",
     "dispatch": 24, "dispatch_fp8": 16, "combine": 16, "measured": {...the sweep's shape, date and commit...}}

Per kernel (OPS: dispatch of bf16 or any other rows, dispatch of fp8 rows, combine) the fewest SMs
whose bandwidth reached `reach` (95%) of the best the sweep measured. An entry without
"dispatch_fp8" (swept before fp8 had its own budget) gives fp8 dispatch the dispatch budget. An "ep" group
whose Options.num_sms is 0 (automatic) takes the entry of its GPU model
(torch.cuda.get_device_name), size, ranks per GPU and copy variant (Options.moe_copy; an entry
without "copy" is the default "warp"'s); with none, its kernels use every SM.
Options.moe_copy="auto" takes the variant that reaches the bandwidth with the fewest SMs
(choose_copy), among the variants its sweep measured side by side: by dispatch's figures for
every kernel, or for each kernel apart by its own where the table says "per_kernel_copy": true.
With Options.num_sms set it takes the variant that moved the most at that budget (choose_copy_at).
The budgets bound the intranode kernels' grid; groups across nodes keep their own.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Mapping, Optional

from .options import AUTO_MOE_COPY, FALLBACK_MOE_COPY, MOE_COPIES

TABLE_PATH = Path(__file__).resolve().parent / "data" / "sm_table.json"
TABLE_ENV = "TORCH_EP_SM_TABLE"  # a table of one's own sweeps in place of the shipped one
OPS = ("dispatch", "dispatch_fp8", "combine")  # the kernels an entry budgets, as Config's fields name them
REQUIRED_OPS = ("dispatch", "combine")  # an entry without dispatch_fp8 gives fp8 dispatch the dispatch budget
REACH = 0.95  # share of the sweep's best bandwidth that the chosen budget must reach
PER_KERNEL_KEY = "per_kernel_copy"  # the table's switch: "auto" picks a variant per kernel
UNNAMED_ENTRY_COPY = "warp"  # Options.moe_copy of entries that name none (written before variants)


def fewest_sms(gbps_by_sms: Mapping[int, float], reach: float = REACH) -> int:
    """The fewest SMs whose bandwidth reaches `reach` of the best in `gbps_by_sms` ({sms: GB/s})."""
    if not gbps_by_sms:
        raise ValueError("fewest_sms: no measurements")
    best = max(gbps_by_sms.values())
    return min(sms for sms, gbps in gbps_by_sms.items() if gbps >= reach * best)


def derive_entry(gbps: Mapping[str, Mapping[int, float]], *, device: str, ranks: int, ranks_per_gpu: int,
                 reach: float = REACH, measured: Optional[Dict[str, object]] = None,
                 copy: str = UNNAMED_ENTRY_COPY) -> Dict[str, object]:
    """A table entry from a sweep of one copy variant: `gbps` is {op: {sms: GB/s}} for each op of
    REQUIRED_OPS, and of OPS where swept."""
    missing = [op for op in REQUIRED_OPS if not gbps.get(op)]
    if missing:
        raise ValueError(f"derive_entry: the sweep has no {' or '.join(missing)} bandwidth")
    swept = [op for op in OPS if gbps.get(op)]
    entry: Dict[str, object] = {"device": device, "ranks": ranks, "ranks_per_gpu": ranks_per_gpu, "copy": copy}
    entry.update({op: fewest_sms(gbps[op], reach) for op in swept})
    entry["measured"] = {"reach": reach, **(measured or {}),
                         "GBps": {op: {str(s): g for s, g in sorted(gbps[op].items())} for op in swept}}
    return entry


def load(path: Optional[Path] = None) -> Dict[str, object]:
    """The table at `path`, else the file TORCH_EP_SM_TABLE names, else the shipped one."""
    named = os.environ.get(TABLE_ENV)
    if path is None and named and not os.path.isfile(named):
        raise FileNotFoundError(f"{TABLE_ENV}={named!r}: no such file (expected an SM table, as "
                                "torch_ep/data/sm_table.json)")
    source = path or named or TABLE_PATH
    with open(source) as f:
        try:
            table = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"SM table {str(source)!r}{f' ({TABLE_ENV})' if source == named else ''}: not JSON "
                             f"({e})") from None
    if not isinstance(table, dict) or not isinstance(table.get("entries", []), list):
        raise ValueError(f"SM table {str(source)!r}: expected an object with a list of \"entries\", as "
                         "torch_ep/data/sm_table.json")
    return table


def _stand_in(op: str) -> str:
    """The op whose figures stand in where an entry has none of `op`'s."""
    return "dispatch" if op == "dispatch_fp8" else op


def entry_budgets(entry: Mapping[str, object]) -> Dict[str, int]:
    """{op: sms} for every op of OPS."""
    return {op: int(entry[op] if op in entry else entry[_stand_in(op)]) for op in OPS}


def _group(table: Mapping[str, object], device: str, ranks: int, ranks_per_gpu: int) -> list:
    return [e for e in table.get("entries", [])
            if (e.get("device"), e.get("ranks"), e.get("ranks_per_gpu")) == (device, ranks, ranks_per_gpu)]


def lookup(device: str, ranks: int, ranks_per_gpu: int, table: Optional[Mapping[str, object]] = None,
           copy: str = UNNAMED_ENTRY_COPY) -> Optional[Dict[str, int]]:
    """{op: sms} for every op of OPS, from the table's entry for this GPU model, group and copy
    variant, or None. Where the variant has no entry for this setting, warp's entry stands in:
    the other variants reached warp's bandwidth with as many SMs or fewer wherever both were
    swept (benchmarks/RESULTS.md), so its budget bounds theirs rather than every SM."""
    table = load() if table is None else table
    found = {e.get("copy", UNNAMED_ENTRY_COPY): entry_budgets(e) for e in _group(table, device, ranks, ranks_per_gpu)}
    return found.get(copy, found.get("warp"))


def _run(entry: Mapping[str, object]) -> tuple:
    measured = entry.get("measured") or {}
    return measured.get("commit"), measured.get("date")


def _curve(entry: Mapping[str, object], op: str) -> Dict[int, float]:
    gbps = (entry.get("measured") or {}).get("GBps") or {}
    curve = gbps.get(op) or gbps.get(_stand_in(op)) or {}
    return {int(sms): float(g) for sms, g in curve.items()}


def choose_copy(device: str, ranks: int, ranks_per_gpu: int, table: Optional[Mapping[str, object]] = None,
                default: str = FALLBACK_MOE_COPY, reach: float = REACH, op: str = "dispatch") -> str:
    """Options.moe_copy="auto" for kernel `op` (one of OPS): the copy variant that reaches `reach`
    of the best bandwidth any variant reached for it, with the fewest SMs (ties: `default`). Only
    the variants swept in one run with `default`'s entry compete (one commit and date: machines
    differ more than variants do); where the table has no entry of `default` for this GPU model
    and group, `default`. fp8 dispatch goes by dispatch's figures where its run has none of its own."""
    curves = _curves_of_one_run(device, ranks, ranks_per_gpu, table, default, op, "choose_copy")
    if not curves:
        return default
    best = max(max(curve.values()) for curve in curves.values())
    reaching = [(min(sms for sms, g in curve.items() if g >= reach * best), copy != default, copy)
                for copy, curve in curves.items() if max(curve.values()) >= reach * best]
    return min(reaching)[2]


def choose_copy_at(device: str, ranks: int, ranks_per_gpu: int, sms: int, table: Optional[Mapping[str, object]] = None,
                   default: str = FALLBACK_MOE_COPY, op: str = "dispatch") -> str:
    """Options.moe_copy="auto" for kernel `op` with an SM budget set (Options.num_sms): the
    variant whose sweep moved the most with `sms` SMs, or where `sms` was not swept with the most
    SMs below it that were (ties, and a budget below every swept one: `default`). The same
    competitors as choose_copy's. At 8 ranks on an H100, 8 SMs: warp's bf16 dispatch moved 229
    GB/s where unroll's, the fallback, moved 186 (3d86ee6's sweep)."""
    curves = _curves_of_one_run(device, ranks, ranks_per_gpu, table, default, op, "choose_copy_at")
    at = {copy: curve[max(b for b in curve if b <= sms)] for copy, curve in curves.items() if min(curve) <= sms}
    if default not in at:  # the fallback unmeasured here: nothing to compare it with
        return default
    return max(at, key=lambda copy: (at[copy], copy == default))


def _curves_of_one_run(device: str, ranks: int, ranks_per_gpu: int, table: Optional[Mapping[str, object]],
                       default: str, op: str, caller: str) -> Dict[str, Dict[int, float]]:
    """{copy: {sms: GB/s}} of kernel `op` for the variants swept in one run with `default`'s entry
    for this group (one commit and date: machines differ more than variants do); empty where the
    table has no entry of `default` for it."""
    if op not in OPS:
        raise ValueError(f"{caller}: op={op!r}, expected one of {', '.join(OPS)}")
    table = load() if table is None else table
    group = _group(table, device, ranks, ranks_per_gpu)
    base = next((e for e in group if e.get("copy", UNNAMED_ENTRY_COPY) == default), None)
    if base is None:
        return {}
    curves = {e.get("copy", UNNAMED_ENTRY_COPY): _curve(e, op) for e in group if _run(e) == _run(base)}
    return {copy: curve for copy, curve in curves.items() if curve}


def settings(config) -> Dict[str, tuple]:
    """{op: (copy variant, measured SM budget or 0)} of a group's Config, for each op of OPS: what
    apply resolved."""
    return {op: (MOE_COPIES[getattr(config, f"moe_copy_{op}")], getattr(config, f"auto_sms_{op}")) for op in OPS}


def apply(config, options_num_sms: int, device: str, ranks: int, ranks_per_gpu: int,
          table: Optional[Mapping[str, object]] = None, copy: str = UNNAMED_ENTRY_COPY) -> None:
    """Sets config.moe_copy_<op> and, where Options.num_sms is 0, config.auto_sms_<op> for each op
    of OPS from the table; an explicit num_sms (Options or TORCH_EP_NUM_SMS) overrides the table
    and leaves the budgets at 0. A copy of "auto" takes choose_copy's pick (with num_sms,
    choose_copy_at's at that budget), per op where the table says PER_KERNEL_KEY, else dispatch's
    for every op. Any other copy variant serves every op."""
    explicit = options_num_sms > 0
    if table is None and (copy == AUTO_MOE_COPY or not explicit):
        table = load()  # read once for the choices and the budgets
    if copy != AUTO_MOE_COPY:
        copies = dict.fromkeys(OPS, copy)
    else:
        def pick(op):
            if explicit:
                return choose_copy_at(device, ranks, ranks_per_gpu, options_num_sms, table, op=op)
            return choose_copy(device, ranks, ranks_per_gpu, table, op=op)
        copies = {op: pick(op) for op in OPS} if table.get(PER_KERNEL_KEY) else dict.fromkeys(OPS, pick("dispatch"))
    for op in OPS:
        setattr(config, f"moe_copy_{op}", MOE_COPIES.index(copies[op]))
    if explicit:
        return
    for op in OPS:
        budgets = lookup(device, ranks, ranks_per_gpu, table, copies[op])
        if budgets:
            setattr(config, f"auto_sms_{op}", budgets[op])
