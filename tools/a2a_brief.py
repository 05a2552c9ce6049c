"""benchmarks/all_to_all.py's all_to_all.json, briefly: one line per size for a GPU call's log, or
over several runs one table for RESULTS.md (--markdown) or one PNG of busbw against
size, a panel per R (--plot; needs matplotlib; runs of one R are merged, later sizes over earlier).

    python3 tools/a2a_brief.py OUT/all_to_all.json
    python3 tools/a2a_brief.py --markdown R2/all_to_all.json R4/all_to_all.json R8/all_to_all.json
    python3 tools/a2a_brief.py --plot OUT.png [--paths ep,roofline,...] R2/all_to_all.json R4/all_to_all.json ...

The lines give each path's us per call; from 1 MiB the eager default's and the pool's share of the
roofline (eager copy_) and the replayed default's share of roofline_graph (the copy replayed), where
the run has them. The table gives us per call, and from 1 MiB each path's share: an eager path's of
the eager copy, a replayed path's of the copy replayed.
"""
import json
import sys

PATHS = ("ep", "ep_default_graph", "ep_eager", "ep_eager_graph", "ep_graph", "ep_pool", "all_to_all_v", "roofline",
         "roofline_graph")
# The table's columns: (path, its reference at 1 MiB and more); replays against the copy replayed.
COLUMNS = (("ep", "roofline"), ("ep_default_graph", "roofline_graph"), ("ep_eager", None),
           ("ep_eager_graph", None), ("ep_device", "roofline"), ("ep_graph", "roofline_graph"),
           ("all_to_all_v", "roofline"), ("ep_pool", "roofline"), ("roofline", None), ("roofline_graph", None))
SHARE_FROM = 1 << 20


def times(path: str, key: str = "time_us") -> tuple:
    run = json.load(open(path))
    rows = {}
    for r in run["results"]:
        rows.setdefault(r["size"], {})[r["impl"]] = r[key]
    return run["meta"].get("ranks"), rows


def size_label(size: int) -> str:
    """benchmarks/common.format_bytes for whole KiB / MiB, here without importing torch (the plot
    runs where matplotlib is, torch need not be)."""
    return f"{size >> 20} MiB" if size >= 1 << 20 else f"{size >> 10} KiB"


def brief(path: str) -> None:
    for size, t in sorted(times(path)[1].items()):
        cells = [f"{impl} {t[impl]:.1f}" for impl in PATHS if impl in t]
        if size >= SHARE_FROM:
            if "roofline" in t:
                cells += [f"{impl}/roofline {100 * t['roofline'] / t[impl]:.0f}%" for impl in ("ep", "ep_pool") if impl in t]
            if "roofline_graph" in t and "ep_default_graph" in t:
                cells.append(f"ep_default_graph/roofline_graph {100 * t['roofline_graph'] / t['ep_default_graph']:.0f}%")
        print(f"{size >> 10} KiB: " + ", ".join(cells))


def cell(t: dict, impl: str, reference, size: int) -> str:
    if impl not in t:
        return "-"
    text = f"{t[impl]:.1f}"
    if reference and reference in t and size >= SHARE_FROM:
        text += f" ({100 * t[reference] / t[impl]:.0f} %)"
    return text


def markdown(paths: list) -> None:
    runs = [times(p) for p in paths]
    columns = [c for c in COLUMNS if any(c[0] in t for _, rows in runs for t in rows.values())]
    print("| R | size/rank | " + " | ".join(impl for impl, _ in columns) + " |")
    print("|--:|--:|" + "--:|" * len(columns))
    for ranks, rows in runs:
        for size, t in sorted(rows.items()):
            print(f"| {ranks} | {size_label(size)} | " + " | ".join(cell(t, impl, ref, size) for impl, ref in columns) + " |")


# The plot's lines: the paths a user picks between, and the copy (dashed) eager and replayed.
PLOTTED = ("ep", "ep_default_graph", "ep_graph", "all_to_all_v", "ep_pool", "roofline", "roofline_graph")


def plot(out: str, paths: list, plotted=PLOTTED) -> None:
    import matplotlib
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt
    by_ranks = {}  # runs of the same R merged, a later run's sizes over an earlier's
    for p in paths:
        ranks, rows = times(p, "algbw_GBps")
        by_ranks.setdefault(ranks, {}).update(rows)
    runs = sorted(by_ranks.items())
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.5), squeeze=False)
    for ax, (ranks, rows) in zip(axes[0], runs):
        sizes = sorted(rows)
        for color, impl in enumerate(plotted):  # a path's colour the same in every panel
            points = [(s, rows[s][impl] * (ranks - 1) / ranks) for s in sizes if impl in rows[s]]  # busbw
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, "--" if impl.startswith("roofline") else "-o", color=f"C{color}", label=impl,
                        markersize=3)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(sizes, [size_label(s) for s in sizes], rotation=45, ha="right")
        ax.minorticks_off()
        ax.set(title=f"{ranks} ranks", xlabel="bytes sent per rank", ylabel="busbw (GB/s)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--markdown"]:
        markdown(sys.argv[2:])
    elif sys.argv[1:2] == ["--plot"]:
        args = sys.argv[3:]
        if args[:1] == ["--paths"]:  # the lines to draw, e.g. --paths ep,ep_default_graph,roofline
            plot(sys.argv[2], args[2:], tuple(args[1].split(",")))
        else:
            plot(sys.argv[2], args)
    else:
        brief(sys.argv[1])
