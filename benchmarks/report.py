"""Run the pytest-benchmark suites and print a ratio table against each group's baseline.

    python benchmarks/report.py                       # runs every benchmarks/bench_*.py
    python benchmarks/report.py --suite cam           # only benchmarks/bench_cam.py
    python benchmarks/report.py -k tap --out out.md   # a subset, table also written to out.md
    python benchmarks/report.py --json results.json   # only format an existing pytest-benchmark JSON
    python benchmarks/report.py --suite cam --time-box 120   # interrupt after 120 s, report what finished

Each benchmark declares ``extra_info["provider"]`` and ``extra_info["baseline"]``; ratios are
median(provider) / median(baseline) within one group, i.e. measured in the same run on the same
device. Lower is better; 1.00 is the baseline itself.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from _common import bench_device, device_name, git_commit  # noqa: E402


def run_benchmarks(json_path: str, select: str | None, suite: str | None, extra: list[str],
                   time_box: float | None = None) -> int:
    """Run the suites; returns pytest's exit code. With ``time_box`` (seconds), pytest is interrupted
    (SIGINT, as Ctrl-C) when the box runs out: it still writes the JSON of what it finished, which is
    formatted like a full run, so one slow or failing benchmark never loses the others' numbers."""
    target = os.path.join(HERE, f"bench_{suite}.py") if suite else HERE
    # -P: do not put the working directory on sys.path, so the *installed* package (with its native
    # extension) is benchmarked even when this runs from the repository root.
    cmd = [sys.executable, "-P", "-m", "pytest", target, "-q", "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
           "-o", "python_files=bench_*.py", "--benchmark-disable-gc"]
    if select:
        cmd += ["-k", select]
    cmd += extra
    print("+", " ".join(cmd), flush=True)
    process = subprocess.Popen(cmd)
    try:
        return process.wait(timeout=time_box)
    except subprocess.TimeoutExpired:
        print(f"time box of {time_box:.0f} s ran out: interrupting the benchmarks (finished ones are kept)",
              file=sys.stderr, flush=True)
        process.send_signal(signal.SIGINT)
        try:
            return process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


def format_table(data: dict) -> str:
    """One markdown table per op: a row per group, a column per provider, then ratios vs the baseline."""
    ops: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    memory: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    baselines: dict[str, str] = {}
    providers: dict[str, list[str]] = defaultdict(list)
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        op = info.get("op", "benchmark")
        provider = info.get("provider", bench["name"])
        # Benchmarks that time a batch say so; the table shows time per item then.
        ops[op][bench["group"]][provider] = bench["stats"]["median"] / info.get("images_per_call", 1)
        if "peak_mem_mb" in info:
            memory[op][bench["group"]][provider] = info["peak_mem_mb"]
        baselines[op] = info.get("baseline", provider)
        if provider not in providers[op]:
            providers[op].append(provider)
    tables = []
    for op in ops:
        base = baselines[op]
        cols = [base] + [p for p in providers[op] if p != base]
        tables.append(_ratio_table(f"**{op}** (baseline: {base})", ops[op], cols, _fmt_time))
        if memory.get(op):
            tables.append(_ratio_table(f"**{op}: peak memory above the inputs** (baseline: {base})", memory[op],
                                       cols, lambda mb: f"{mb:.0f} MB"))
    return "\n\n".join(tables)


def _ratio_table(title: str, rows: dict[str, dict[str, float]], cols: list[str], fmt) -> str:
    base = cols[0]
    header = ["group"] + cols + [f"{p} / {base}" for p in cols[1:]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for group in sorted(rows):
        row = rows[group]
        cells = [group] + [fmt(row[p]) if p in row else "-" for p in cols]
        cells += [f"{row[p] / row[base]:.2f}x" if p in row and row.get(base) else "-" for p in cols[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return title + "\n\n" + "\n".join(lines)


def _recorded(data: dict, key: str, default: str) -> str:
    """What the benchmarks recorded about their own run (extra_info), so a re-formatted JSON stays true."""
    for bench in data.get("benchmarks", []):
        if key in bench.get("extra_info", {}):
            return str(bench["extra_info"][key])
    return default


def _commit(data: dict) -> str:
    info = data.get("commit_info") or {}
    if info.get("id"):
        return info["id"][:7] + ("-dirty" if info.get("dirty") else "")
    return git_commit()


def _fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds:.2f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="format this pytest-benchmark JSON instead of running")
    parser.add_argument("-k", dest="select", help="pytest -k expression selecting benchmarks")
    parser.add_argument("--suite", help="run only benchmarks/bench_<SUITE>.py (e.g. tap, cam)")
    parser.add_argument("--out", help="also write the table (markdown) here")
    parser.add_argument("--save-json", help="keep the raw pytest-benchmark JSON here")
    parser.add_argument("--time-box", type=float, help="seconds; then interrupt and report what finished")
    args, extra = parser.parse_known_args(argv)

    status = 0
    if args.json:
        json_path = args.json
    else:
        json_path = args.save_json or os.path.join(tempfile.mkdtemp(), "bench.json")
        status = run_benchmarks(json_path, args.select, args.suite, extra, args.time_box)
        if status not in (0, 5):
            print(f"warning: the benchmarks exited with code {status} (failed or interrupted); "
                  "the table holds what finished", file=sys.stderr)
        if not os.path.exists(json_path):
            print("no benchmark results were written", file=sys.stderr)
            return status or 1
    with open(json_path) as fh:
        data = json.load(fh)
    header = (
        f"device: {_recorded(data, 'device', device_name(bench_device()))} | "
        f"torch {_recorded(data, 'torch', 'unknown')} | commit {_commit(data)}\n"
        "ratios: median time / median time of the group's baseline, same run (lower is better)\n"
    )
    if status not in (0, 5):
        header += f"INCOMPLETE: pytest exited with code {status} (a benchmark failed or the time box ran out)\n"
    table = header + "\n" + format_table(data)
    print(table)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(table + "\n")
    return 0 if status in (0, 5) else status


if __name__ == "__main__":
    raise SystemExit(main())
