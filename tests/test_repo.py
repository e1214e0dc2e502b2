"""The repository keeps its promises: CI runs the README's test command, the scripts fail politely, and the code
reads top to bottom (scripts import helpers, never each other; every function fits on a screen)."""
import ast
import re
import subprocess
import sys

from conftest import ROOT


def readme_commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_ci_runs_the_readme_test_command():
    test_command = next(c for c in readme_commands() if "pytest" in c)
    run_part = test_command.split("&& ", 2)[-1]  # after creating and activating the virtualenv
    assert run_part in (ROOT / ".ci" / "run").read_text()


def test_runtime_requirements_are_the_four_allowed():
    names = [re.split(r"[<>=]", line)[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert names == ["torch", "numpy", "tiktoken", "tqdm"]


def run(script, *args):
    return subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT)


def test_sample_cli_answers_a_prompt_and_fails_in_one_line(small_hf, tmp_path):
    _, directory = small_hf
    ok = run("sample.py", f"--init_from={directory}", "--prompt=Write a poem called Rain", "--max_new_tokens=8")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and "<|assistant|>" not in ok.stdout  # only the response is printed
    for args, message in [((f"--init_from={tmp_path}/missing", "--prompt=x"), "no such file"),
                          (("--nonsense=1",), "unknown argument '--nonsense=1'"),
                          ((f"--init_from={directory}", "--max_new_tokens=many"), "expected int"),
                          ((f"--init_from={directory}", "--dtype=float8"), "--dtype=float8")]:
        bad = run("sample.py", *args)
        assert bad.returncode == 1 and bad.stdout == ""
        assert bad.stderr.count("\n") == 1 and message in bad.stderr, bad.stderr


def test_help_lists_every_flag_with_its_default():
    out = run("sample.py", "--help")
    assert out.returncode == 0
    for flag in ("--init_from=gpt2", "--max_new_tokens=1024", "--rules=none", "--greedy=True", "--device=auto", "--dtype=auto"):
        assert flag in out.stdout


SCRIPTS = {"train", "sample", "evaluate", "similarity", "epochs", "experiment", "exercises"}


def sources():
    """Every Python file of the repository but the tests, as {path: syntax tree}."""
    paths = sorted(ROOT.glob("*.py")) + sorted((ROOT / "data").glob("*/*.py"))
    return {path: ast.parse(path.read_text(), filename=str(path)) for path in paths}


def test_no_script_imports_a_script():
    """A reader of sample.py or evaluate.py never has to open train.py: what they share lives in a helper
    (the side programs too: similarity.py, epochs.py, data/tinyworld/experiment.py)."""
    bad = []
    for path, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]  # None for `from . import x`
            else:
                continue
            bad += [f"{path.name}:{node.lineno} imports {name}" for name in names if name.split(".")[0] in SCRIPTS]
    assert not bad, bad


def test_no_call_passes_seven_positional_arguments():
    """Seven positional arguments are read by counting (issue 20): a call that needs that many names them."""
    crowded = []
    for path, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and len(node.args) >= 7:
                crowded.append(f"{path.name}:{node.lineno} {ast.unparse(node.func)}")
    assert not crowded, crowded


def test_every_function_fits_on_a_screen():
    long = [f"{path.name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path, tree in sources().items() for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80]
    assert not long, long
    # model.py holds the network and generation only: 18.9k characters in 320 lines before the lines
    # were cut under 100 characters, 21.2k in 410 after; counted in characters so that wrapping is free
    assert len((ROOT / "model.py").read_text()) <= 22_000
    # evaluate.py is one program (issue 20): the models' measurements and the paper's comparison; the
    # other experiments are programs of their own
    assert len((ROOT / "evaluate.py").read_text().splitlines()) <= 450
