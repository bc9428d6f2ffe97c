"""The diagnosis benchmark runs its --quick subset end to end: ground truth is checked with
plain torch first, the tables and one JSON line come out (no accuracy is asserted here)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_diagnosis_benchmark_quick_runs_and_reports():
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "diagnosis.py"), "--quick", "--jobs", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith('{"benchmark"')]
    assert len(lines) == 1, done.stdout[-2000:]
    result = json.loads(lines[0])
    assert result["benchmark"] == "gradscope-diagnosis" and result["quick"] is True
    # every applicable pair went through the plain-torch check: kept or dropped, none lost
    assert result["applicable"] == result["verified"] + len(result["dropped"])
    assert result["verified"] >= 5
    # one healthy short and one healthy long run per setup, scored for false alarms
    assert result["healthy_runs"] == 2 * result["setups"]
    assert set(result["false_alarms"]) == {"mlp_tanh", "accum", "gan"}
    for pair in result["pairs"]:
        for length in ("short", "long"):
            scored = pair[length]
            assert isinstance(scored["sign"], bool)
            assert scored["latency"] is None or scored["latency"] >= 0
    for part in ("overall", "design", "heldout"):
        assert {"sign_short", "sign_long", "cause_short", "cause_long"} <= set(result[part])
    assert result["design"]["pairs"] + result["heldout"]["pairs"] == result["verified"]
    for title in ("### Overall", "### Per injector", "### Per setup", "### Per family",
                  "| held out (1/3) |"):
        assert title in done.stdout
    for injector in ("lr_low", "detach_forward", "no_zero_grad", "gan_d_no_zero_grad"):
        assert f"| {injector} |" in done.stdout


def test_ground_truth_check_drops_a_pair_whose_symptom_does_not_show():
    sys.path.insert(0, str(ROOT))
    from benchmarks.bug_injectors import INJECTOR_BY_NAME, Probe

    healthy = Probe(losses=[2.3] * 5 + [1.0] * 10)
    flat = Probe(losses=[2.3] * 15)
    assert INJECTOR_BY_NAME["lr_low"].verify(flat, healthy)
    assert not INJECTOR_BY_NAME["lr_low"].verify(healthy, healthy)
    assert INJECTOR_BY_NAME["detach_forward"].verify(Probe(none_grads=["fc1.weight"]), healthy)
    assert not INJECTOR_BY_NAME["detach_forward"].verify(Probe(), healthy)
