"""benchmarks/report.py: ratios are computed within a group against that op's baseline."""

from __future__ import annotations

import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench(group, provider, median, **extra):
    info = {"provider": provider, "baseline": "gap", "op": "tap_fwd_bwd", **extra}
    return {"group": group, "name": provider, "stats": {"median": median}, "extra_info": info}


def test_ratio_table_per_group_and_memory():
    report = load_report()
    data = {"benchmarks": [
        bench("g1", "gap", 0.002, peak_mem_mb=100.0),
        bench("g1", "ours", 0.003, peak_mem_mb=50.0),
        bench("g2", "gap", 0.010),
        bench("g2", "ours", 0.040, images_per_call=8),
    ]}
    table = report.format_table(data)
    assert "| g1 | 2.00 ms | 3.00 ms | 1.50x |" in table
    assert "| g2 | 10.00 ms | 5.00 ms | 0.50x |" in table
    memory = table.split("peak memory", 1)[1]
    assert "| g1 | 100 MB | 50 MB | 0.50x |" in memory and "g2" not in memory
