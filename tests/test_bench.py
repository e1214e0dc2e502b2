"""tests/bench.py itself, on a tiny shape: every CPU bench runs and reports finite figures with the machine's
state (its numbers are machine-dependent, so nothing here asserts a speed)."""
import json
import math
import subprocess
import sys

from conftest import ROOT


def figures(report):
    for key, value in report.items():
        if isinstance(value, dict):
            yield from figures(value)
        elif isinstance(value, list):
            for row in value:
                yield from figures(row)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, value


def test_every_cpu_bench_runs_on_a_tiny_shape_and_records_the_machine(tmp_path):
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "bench.py"), "all", "--tiny", f"--json={out}"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report) == {"generate", "train", "rules"}
    for name, part in report.items():
        machine = part["machine"]
        assert machine["threads"] >= 1 and machine["cores"] >= 1 and machine["load_1min"] >= 0, name
        assert f"load average {machine['load_1min']:.2f}" in r.stdout
    values = dict(figures(report))
    assert all(math.isfinite(v) and v >= 0 for v in values.values()), values
    for key in ("ratio_ours_vs_hf", "batch8_vs_batch1", "bf16_weights_speedup_batch1", "share_of_floor_fp32", "compiled_vs_eager_batch1",
                "time_ratio_ours_vs_hf", "adamw_fused_s", "tokens_per_s_grouped", "rules_step_after_1000_us"):
        assert values[key] > 0, key
    assert report["train"]["padding_grouped"] <= report["train"]["padding_ungrouped"]
    assert [(row["other_core_busy"]) for row in report["rules"]["decode"]] == [False, True]


def test_an_unknown_bench_is_a_one_line_error():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "bench.py"), "speed"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and r.stderr.strip() == "error: unknown bench 'speed': expected generate, train, rules, all or gpu"
