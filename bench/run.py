"""metriclab's benchmark suite: one command, results written to BENCHMARKS.md.

    python bench/run.py                          # everything, full size (tens of minutes on 2 cores)
    python bench/run.py --only eval              # one benchmark; its section of BENCHMARKS.md is replaced
    python bench/run.py --quick --output /tmp/b.md   # tiny sizes, a few seconds each: proves it still runs

Benchmarks: train_vs_pml, eval, search, compare_cold_warm, distributed, gpu (needs a CUDA GPU), loader, backbones,
ttq, quality.
Each writes one section between ``<!-- bench:NAME -->`` markers, so re-running one keeps the others' numbers.
Nothing here is a timed test: the numbers depend on the machine and on whatever else runs on it (the load is
recorded).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import re
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.measure import ROOT, WORK, commit, load, machine

BENCHMARKS = {
    "train_vs_pml": "bench.train_vs_pml",
    "eval": "bench.evaluation",
    "search": "bench.search",
    "compare_cold_warm": "bench.compare_cold_warm",
    "distributed": "bench.distributed",
    "gpu": "bench.gpu",
    "loader": "bench.loader",
    "backbones": "bench.backbones",
    "ttq": "bench.time_to_quality",
    "quality": "bench.quality",
}
HEADER = "# Benchmarks"
# Every measurement's raw numbers, for a closer look (not committed).
RAW = WORK / "raw"


def _header(quick: bool, names: list[str]) -> str:
    info = machine()
    lines = [
        HEADER,
        "",
        "Written by `python bench/run.py` (`make bench`); re-run one part with `python bench/run.py --only NAME` "
        f"({', '.join(BENCHMARKS)}). Every number below was measured by that command on the machine named here; "
        "each section states its date, CPU, data, run count and the machine load (`uptime` load averages 1/5/15 min) "
        "around each measurement: this 2-core VM is shared with other jobs, so absolute times vary with the load; "
        "compare numbers within one section (runs there are interleaved). Each section's footer names the CPU it "
        "ran on; the table is the machine of the latest run.",
        "",
        "| machine | |",
        "|---|---|",
    ]
    lines += [f"| {key} | {value} |" for key, value in info.items()]
    if quick:
        lines += ["", "**--quick run: tiny sizes that only prove the suite works; these are not results.**"]
    return "\n".join(lines) + "\n"


def _merge(existing: str, header: str, sections: dict[str, str]) -> str:
    """``existing`` with its header and the given sections replaced (sections kept in suite order).

    A ``<!-- notes -->...<!-- /notes -->`` block of ``existing`` is kept, right after the header.
    """
    found = dict(re.findall(r"<!-- bench:(\w+) -->\n(.*?)<!-- /bench:\1 -->", existing, flags=re.S))
    found.update(sections)
    # Hand-written analysis (e.g. profiles) between notes markers survives re-runs.
    notes = re.search(r"<!-- notes -->.*?<!-- /notes -->\n", existing, flags=re.S)
    header += "\n" + notes.group(0) if notes else ""
    body = [
        f"<!-- bench:{name} -->\n{found[name].rstrip()}\n<!-- /bench:{name} -->" for name in BENCHMARKS if name in found
    ]
    return header + "\n" + "\n\n".join(body) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the chosen benchmarks and write their sections; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds): proves the suite runs")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only this (repeatable)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md", help="Markdown file to update")
    parser.add_argument("--repeats", type=int, default=None, help="full-size training runs per implementation")
    parser.add_argument(
        "--reuse", action="store_true", help="reuse results of identical training runs saved earlier (continue a suite)"
    )
    args = parser.parse_args(argv)
    names = args.only or list(BENCHMARKS)
    output = args.output
    sections: dict[str, str] = {}
    code = commit()  # before anything is written
    cpu = machine()["cpu"]  # the VM's CPU model can differ between runs: each section names its own
    for name in names:
        module = importlib.import_module(BENCHMARKS[name])
        started, load_start = time.strftime("%Y-%m-%d %H:%M %Z"), load()
        print(f"== {name} ({'quick' if args.quick else 'full'}; load {load_start})", flush=True)
        clock = time.perf_counter()
        # --repeats and --reuse go to the benchmarks whose run() takes them
        accepted = inspect.signature(module.run).parameters
        kwargs = {key: value for key, value in (("repeats", args.repeats), ("reuse", args.reuse)) if key in accepted}
        text, results = module.run(quick=args.quick, **kwargs)
        if text is None:
            print(f"   skipped '{name}': it needs hardware this machine lacks; its section of {output} is kept")
            continue
        took = time.perf_counter() - clock
        stamp = (
            f"\n_Measured {started} at {code} on {cpu}, {took / 60:.1f} min, load {load_start} at the start and "
            f"{load()} at the end; "
            f"command: `python bench/run.py{' --quick' if args.quick else ''} --only {name}`._\n"
        )
        sections[name] = text.rstrip() + "\n" + stamp
        # Written after each benchmark, so a long suite that stops half way keeps what it measured.
        existing = output.read_text() if output.exists() else ""
        output.write_text(_merge(existing, _header(args.quick, names), sections))
        RAW.mkdir(parents=True, exist_ok=True)
        (RAW / f"{name}{'-quick' if args.quick else ''}.json").write_text(json.dumps(results, indent=1, default=str))
        print(f"   wrote section '{name}' of {output}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
