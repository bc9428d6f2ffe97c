"""The overhead benchmark runs end to end on a tiny workload and prints its JSON line."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_overhead_smoke_prints_a_parsable_json_line():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--smoke"],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"benchmark"')]
    assert len(lines) == 1, done.stdout[-2000:]
    result = json.loads(lines[0])
    assert result["benchmark"] == "gradscope-overhead" and result["smoke"] is True
    methods = {row["method"] for row in result["rows"]}
    assert {"plain", "default", "every1", "naive", "anomaly"} <= methods
    for row in result["rows"]:
        assert row["workload"] == "deep10"
        assert row["steps"] >= 2
        for key in ("plain_ms", "method_ms", "ratio", "peak_mem_delta_mib"):
            assert math.isfinite(row[key]), (row["method"], key)
        assert row["plain_ms"] > 0
    # the markdown table precedes the JSON line and lists every method
    assert "| workload | method |" in done.stdout
    assert "us_per_module" in result["per_module"]["every1"]
