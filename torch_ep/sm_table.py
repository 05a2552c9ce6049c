"""SM budgets of CUDA dispatch and combine, measured per GPU model and group: tuning as data.

torch_ep/data/sm_table.json lists entries, each written by ``benchmarks/moe.py --sm-sweep``::

    {"device": "NVIDIA H200", "ranks": 8, "ranks_per_gpu": 1, "copy": "bulk",
     "dispatch": 24, "combine": 16, "measured": {...the sweep's shape, date and commit...}}

`dispatch` and `combine` are the fewest SMs whose bandwidth reached `reach` (95%) of the best the
sweep measured. An "ep" group whose Options.num_sms is 0 (automatic) takes the entry of its GPU
model (torch.cuda.get_device_name), size, ranks per GPU and copy variant (Options.moe_copy; an
entry without "copy" is the default "warp"'s); with none, its kernels use every SM.
Options.moe_copy="auto" takes the variant that reaches the bandwidth with the fewest SMs
(choose_copy), among the variants its sweep measured side by side.
The budgets bound the intranode kernels' grid; groups across nodes keep their own.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Mapping, Optional

from .options import AUTO_MOE_COPY, FALLBACK_MOE_COPY, MOE_COPIES

TABLE_PATH = Path(__file__).resolve().parent / "data" / "sm_table.json"
OPS = ("dispatch", "combine")
REACH = 0.95  # share of the sweep's best bandwidth that the chosen budget must reach
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
    """A table entry from a sweep of one copy variant: `gbps` is {op: {sms: GB/s}} for each op of OPS."""
    missing = [op for op in OPS if not gbps.get(op)]
    if missing:
        raise ValueError(f"derive_entry: the sweep has no {' or '.join(missing)} bandwidth")
    entry: Dict[str, object] = {"device": device, "ranks": ranks, "ranks_per_gpu": ranks_per_gpu, "copy": copy}
    entry.update({op: fewest_sms(gbps[op], reach) for op in OPS})
    entry["measured"] = {"reach": reach, **(measured or {}),
                         "GBps": {op: {str(s): g for s, g in sorted(gbps[op].items())} for op in OPS}}
    return entry


def load(path: Optional[Path] = None) -> Dict[str, object]:
    with open(path or TABLE_PATH) as f:
        return json.load(f)


def lookup(device: str, ranks: int, ranks_per_gpu: int, table: Optional[Mapping[str, object]] = None,
           copy: str = UNNAMED_ENTRY_COPY) -> Optional[Dict[str, int]]:
    """{"dispatch": sms, "combine": sms} of the table's entry for this GPU model, group and copy
    variant, or None. Where the variant has no entry for this setting, warp's entry stands in:
    the other variants reached warp's bandwidth with as many SMs or fewer wherever both were
    swept (benchmarks/RESULTS.md), so its budget bounds theirs rather than every SM."""
    table = load() if table is None else table
    found = {}
    for entry in table.get("entries", []):
        if (entry.get("device"), entry.get("ranks"), entry.get("ranks_per_gpu")) == (device, ranks, ranks_per_gpu):
            found[entry.get("copy", UNNAMED_ENTRY_COPY)] = {op: int(entry[op]) for op in OPS}
    return found.get(copy, found.get("warp"))


def _run(entry: Mapping[str, object]) -> tuple:
    measured = entry.get("measured") or {}
    return measured.get("commit"), measured.get("date")


def choose_copy(device: str, ranks: int, ranks_per_gpu: int, table: Optional[Mapping[str, object]] = None,
                default: str = FALLBACK_MOE_COPY, reach: float = REACH) -> str:
    """Options.moe_copy="auto": the copy variant that reaches `reach` of the best dispatch bandwidth
    any variant reached, with the fewest SMs (ties: `default`). Only the variants swept in one run
    with `default`'s entry compete (one commit and date: machines differ more than variants do);
    where the table has no entry of `default` for this GPU model and group, `default`."""
    table = load() if table is None else table
    group = [e for e in table.get("entries", [])
             if (e.get("device"), e.get("ranks"), e.get("ranks_per_gpu")) == (device, ranks, ranks_per_gpu)]
    base = next((e for e in group if e.get("copy", UNNAMED_ENTRY_COPY) == default), None)
    if base is None:
        return default
    curves = {}
    for e in group:
        gbps = ((e.get("measured") or {}).get("GBps") or {}).get("dispatch")
        if _run(e) == _run(base) and gbps:
            curves[e.get("copy", UNNAMED_ENTRY_COPY)] = {int(sms): float(g) for sms, g in gbps.items()}
    if not curves:
        return default
    best = max(max(curve.values()) for curve in curves.values())
    reaching = [(min(sms for sms, g in curve.items() if g >= reach * best), copy != default, copy)
                for copy, curve in curves.items() if max(curve.values()) >= reach * best]
    return min(reaching)[2]


def apply(config, options_num_sms: int, device: str, ranks: int, ranks_per_gpu: int,
          table: Optional[Mapping[str, object]] = None, copy: str = UNNAMED_ENTRY_COPY) -> None:
    """Sets config.auto_sms_{dispatch,combine} from the table where Options.num_sms is 0; an
    explicit num_sms (Options or TORCH_EP_NUM_SMS) overrides the table and leaves them at 0.
    A copy of "auto" becomes config.moe_copy here: choose_copy's pick, the fallback with num_sms."""
    if copy == AUTO_MOE_COPY:
        if options_num_sms > 0:
            copy = FALLBACK_MOE_COPY
        else:
            table = load() if table is None else table  # read once for the choice and the budgets
            copy = choose_copy(device, ranks, ranks_per_gpu, table)
        config.moe_copy = MOE_COPIES.index(copy)
    if options_num_sms > 0:
        return
    budgets = lookup(device, ranks, ranks_per_gpu, table, copy)
    if budgets:
        config.auto_sms_dispatch, config.auto_sms_combine = budgets["dispatch"], budgets["combine"]
