"""benchmarks/all_to_all.py's all_to_all.json as one line per size, for a GPU call's log.

    python3 tools/a2a_brief.py OUT/all_to_all.json

Each path's us per call; from 1 MiB the eager default's and the pool's share of the roofline (eager
copy_) and the replayed default's share of roofline_graph (the copy replayed), where the run has them.
"""
import json
import sys

PATHS = ("ep", "ep_default_graph", "ep_eager", "ep_eager_graph", "ep_graph", "ep_pool", "all_to_all_v", "roofline",
         "roofline_graph")


def main(path: str) -> None:
    rows = {}
    for r in json.load(open(path))["results"]:
        rows.setdefault(r["size"], {})[r["impl"]] = r["time_us"]
    for size, t in sorted(rows.items()):
        cells = [f"{impl} {t[impl]:.1f}" for impl in PATHS if impl in t]
        if size >= 1 << 20:
            if "roofline" in t:
                cells += [f"{impl}/roofline {100 * t['roofline'] / t[impl]:.0f}%" for impl in ("ep", "ep_pool") if impl in t]
            if "roofline_graph" in t and "ep_default_graph" in t:
                cells.append(f"ep_default_graph/roofline_graph {100 * t['roofline_graph'] / t['ep_default_graph']:.0f}%")
        print(f"{size >> 10} KiB: " + ", ".join(cells))


if __name__ == "__main__":
    main(sys.argv[1])
