"""The SM budget table (torch_ep/sm_table.py): deriving an entry from a sweep, looking it up, and
Options.num_sms overriding it; and benchmarks/moe.py's --sm-sweep flag. CPU only, synthetic numbers."""
import dataclasses
import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

import torch_ep
from conftest import rank_pool
from torch_ep import sm_table

ROOT = Path(__file__).resolve().parent.parent

# Bandwidth rising with SMs to a plateau: dispatch reaches 95% of its best (80) at 24 SMs, combine
# (best 50, reached at 16) already at 8.
SWEEP = {"dispatch": {1: 10.0, 2: 19.0, 4: 38.0, 8: 60.0, 16: 75.0, 24: 79.0, 32: 80.0},
         "combine": {1: 8.0, 2: 16.0, 4: 30.0, 8: 48.0, 16: 50.0, 24: 49.5, 32: 49.0}}


def entry(**overrides):
    fields = dict(device="NVIDIA H200", ranks=2, ranks_per_gpu=1)
    fields.update(overrides)
    return sm_table.derive_entry(SWEEP, **fields)


def test_fewest_sms_reaching_the_best():
    assert sm_table.fewest_sms(SWEEP["dispatch"]) == 24
    assert sm_table.fewest_sms(SWEEP["combine"]) == 8
    assert sm_table.fewest_sms(SWEEP["dispatch"], reach=1.0) == 32
    assert sm_table.fewest_sms({4: 5.0}) == 4
    with pytest.raises(ValueError, match="no measurements"):
        sm_table.fewest_sms({})


def test_derive_entry():
    e = entry(measured={"tokens": 4096})
    assert (e["device"], e["ranks"], e["ranks_per_gpu"], e["dispatch"], e["combine"]) == ("NVIDIA H200", 2, 1, 24, 8)
    assert e["measured"]["tokens"] == 4096 and e["measured"]["reach"] == sm_table.REACH
    assert e["measured"]["GBps"]["combine"]["16"] == 50.0
    json.dumps(e)  # what the sweep writes
    with pytest.raises(ValueError, match="no combine bandwidth"):
        sm_table.derive_entry({"dispatch": SWEEP["dispatch"]}, device="x", ranks=2, ranks_per_gpu=1)


def budgets(dispatch, combine, fp8=None):
    """lookup's answer: fp8 dispatch takes dispatch's budget where an entry has none of its own."""
    return {"dispatch": dispatch, "dispatch_fp8": dispatch if fp8 is None else fp8, "combine": combine}


def test_lookup():
    table = {"entries": [entry(), {**entry(ranks=8), "dispatch": 99}, {**entry(ranks=4), "dispatch_fp8": 6}]}
    assert sm_table.lookup("NVIDIA H200", 2, 1, table) == budgets(24, 8)
    assert sm_table.lookup("NVIDIA H200", 8, 1, table) == budgets(99, 8)
    assert sm_table.lookup("NVIDIA H200", 4, 1, table) == budgets(24, 8, fp8=6)
    assert sm_table.lookup("NVIDIA H200", 2, 2, table) is None  # other sharing of the GPU
    assert sm_table.lookup("NVIDIA H100 80GB HBM3", 2, 1, table) is None
    assert sm_table.lookup("NVIDIA H200", 4, 1, {"entries": []}) is None


def test_lookup_reads_the_table_file(tmp_path, monkeypatch):
    path = tmp_path / "sm_table.json"
    path.write_text(json.dumps({"entries": [entry()]}))
    monkeypatch.delenv("TORCH_EP_SM_TABLE", raising=False)
    monkeypatch.setattr(sm_table, "TABLE_PATH", path)
    assert sm_table.lookup("NVIDIA H200", 2, 1) == budgets(24, 8)


def test_a_table_of_ones_own(tmp_path, monkeypatch):
    """TORCH_EP_SM_TABLE names a table in place of the shipped one; a missing file is named."""
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"entries": [{**entry(), "dispatch": 5}]}))
    monkeypatch.setenv("TORCH_EP_SM_TABLE", str(path))
    assert sm_table.lookup("NVIDIA H200", 2, 1) == budgets(5, 8)
    monkeypatch.setenv("TORCH_EP_SM_TABLE", str(tmp_path / "none.json"))
    with pytest.raises(FileNotFoundError, match="TORCH_EP_SM_TABLE=.*none.json.*no such file"):
        sm_table.lookup("NVIDIA H200", 2, 1)
    (tmp_path / "bad.json").write_text("{entries: [")
    monkeypatch.setenv("TORCH_EP_SM_TABLE", str(tmp_path / "bad.json"))
    with pytest.raises(ValueError, match=r"bad.json' \(TORCH_EP_SM_TABLE\): not JSON"):
        sm_table.lookup("NVIDIA H200", 2, 1)
    (tmp_path / "list.json").write_text("[1, 2]")
    monkeypatch.setenv("TORCH_EP_SM_TABLE", str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match='list of "entries"'):
        sm_table.lookup("NVIDIA H200", 2, 1)


def test_shipped_table_parses():
    table = sm_table.load()
    assert isinstance(table["entries"], list) and table["reach"] == sm_table.REACH
    for e in table["entries"]:
        assert {"device", "ranks", "ranks_per_gpu", *sm_table.REQUIRED_OPS} <= e.keys()
        assert e.get("dispatch_fp8", e["dispatch"]) >= 1


settings = sm_table.settings


def config_with_table(options, table):
    config = options._to_config(timedelta(seconds=60))
    sm_table.apply(config, options.num_sms, "NVIDIA H200", 2, 1, table)
    return config


def test_automatic_takes_the_table_and_num_sms_overrides_it(monkeypatch):
    monkeypatch.delenv("TORCH_EP_NUM_SMS", raising=False)
    table = {"entries": [entry()]}
    auto = config_with_table(torch_ep.Options(), table)
    assert (auto.num_sms, auto.auto_sms_dispatch, auto.auto_sms_dispatch_fp8, auto.auto_sms_combine) == (0, 24, 24, 8)
    explicit = config_with_table(torch_ep.Options(num_sms=4), table)
    assert (explicit.num_sms, explicit.auto_sms_dispatch, explicit.auto_sms_combine) == (4, 0, 0)
    monkeypatch.setenv("TORCH_EP_NUM_SMS", "6")
    from_env = config_with_table(torch_ep.Options(), table)
    assert (from_env.num_sms, from_env.auto_sms_dispatch, from_env.auto_sms_combine) == (6, 0, 0)
    monkeypatch.delenv("TORCH_EP_NUM_SMS")
    none = config_with_table(torch_ep.Options(), {"entries": []})
    assert (none.num_sms, none.auto_sms_dispatch, none.auto_sms_combine) == (0, 0, 0)  # every SM


def test_moe_benchmark_has_the_sweep_flag():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--help"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--sm-sweep" in out.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "moe.py"), "--sm-sweep", "0,4"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected SM counts >= 1" in bad.stderr


def test_sm_sweep_runs_on_cpu(tmp_path, capsys):
    """The sweep end to end on CPU ranks, tiny shapes: every op (dispatch with the layout in the
    call and given, combine) for every budget, copy variant and method, each checked against
    torch_ep.reference before it is timed, and the table entry's dispatch curve taken from the
    layout-given rows (issue 18's targets and DeepEP's tuned figures pass the layout)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.moe_sm_sweep import OPS, SWEPT, auto_picks, table_entries
        from benchmarks.moe_sm_sweep import main as sweep_main
    finally:
        sys.path.remove(str(ROOT))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(ROOT / "benchmarks" / "moe.py"), "--sm-sweep", "1,2", "--copy", "warp,unroll", "--device", "cpu",
           "--tokens", "48", "--hidden", "256", "--experts", "8", "--top-k", "2", "--runs", "2", "--warmup", "1",
           "--stream-calls", "2", "--out", str(tmp_path)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    data = json.loads((tmp_path / "moe_sm_sweep.json").read_text())
    assert f"Options.moe_copy='auto' would take {auto_picks(data['sm_table_entries'])}" in out.stdout
    assert table_entries(data) == data["sm_table_entries"]
    capsys.readouterr()
    assert sweep_main(["--entries", str(tmp_path / "moe_sm_sweep.json")]) == 0  # derives them again
    assert json.loads(capsys.readouterr().out) == data["sm_table_entries"]
    # --into: the entries land in a table, in place of their GPU model's, group's and variant's.
    mine = dict(data["sm_table_entries"][0], dispatch=-1)
    other = dict(mine, device="another GPU")
    table_file = tmp_path / "table.json"
    table_file.write_text(json.dumps({"reach": 0.95, "entries": [other, mine]}))
    assert sweep_main(["--entries", str(tmp_path / "moe_sm_sweep.json"), "--into", str(table_file)]) == 0
    assert json.loads(table_file.read_text()) == {"reach": 0.95,
                                                  "entries": [other] + data["sm_table_entries"]}
    found = {(r["sms"], r["copy"], r["op"], r["method"]) for r in data["results"]}
    assert found == {(s, c, op, m) for s in (1, 2) for c in ("warp", "unroll") for op in OPS
                     for m in ("isolated", "stream")}
    assert SWEPT["dispatch"] == "dispatch bf16, layout given"
    for e in data["sm_table_entries"]:
        assert e["measured"]["ops"] == SWEPT  # which rows an entry's budgets come from
        stream = {(r["sms"], r["op"]): r["GBps"] for r in data["results"]
                  if r["copy"] == e["copy"] and r["method"] == "stream"}
        for table_op, op in SWEPT.items():
            assert e["measured"]["GBps"][table_op] == {str(s): stream[(s, op)] for s in (1, 2)}


def test_moe_table_flags_host_bound_stream_rows():
    """benchmarks/moe.py's last column: the host's time to issue a stream call, the rounds'
    median, flagged where it reaches HOST_BOUND of the call's device time (the device then waits
    for the host); "-" for isolated rows and where nothing was measured (CPU runs)."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.moe import HOST_BOUND, ROOFLINE, Measurement, results_table
    finally:
        sys.path.remove(str(ROOT))
    op_a, op_b = "dispatch bf16, layout given", "dispatch fp8, layout given"
    device_s = [100e-6] * 4  # two rounds of two calls
    rows = [Measurement("ep", op_a, 64, [1 << 20], device_s, "stream", 2, host_s=[40e-6, 42e-6, 41e-6]),
            Measurement("ep", op_b, 64, [1 << 20], device_s, "stream", 2,
                        host_s=[HOST_BOUND * 100e-6, 90e-6, 95e-6]),
            Measurement("ep", op_a, 64, [1 << 20], [200e-6] * 3, "isolated"),
            Measurement("ep", "combine bf16", 64, [1 << 20], device_s, "stream", 2),
            # waits for the counts on the host: its host time is the device's, not flagged
            Measurement("ep", "dispatch bf16", 64, [1 << 20], device_s, "stream", 2, host_s=[99e-6])]
    rows += [Measurement(ROOFLINE, m.op, 64, [1 << 20], [50e-6], m.method) for m in rows]
    assert [m.host_bound for m in rows[:5]] == [False, True, False, False, False]
    table = results_table(rows, "ep").splitlines()
    assert table[0].rstrip(" |").endswith("ep host us/call")
    last = {(line.split("|")[2].strip(), line.split("|")[3].strip()): line.split("|")[-2].strip() for line in table[2:]}
    assert last == {("stream", op_a): "41.0", ("stream", op_b): "90.0 (host-bound)",
                    ("isolated", op_a): "-", ("stream", "combine bf16"): "-",
                    ("stream", "dispatch bf16"): "99.0 (waits for the counts)"}


def test_parse_budgets():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.moe_sm_sweep import parse_budgets
    finally:
        sys.path.remove(str(ROOT))
    assert parse_budgets("8,1,2,8") == [1, 2, 8]
    with pytest.raises(ValueError, match="separated by commas"):
        parse_budgets("1;2")


def test_into_needs_entries(tmp_path, capsys):
    """--into writes derived entries: without --entries it is refused, naming both, and the table is
    left as it was."""
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.moe_sm_sweep import main as sweep_main
    finally:
        sys.path.remove(str(ROOT))
    table = tmp_path / "table.json"
    table.write_text('{"entries": []}')
    with pytest.raises(SystemExit) as refused:
        sweep_main(["--replot", str(tmp_path / "sweep.json"), str(tmp_path / "sweep.png"), "--into", str(table)])
    assert refused.value.code == 2
    assert "--into goes with --entries" in capsys.readouterr().err
    assert table.read_text() == '{"entries": []}'


def test_entries_per_copy_variant(monkeypatch):
    """Entries name their copy variant (Options.moe_copy); one without a name is warp's, and
    warp's stands in for a variant with no entry of its own."""
    bulk = {**entry(copy="bulk"), "dispatch": 4, "combine": 2}
    legacy = {k: v for k, v in entry().items() if k != "copy"}
    table = {"entries": [legacy, bulk]}
    assert entry()["copy"] == "warp"
    assert sm_table.lookup("NVIDIA H200", 2, 1, table) == budgets(24, 8)
    assert sm_table.lookup("NVIDIA H200", 2, 1, table, copy="bulk") == budgets(4, 2)
    assert sm_table.lookup("NVIDIA H200", 2, 1, table, copy="unroll") == budgets(24, 8)
    assert sm_table.lookup("NVIDIA H200", 2, 1, {"entries": [bulk]}, copy="unroll") is None
    assert sm_table.lookup("NVIDIA H200", 4, 1, table, copy="unroll") is None
    monkeypatch.delenv("TORCH_EP_NUM_SMS", raising=False)
    config = torch_ep.Options(moe_copy="bulk")._to_config(timedelta(seconds=60))
    sm_table.apply(config, 0, "NVIDIA H200", 2, 1, table, copy="bulk")
    assert settings(config) == {op: ("bulk", sms) for op, sms in budgets(4, 2).items()}


def test_moe_copy_option(monkeypatch):
    monkeypatch.delenv("TORCH_EP_MOE_COPY", raising=False)
    assert torch_ep.Options().moe_copy == "auto"  # the group picks; unroll until then
    assert torch_ep.Options()._to_config(timedelta(seconds=60)).moe_copy_dispatch == 1
    monkeypatch.setenv("TORCH_EP_MOE_COPY", "bulk")
    assert torch_ep.Options().moe_copy == "bulk"
    assert settings(torch_ep.Options(moe_copy="warp")._to_config(timedelta(seconds=60))) == {
        op: ("warp", 0) for op in sm_table.OPS}
    monkeypatch.setenv("TORCH_EP_MOE_COPY", "tma")
    with pytest.raises(ValueError, match="TORCH_EP_MOE_COPY"):
        torch_ep.Options()


def variant(copy, dispatch, run="abc1234", **curves):
    """A table entry of one copy variant whose dispatch bandwidth is `dispatch` ({sms: GB/s}), and
    the other kernels' where given (dispatch_fp8=, combine=; combine: SWEEP's)."""
    gbps = {"dispatch": dispatch, "combine": SWEEP["combine"], **curves}
    return sm_table.derive_entry(gbps, device="NVIDIA H100", ranks=4, ranks_per_gpu=4, copy=copy,
                                 measured={"commit": run, "date": "2026-12-07"})


def test_auto_copy_takes_the_variant_that_reaches_the_best_with_fewest_sms():
    early_plateau = {4: 180.0, 8: 350.0, 16: 340.0, 24: 360.0}  # unroll: the best at 8 SMs, no higher
    higher = {4: 160.0, 8: 280.0, 16: 420.0, 24: 460.0}         # warp: 460 at 24 SMs
    choose = lambda entries: sm_table.choose_copy("NVIDIA H100", 4, 4, {"entries": entries})  # noqa: E731
    assert choose([variant("unroll", early_plateau), variant("warp", higher)]) == "warp"
    # Within 95 % of the best both ways: the fewer SMs win, then the default.
    close = {4: 180.0, 8: 440.0, 16: 450.0, 24: 455.0}
    assert choose([variant("unroll", close), variant("warp", higher)]) == "unroll"
    assert choose([variant("unroll", higher), variant("warp", dict(higher))]) == "unroll"
    assert sm_table.choose_copy("NVIDIA H100", 4, 4, {"entries": [variant("unroll", close), variant("warp", higher)]},
                                default="warp") == "unroll"
    # Variants of another run (another machine, another commit) do not compete.
    assert choose([variant("unroll", early_plateau), variant("warp", higher, run="fff0000")]) == "unroll"
    # No entry of the default for this group: the default.
    assert choose([variant("warp", higher)]) == "unroll"
    assert sm_table.choose_copy("NVIDIA H100", 8, 8, {"entries": [variant("unroll", early_plateau)]}) == "unroll"


def test_auto_copy_chooses_per_kernel():
    """fp8 dispatch and combine each take the variant that reaches their own best with the
    fewest SMs; fp8 goes by dispatch's curves where its sweep had none of its own."""
    high_late = {8: 280.0, 24: 460.0, 48: 470.0}
    high_early = {8: 350.0, 24: 500.0, 48: 480.0}
    table = {"entries": [variant("unroll", {8: 300.0, 24: 400.0}, dispatch_fp8=high_early, combine=high_early),
                         variant("warp", high_late, dispatch_fp8=high_late, combine=high_late)]}
    picks = {op: sm_table.choose_copy("NVIDIA H100", 4, 4, table, op=op) for op in sm_table.OPS}
    assert picks == {"dispatch": "warp", "dispatch_fp8": "unroll", "combine": "unroll"}
    old_sweep = {"entries": [variant("unroll", {8: 300.0, 24: 400.0}), variant("warp", high_late)]}
    assert sm_table.choose_copy("NVIDIA H100", 4, 4, old_sweep, op="dispatch_fp8") == "warp"
    with pytest.raises(ValueError, match="op='dispatch_bf16'"):
        sm_table.choose_copy("NVIDIA H100", 4, 4, table, op="dispatch_bf16")


def test_auto_copy_resolved_when_the_group_applies_the_table():
    """sm_table.apply turns "auto" into each kernel's chosen variant and its budget; with num_sms
    set, into the variant that moved the most at that budget, and no budgets."""
    table = {"entries": [variant("unroll", {4: 180.0, 8: 350.0}, dispatch_fp8={4: 310.0, 8: 320.0}),
                         {**variant("warp", {8: 280.0, 24: 460.0}, dispatch_fp8={8: 100.0, 24: 200.0}),
                          "combine": 16}]}
    config = torch_ep.Options(moe_copy="auto")._to_config(timedelta(seconds=60))
    sm_table.apply(config, 0, "NVIDIA H100", 4, 4, table, copy="auto")
    # Without the table's switch, dispatch's pick and that variant's budget per kernel.
    assert settings(config) == {"dispatch": ("warp", 24), "dispatch_fp8": ("warp", 24), "combine": ("warp", 16)}
    config = torch_ep.Options(moe_copy="auto")._to_config(timedelta(seconds=60))
    sm_table.apply(config, 0, "NVIDIA H100", 4, 4, {**table, sm_table.PER_KERNEL_KEY: True}, copy="auto")
    # combine: SWEEP's curve in both, level: the fewer SMs (8, unroll's) over warp's edited 16
    assert settings(config) == {"dispatch": ("warp", 24), "dispatch_fp8": ("unroll", 4), "combine": ("unroll", 8)}
    # 6 SMs: each curve's figure at 4 (the most swept below 6); warp has none there: unroll.
    fixed = torch_ep.Options(moe_copy="auto", num_sms=6)._to_config(timedelta(seconds=60))
    sm_table.apply(fixed, 6, "NVIDIA H100", 4, 4, {**table, sm_table.PER_KERNEL_KEY: True}, copy="auto")
    assert settings(fixed) == {op: ("unroll", 0) for op in sm_table.OPS}
    # 24 SMs: warp's 460 over unroll's 350 (its figure at 8) for bf16; fp8 320 against 200: unroll.
    sm_table.apply(fixed, 24, "NVIDIA H100", 4, 4, {**table, sm_table.PER_KERNEL_KEY: True}, copy="auto")
    assert settings(fixed) == {"dispatch": ("warp", 0), "dispatch_fp8": ("unroll", 0), "combine": ("unroll", 0)}
    # Without the table's switch, dispatch's pick for all three.
    sm_table.apply(fixed, 24, "NVIDIA H100", 4, 4, table, copy="auto")
    assert settings(fixed) == {op: ("warp", 0) for op in sm_table.OPS}


def test_auto_copy_at_a_budget_set():
    """With num_sms set, "auto" takes the variant whose sweep moved the most at that budget (at
    the most SMs swept below it where it was not swept); ties, budgets below every swept one and
    variants of other runs leave the default."""
    unroll = {4: 180.0, 8: 350.0, 16: 340.0, 24: 360.0}
    warp = {4: 160.0, 8: 280.0, 16: 420.0, 24: 460.0}
    entries = [variant("unroll", unroll), variant("warp", warp)]
    at = lambda sms, entries=entries, **kw: sm_table.choose_copy_at(  # noqa: E731
        "NVIDIA H100", 4, 4, sms, {"entries": entries}, **kw)
    assert [at(s) for s in (4, 8, 12, 16, 24, 64)] == ["unroll", "unroll", "unroll", "warp", "warp", "warp"]
    assert at(2) == "unroll"  # below every swept budget
    assert at(4, [variant("unroll", unroll), variant("warp", dict(unroll))]) == "unroll"  # a tie
    assert at(16, [variant("unroll", unroll), variant("warp", warp, run="fff0000")]) == "unroll"
    assert at(16, [variant("warp", warp)]) == "unroll"  # no entry of the default
    assert at(16, default="warp") == "warp"
    with pytest.raises(ValueError, match="choose_copy_at: op='combine_bf16'"):
        at(8, op="combine_bf16")
    # The shipped table: 8 ranks sharing an H100 at 8 SMs, warp's bf16 dispatch moved 229 GB/s
    # where unroll's moved 186 (3d86ee6's sweep); 2 ranks sharing an H200, unroll's led at 8 SMs.
    table = sm_table.load(sm_table.TABLE_PATH)
    assert sm_table.choose_copy_at("NVIDIA H100 80GB HBM3", 8, 8, 8, table) == "warp"
    assert [sm_table.choose_copy_at("NVIDIA H200", 2, 2, 8, table, op=op) for op in sm_table.OPS] == ["unroll"] * 3


def test_auto_copy_option(monkeypatch):
    monkeypatch.delenv("TORCH_EP_MOE_COPY", raising=False)
    auto = torch_ep.Options(moe_copy="auto")
    assert settings(auto._to_config(timedelta(seconds=60))) == {op: ("unroll", 0) for op in sm_table.OPS}  # until the group picks
    monkeypatch.setenv("TORCH_EP_MOE_COPY", "auto")
    assert torch_ep.Options().moe_copy == "auto"
    with pytest.raises(ValueError, match="or auto"):
        torch_ep.Options(moe_copy="fastest")
    # Every group of the shipped table resolves to a variant it has an entry for.
    table = sm_table.load()
    for e in table["entries"]:
        key = (e["device"], e["ranks"], e["ranks_per_gpu"])
        for op in sm_table.OPS:  # each kernel's pick, whether or not the table switches per kernel
            copy = sm_table.choose_copy(*key, table, op=op)
            assert sm_table.lookup(*key, table, copy=copy) is not None, (key, op, copy)


def rank_kernel_settings():
    sys.path.insert(0, str(ROOT))
    from benchmarks.moe import kernel_settings

    return kernel_settings()


def test_moe_benchmark_names_its_kernels():
    """benchmarks/moe.py's "kernels" line is the copy variant and SM budget the group resolved."""
    every = "dispatch unroll, every SM; dispatch fp8 unroll, every SM; combine unroll, every SM"  # no table on CPU
    assert rank_pool(2).run(rank_kernel_settings) == [every] * 2
    assert rank_pool(2, env={"TORCH_EP_NUM_SMS": "6", "TORCH_EP_MOE_COPY": "warp"}).run(rank_kernel_settings) == \
        ["dispatch warp, 6 SMs; dispatch fp8 warp, 6 SMs; combine warp, 6 SMs"] * 2


def test_moe_push_options(monkeypatch):
    """Options.moe_push (TORCH_EP_MOE_PUSH, off by default) and Options.moe_pool_bytes
    (TORCH_EP_MOE_POOL_BYTES, 1 GiB by default, at least 2 MiB) reach the group's Config."""
    monkeypatch.delenv("TORCH_EP_MOE_PUSH", raising=False)
    monkeypatch.delenv("TORCH_EP_MOE_POOL_BYTES", raising=False)
    config = torch_ep.Options()._to_config(timedelta(seconds=60))
    assert torch_ep.Options().moe_push is False and config.moe_push is False
    assert torch_ep.Options().moe_pool_bytes == 1 << 30 and config.moe_pool_bytes == 1 << 30
    monkeypatch.setenv("TORCH_EP_MOE_PUSH", "1")
    monkeypatch.setenv("TORCH_EP_MOE_POOL_BYTES", str(64 << 20))
    config = torch_ep.Options()._to_config(timedelta(seconds=60))
    assert (config.moe_push, config.moe_pool_bytes) == (True, 64 << 20)
    monkeypatch.setenv("TORCH_EP_MOE_PUSH", "0")
    assert torch_ep.Options().moe_push is False
    assert torch_ep.Options(moe_push=True)._to_config(timedelta(seconds=60)).moe_push is True
    with pytest.raises(ValueError, match="moe_pool_bytes"):
        torch_ep.Options(moe_pool_bytes=1 << 20)
    monkeypatch.setenv("TORCH_EP_MOE_PUSH", "yes")
    with pytest.raises(ValueError, match="TORCH_EP_MOE_PUSH"):
        torch_ep.Options()
    # Options is a positional dataclass: the new fields come last, so that no older one moved.
    names = [f.name for f in dataclasses.fields(torch_ep.Options)]
    assert names[-5:] == ["moe_push", "moe_pool_bytes", "moe_device_records", "moe_one_launch",
                          "all_to_all_pool_piece_bytes"]
    assert names.index("moe_copy") == names.index("ranks_per_node") + 1 == names.index("blocking_wait") - 1


def test_readme_lists_every_environment_variable():
    """The README's environment table and torch_ep.options.ENVIRONMENT name the same variables."""
    import re
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(TORCH_EP_[A-Z0-9_]+)` \|", readme, flags=re.M))
    assert listed == set(torch_ep.options.ENVIRONMENT)


def test_every_variable_read_is_listed():
    """Every TORCH_EP_* variable the library's sources name is in torch_ep.options.ENVIRONMENT, but
    the what-ifs (TORCH_EP_WHATIF_*: measurements, not settings), and none is listed that no source
    names."""
    import re
    named = set()
    for folder in ("backend", "torch_ep"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".cpp", ".hpp", ".cu", ".cuh", ".h"):
                text = path.read_text()
                if path.name == "options.py":  # the list itself names them all
                    start = text.index("ENVIRONMENT = {")
                    text = text[:start] + text[text.index("\n}\n", start):]
                named |= set(re.findall(r'"(TORCH_EP_[A-Z0-9_]+)"', text))
    settings = {name for name in named if not name.startswith("TORCH_EP_WHATIF_")}
    assert settings == set(torch_ep.options.ENVIRONMENT), (sorted(settings - set(torch_ep.options.ENVIRONMENT)),
                                                            sorted(set(torch_ep.options.ENVIRONMENT) - settings))


def test_parse_copies():
    sys.path.insert(0, str(ROOT))
    try:
        from benchmarks.moe_sm_sweep import parse_copies
    finally:
        sys.path.remove(str(ROOT))
    assert parse_copies("warp,bulk,warp") == ["warp", "bulk"]
    with pytest.raises(ValueError, match="expected variants"):
        parse_copies("warp,tma")


def test_moe_device_records_option(monkeypatch):
    """Options.moe_device_records (TORCH_EP_MOE_DEVICE_RECORDS, off by default) reaches the Config,
    and only with moe_push: set without it, a ValueError names both at set-up."""
    monkeypatch.delenv("TORCH_EP_MOE_PUSH", raising=False)
    monkeypatch.delenv("TORCH_EP_MOE_DEVICE_RECORDS", raising=False)
    assert torch_ep.Options().moe_device_records is False
    assert torch_ep.Options()._to_config(timedelta(seconds=60)).moe_device_records is False
    config = torch_ep.Options(moe_push=True, moe_device_records=True)._to_config(timedelta(seconds=60))
    assert (config.moe_push, config.moe_device_records) == (True, True)
    with pytest.raises(ValueError, match="moe_device_records.*TORCH_EP_MOE_PUSH"):
        torch_ep.Options(moe_device_records=True)
    monkeypatch.setenv("TORCH_EP_MOE_DEVICE_RECORDS", "1")
    with pytest.raises(ValueError, match="TORCH_EP_MOE_DEVICE_RECORDS"):
        torch_ep.Options()
    monkeypatch.setenv("TORCH_EP_MOE_PUSH", "1")
    assert torch_ep.Options().moe_device_records is True
    monkeypatch.setenv("TORCH_EP_MOE_DEVICE_RECORDS", "yes")
    with pytest.raises(ValueError, match="TORCH_EP_MOE_DEVICE_RECORDS"):
        torch_ep.Options()


def test_moe_one_launch_option(monkeypatch):
    """Options.moe_one_launch (TORCH_EP_MOE_ONE_LAUNCH, off by default) reaches the Config, and only
    with moe_device_records: set without it, a ValueError names both."""
    for name in ("TORCH_EP_MOE_PUSH", "TORCH_EP_MOE_DEVICE_RECORDS", "TORCH_EP_MOE_ONE_LAUNCH"):
        monkeypatch.delenv(name, raising=False)
    assert torch_ep.Options().moe_one_launch is False
    assert torch_ep.Options()._to_config(timedelta(seconds=60)).moe_one_launch is False
    config = torch_ep.Options(moe_push=True, moe_device_records=True, moe_one_launch=True)._to_config(
        timedelta(seconds=60))
    assert (config.moe_device_records, config.moe_one_launch) == (True, True)
    with pytest.raises(ValueError, match="moe_one_launch.*TORCH_EP_MOE_DEVICE_RECORDS"):
        torch_ep.Options(moe_push=True, moe_one_launch=True)
    monkeypatch.setenv("TORCH_EP_MOE_PUSH", "1")
    monkeypatch.setenv("TORCH_EP_MOE_DEVICE_RECORDS", "1")
    monkeypatch.setenv("TORCH_EP_MOE_ONE_LAUNCH", "1")
    assert torch_ep.Options().moe_one_launch is True
    monkeypatch.setenv("TORCH_EP_MOE_ONE_LAUNCH", "yes")
    with pytest.raises(ValueError, match="TORCH_EP_MOE_ONE_LAUNCH"):
        torch_ep.Options()


CORRUPT_LAYOUT_GIVEN = """
import runpy, sys
import torch
import torch_ep

real = torch_ep.dispatch


def corrupt(*args, **kwargs):  # a bf16 dispatch that loses its last row whenever the layout is given
    result = real(*args, **kwargs)
    if kwargs.get("layout") is not None and isinstance(result.recv_x, torch.Tensor) and result.recv_x.shape[0]:
        result.recv_x[-1] = 0
    return result


torch_ep.dispatch = corrupt
sys.argv = [sys.argv[1]] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sm_sweep_refuses_a_wrong_row(tmp_path):
    """The sweep's reference check covers the layout-given rows: a dispatch that is wrong only
    with the layout given stops the sweep before anything is timed."""
    script = tmp_path / "corrupt.py"
    script.write_text(CORRUPT_LAYOUT_GIVEN)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
           str(ROOT / "benchmarks" / "moe.py"), "--sm-sweep", "1", "--copy", "warp", "--device", "cpu",
           "--tokens", "48", "--hidden", "256", "--experts", "8", "--top-k", "2", "--runs", "1", "--warmup", "0",
           "--stream-calls", "2", "--out", str(tmp_path / "out")]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0, out.stdout[-2000:]
    assert "differs from torch_ep.reference" in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
    assert "layout given recv_x" in out.stdout + out.stderr, out.stdout[-2000:] + out.stderr[-2000:]
