"""
Every GPU check and measurement in one command, on a machine with a CUDA GPU: tests/test_cuda.py, then
`tests/bench.py gpu`, into one report.

    python tests/gpu_check.py [OUT_DIR]     # default out/gpu; at most 300 + 240 s

Writes OUT_DIR/gpu_report.json (the tests' outcomes and every bench figure) and gpu_report.md (the same as
tables), with the two logs beside them (tests.log, bench.log); an OUT_DIR that holds an earlier report is refused. The report is rewritten after each part, so a run
cut short keeps what it measured. Exit 1 if a test failed or a bench section failed (the report says which).

The GPT-2 BPE files: tiktoken reads them from TIKTOKEN_CACHE_DIR, or from ../shared/tiktoken beside the
repository (tests/conftest.py). On a machine that has neither (a lent GPU gets the repository alone), copy
../shared/tiktoken to .tiktoken/ in the repository (git ignores it) and take it along: this script then points
TIKTOKEN_CACHE_DIR at it, over any value the machine had.
"""
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS_TIMEOUT = 300  # seconds for tests/test_cuda.py (it compiles about 20 graphs)
BENCH_TIMEOUT = 240  # seconds for tests/bench.py gpu; its sections are written as they finish, train steps last


def test_outcomes(junit_xml):
    """{'passed', 'failed', 'skipped', 'tests': [{name, outcome, seconds, message}]} from pytest's JUnit XML."""
    tests = []
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "")[:300]
            elif child.tag == "skipped":
                outcome, message = "skipped", (child.get("message") or "")[:300]
        tests.append({"name": case.get("name"), "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
    return {**counts, "tests": tests}


def cell(value):
    """A table cell: numbers to 3 significant figures, the rest as text."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value).replace("|", "/").replace("\n", " ")
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(rows):
    """A markdown table of dicts, one column per key in the order first seen."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(cell(row.get(k, "")) for k in keys) + " |" for row in rows]
    return lines


def markdown(report):
    """The report as markdown: the machine, the tests (failures named), then each bench section as a table."""
    lines = ["# GPU report", "", f"{report.get('started', '')}, {report.get('wall_s', 0):.0f} s in all", ""]
    bench = report.get("bench") or {}
    for key in ("device", "nvidia_smi", "torch"):
        if key in bench:
            lines.append(f"- {key}: {bench[key]}")
    tests = report.get("tests")
    lines += ["", "## tests/test_cuda.py", ""]
    if tests is None:
        lines.append("not run")
    if tests and "error" in tests:  # pytest's exit status: with failures, the table below names them
        lines.append(f"error: {tests['error']}")
    if tests and "tests" in tests:
        lines.append(f"{tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped")
        lines += [""] + table([{"test": t["name"], "outcome": t["outcome"], "s": t["seconds"],
                                "message": t["message"][:120]} for t in tests["tests"]])
    for key, section in bench.items():
        if key in ("device", "nvidia_smi", "torch"):
            continue
        lines += ["", f"## {key}", ""]
        if isinstance(section, dict):
            lines += table([{"what": k, "value": v} for k, v in section.items()])
        elif isinstance(section, list):
            lines += table(section)
        else:
            lines.append(cell(section))
    if report.get("bench_error"):
        lines += ["", f"bench: {report['bench_error']}"]
    return "\n".join(lines) + "\n"


def write(out, report):
    """gpu_report.json and .md, each whole or not at all (temp file and rename)."""
    for name, text in (("gpu_report.json", json.dumps(report, indent=2)), ("gpu_report.md", markdown(report))):
        tmp = out / f"{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def child_env(environ, root):
    """The tests' and the bench's environment: unbuffered output, and the tokenizer files carried in
    root/.tiktoken, if there, over any TIKTOKEN_CACHE_DIR the machine presets (a lent H200 presets one without
    GPT-2's files)."""
    env = dict(environ, PYTHONUNBUFFERED="1")
    if (Path(root) / ".tiktoken").is_dir():
        env["TIKTOKEN_CACHE_DIR"] = str(Path(root) / ".tiktoken")
    return env


def run(command, log, timeout, env):
    """Run `command` from the repository root, its output to `log`; None, or why it did not finish well."""
    with open(log, "w") as f:
        try:
            code = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                                  timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return f"stopped after {timeout} s"
    return None if code == 0 else f"exit {code}"


def main(argv):
    import torch
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        sys.exit("usage: python tests/gpu_check.py [OUT_DIR]")
    out = Path(argv[0] if argv else ROOT / "out" / "gpu")
    if out.exists() and not out.is_dir():
        sys.exit(f"error: OUT_DIR={out} is a file, not a directory")
    if (out / "gpu_report.json").exists():  # an earlier run's measurements are not ours to replace
        sys.exit(f"error: OUT_DIR={out} holds an earlier report (gpu_report.json): give another OUT_DIR")
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA GPU here: tests/gpu_check.py measures a GPU (without one, run python -m pytest tests)")
    out.mkdir(parents=True, exist_ok=True)
    env = child_env(os.environ, ROOT)
    t0 = time.time()
    report = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "wall_s": 0.0, "tests": None,
              "bench": None}
    junit = out / "tests.xml"
    why = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "tests/test_cuda.py"], out / "tests.log", TESTS_TIMEOUT, env)
    report["tests"] = test_outcomes(junit) if junit.exists() else {"error": why or "no JUnit XML written"}
    if why and junit.exists():
        report["tests"]["error"] = why
    report["wall_s"] = time.time() - t0
    write(out, report)
    bench_json = out / "bench.json"
    why = run([sys.executable, "tests/bench.py", "gpu", str(bench_json)], out / "bench.log", BENCH_TIMEOUT, env)
    if bench_json.exists():
        report["bench"] = json.loads(bench_json.read_text())
    report["bench_error"] = why
    report["wall_s"] = time.time() - t0
    write(out, report)
    failed = report["tests"].get("failed", 0) or "error" in report["tests"] or why
    print(markdown(report))
    if failed:
        sys.exit(f"error: see {out / 'gpu_report.md'}: tests {report['tests'].get('error', '')} "
                 f"{report['tests'].get('failed', '?')} failed; bench: {why or 'complete'}")


if __name__ == "__main__":
    main(sys.argv[1:])
