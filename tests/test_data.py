"""data/*/prepare.py against the fake hub, serving small files in each dataset's real format."""
import csv
import io
import json
import subprocess
import sys

import pytest
from conftest import ROOT

import chat


def prepare(name, fake_hub, out_dir, **env):
    import os
    return subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), f"--out_dir={out_dir}"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_ENDPOINT": fake_hub.url, **env})


def serve(fake_hub, repo, filename, data):
    fake_hub.add(f"/datasets/{repo}/resolve/main/{filename}", data, lfs=True)


def read(path):
    return [row["messages"] for row in map(json.loads, open(path, encoding="utf-8"))]


def test_lima_and_its_response_only_variant(fake_hub, tmp_path):
    rows = [{"conversations": [f"Question {i}?", f"Answer {i}."], "source": "test"} for i in range(34)]
    rows.append({"conversations": ["First?", "One.", "Second?", "Two."], "source": "multi"})
    serve(fake_hub, "GAIR/lima", "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    r = prepare("lima", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "5 train, 30 val" in r.stdout
    train, val = read(tmp_path / "lima_train.jsonl"), read(tmp_path / "lima_val.jsonl")
    assert (len(train), len(val)) == (5, 30)
    responses = read(tmp_path / "lima_responses_train.jsonl")
    for full, empty in zip(train, responses):  # same split, same order, only the user turns emptied
        assert [m["content"] if m["role"] == "assistant" else "" for m in full] == [m["content"] for m in empty]
    ids, _ = chat.encode_chat(responses[0])
    assert chat.tokenizer().decode(ids).startswith("<|user|>\n\n<|assistant|>\n")  # the paper's exact format
    all_rows = train + val
    assert sum(len(c) == 4 for c in all_rows) == 1 and [m["role"] for c in all_rows for m in c if len(c) == 4] == \
        ["user", "assistant", "user", "assistant"]


def test_lima_gated_names_the_open_alternative(fake_hub, tmp_path):
    serve(fake_hub, "GAIR/lima", "train.jsonl", b"{}\n")
    fake_hub.token = "needed"
    r = prepare("lima", fake_hub, tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "HTTP 401" in r.stderr and "HF_TOKEN" in r.stderr and "data/dolly/prepare.py" in r.stderr


def test_poetry_reads_real_csv(fake_hub, tmp_path):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["author", "content", "poem name", "age", "type"])
    for i in range(24):
        w.writerow(["A. Poet", f'Line one, "quoted",\r\nline two of poem {i}\r\n', f"Poem {i}", "Modern", "Love"])
    w.writerow(["Anon", "A poem without a title", "", "Modern", "Love"])
    serve(fake_hub, "merve/poetry", "poetry.csv", buf.getvalue().encode())
    r = prepare("poetry", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read(tmp_path / "poetry_train.jsonl") + read(tmp_path / "poetry_val.jsonl")
    assert len(rows) == 24 and len(read(tmp_path / "poetry_val.jsonl")) == 20
    poem = next(c for c in rows if c[0]["content"] == "Write a poem called Poem 3")
    assert poem[1]["content"] == 'Line one, "quoted",\r\nline two of poem 3'


def test_dolly_puts_context_in_the_user_turn(fake_hub, tmp_path):
    rows = [{"instruction": f"Do {i}", "context": "Some passage." if i % 2 else "", "response": f"Done {i}",
             "category": "open_qa"} for i in range(305)]
    rows.append({"instruction": "Empty", "context": "", "response": " ", "category": "x"})
    serve(fake_hub, "databricks/databricks-dolly-15k", "databricks-dolly-15k.jsonl",
          "".join(json.dumps(r) + "\n" for r in rows).encode())
    r = prepare("dolly", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    rows = read(tmp_path / "dolly_train.jsonl") + read(tmp_path / "dolly_val.jsonl")
    assert len(rows) == 305 and len(read(tmp_path / "dolly_val.jsonl")) == 300
    by_user = {c[0]["content"]: c[1]["content"] for c in rows}
    assert by_user["Do 3\n\nSome passage."] == "Done 3" and by_user["Do 4"] == "Done 4"
    assert all(c[0]["content"] == "" for c in read(tmp_path / "dolly_responses_train.jsonl"))


def parquet(rows):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def test_gsm8k_from_parquet(fake_hub, tmp_path):
    rows = [{"question": f"Tom has {i} apples. How many?", "answer": f"He has {i}.\n#### {i}"} for i in range(210)]
    serve(fake_hub, "openai/gsm8k", "main/train-00000-of-00001.parquet", parquet(rows))
    r = prepare("gsm8k", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    train = read(tmp_path / "gsm8k_train.jsonl")
    assert len(train) == 10 and train[0][1]["content"].split("#### ")[1] in train[0][0]["content"]


def test_mbpp_from_its_four_parquet_files(fake_hub, tmp_path):
    for split, n in (("train", 20), ("test", 25), ("validation", 10), ("prompt", 5)):
        rows = [{"task_id": i, "text": f"Write a function for {split} {i}.", "code": f"def f():\n    return {i}",
                 "test_list": ["assert f()"]} for i in range(n)]
        serve(fake_hub, "google-research-datasets/mbpp", f"full/{split}-00000-of-00001.parquet", parquet(rows))
    r = prepare("mbpp", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(read(tmp_path / "mbpp_train.jsonl")) == 10 and len(read(tmp_path / "mbpp_val.jsonl")) == 50


def test_real_lima_file_loads_unchanged_when_present():
    path = ROOT.parent / "shared" / "data" / "lima_data.jsonl"
    if not path.is_file():
        pytest.skip("the paper's LIMA copy is not beside the repository")
    conversations = chat.read_conversations(path)
    assert len(conversations) == 1030 and sum(len(c) > 2 for c in conversations) == 30


def test_alpaca_eval_prompts_with_references(fake_hub, tmp_path):
    rows = [{"instruction": f"Question {i}?", "output": f"Answer {i}.", "generator": "text_davinci_003",
             "dataset": "helpful_base"} for i in range(7)]
    serve(fake_hub, "tatsu-lab/alpaca_eval", "alpaca_eval.json", json.dumps(rows).encode())
    r = prepare("alpaca_eval", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    got = chat.read_instructions(tmp_path / "alpaca_eval.jsonl")
    assert got[3] == {"instruction": "Question 3?", "reference": "Answer 3.", "dataset": "helpful_base"}
    assert len(got) == 7
