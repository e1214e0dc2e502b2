"""tests/gpu_check.py, the one command for a GPU machine, on the CPU: its report from pytest's real JUnit XML and a
bench report, and its refusal where there is no GPU."""
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
import gpu_check  # noqa: E402


def test_the_report_names_each_test_and_tables_each_bench_section(tmp_path):
    (tmp_path / "test_some.py").write_text(
        "import pytest\n"
        "def test_fine():\n    assert True\n"
        "def test_broken():\n    assert 1 == 2, 'one is not two'\n"
        "@pytest.mark.skipif(True, reason='needs a CUDA GPU')\ndef test_gpu():\n    pass\n")
    xml = tmp_path / "tests.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    str(tmp_path / "test_some.py")], capture_output=True, cwd=tmp_path)
    tests = gpu_check.test_outcomes(xml)
    assert (tests["passed"], tests["failed"], tests["skipped"]) == (1, 1, 1)
    assert {t["name"]: t["outcome"] for t in tests["tests"]} == {"test_fine": "passed", "test_broken": "failed",
                                                                 "test_gpu": "skipped"}
    tests["error"] = "exit 1"  # as main() records pytest's exit status when a test failed
    bench = {"device": "NVIDIA H200", "torch": "2.11.0",
             "scoring": {"pairs": 400, "float32_rules_ratio": 1.23456},
             "refill": [{"prompts": 50, "batch": 8, "speedup": 1.5}, {"prompts": 805, "batch": 32, "speedup": 2.25}],
             "evaluation": {"error": "RuntimeError: out of | memory"}}
    text = gpu_check.markdown({"started": "2026-12-04 13:00 UTC", "wall_s": 290.4, "tests": tests, "bench": bench,
                               "bench_error": "exit 1"})
    assert "1 passed, 1 failed, 1 skipped" in text and "one is not two" in text and "- device: NVIDIA H200" in text
    assert "error: exit 1" in text and "| test_broken | failed |" in text  # the status, and which test failed
    assert "| float32_rules_ratio | 1.23 |" in text
    assert "| prompts | batch | speedup |" in text and "| 805 | 32 | 2.25 |" in text
    assert "| error | RuntimeError: out of / memory |" in text  # a cell cannot break the table
    assert text.rstrip().endswith("bench: exit 1")
    gpu_check.write(tmp_path, {"tests": tests, "bench": bench})
    assert sorted(p.name for p in tmp_path.glob("gpu_report*")) == ["gpu_report.json", "gpu_report.md"]


def test_the_carried_tokenizer_files_win_over_a_preset_cache_dir(tmp_path):
    preset = {"TIKTOKEN_CACHE_DIR": "/opt/tiktoken_cache", "PATH": "/bin"}
    assert gpu_check.child_env(preset, tmp_path)["TIKTOKEN_CACHE_DIR"] == "/opt/tiktoken_cache"  # nothing carried
    (tmp_path / ".tiktoken").mkdir()
    env = gpu_check.child_env(preset, tmp_path)
    assert env["TIKTOKEN_CACHE_DIR"] == str(tmp_path / ".tiktoken") and env["PATH"] == "/bin"
    assert preset["TIKTOKEN_CACHE_DIR"] == "/opt/tiktoken_cache"  # the caller's environment is left alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is here: the check would run")
def test_without_a_gpu_it_says_so_in_one_line_and_writes_nothing(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: no CUDA GPU here") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), "--fast"], capture_output=True, text=True,
                       cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("usage:"), r.stderr


def test_an_earlier_report_or_a_file_as_out_dir_is_refused_before_anything_runs(tmp_path):
    """Checked before the GPU is looked for: the same on a CPU and on a GPU machine."""
    (tmp_path / "gpu_report.json").write_text("{}")
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), str(tmp_path)], capture_output=True,
                       text=True, cwd=ROOT)
    assert r.returncode == 1 and "holds an earlier report" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert (tmp_path / "gpu_report.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == [
        "gpu_report.json"]
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "gpu_check.py"), str(tmp_path / "gpu_report.json")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and "is a file, not a directory" in r.stderr, r.stderr


def test_the_gpu_bench_refuses_a_section_it_does_not_have():
    r = subprocess.run([sys.executable, str(ROOT / "tests" / "bench.py"), "gpu", "--only=refil,decode"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1 and r.stderr.startswith("error: --only=refil,decode: no section 'refil'"), r.stderr
    assert r.stderr.count("\n") == 1
