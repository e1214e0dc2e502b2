"""data/*/prepare.py against the fake hub, serving small files in each dataset's real format."""
import csv
import io
import json
import os
import random
import subprocess
import sys
import urllib.parse

import pytest
from conftest import ROOT

import chat


def prepare(name, fake_hub, out_dir, **env):
    return subprocess.run([sys.executable, str(ROOT / "data" / name / "prepare.py"), f"--out_dir={out_dir}"],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "HF_ENDPOINT": fake_hub.url, **env})


def serve(fake_hub, repo, filename, data):
    fake_hub.add(f"/datasets/{repo}/resolve/main/{urllib.parse.quote(filename)}", data, lfs=True)


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


def texts(conversations):
    return [[m["content"] for m in c] for c in conversations]


def no_overlap(tmp_path, name):
    """No validation conversation is also a training conversation (in their chat-format tokens)."""
    val = tmp_path / f"{name}_val.jsonl"
    train = {tuple(chat.encode_chat(c)[0]) for c in read(tmp_path / f"{name}_train.jsonl")}
    assert not val.exists() or not any(tuple(chat.encode_chat(c)[0]) in train for c in read(val))


def test_validation_never_repeats_a_training_conversation(tmp_path, capsys):
    pair = lambda q, a: [{"role": "user", "content": q}, {"role": "assistant", "content": a}]  # noqa: E731
    train = [pair("Q1", "A1"), pair("Q2", "A2\r\nmore")]
    val = [pair("Q1", "A1"), pair("Q2", "A2\nmore"), pair("Q3", "A3")]  # two copies: one after normalizing line ends
    chat.write_sets(tmp_path, "t", train, val)
    assert texts(read(tmp_path / "t_val.jsonl")) == [["Q3", "A3"]]
    assert "dropped 2 validation conversations" in capsys.readouterr().out
    assert texts(read(tmp_path / "t_train.jsonl"))[1] == ["Q2", "A2\nmore"]  # \r\n -> \n
    chat.write_sets(tmp_path, "t", train)  # no validation set now: the old file must not linger
    assert not (tmp_path / "t_val.jsonl").exists()
    # the shuffled splits (LIMA, Dolly) go through the same check
    chat.write_split(tmp_path, "s", [pair("Same", "Same")] * 10 + [pair("Other", "x")], n_val=3)
    no_overlap(tmp_path, "s")


def test_normalize_writes_every_line_end_as_a_newline():
    code = "def f():\r\n    return re.sub(' ', ':', text)\r"  # MBPP task 732's code ends in a lone \r
    messages = [{"role": "user", "content": "old Mac\rtext\r\r\n"}, {"role": "assistant", "content": code}]
    assert chat.normalize(messages) == [{"role": "user", "content": "old Mac\ntext\n\n"},
                                        {"role": "assistant", "content": "def f():\n    return re.sub(' ', ':', text)\n"}]


def poetry_csv(rows):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")  # as the hub's file: CRLF rows, quoted multi-line fields
    w.writerow(["author", "content", "poem name", "age", "type"])
    w.writerows(rows)
    return buf.getvalue().encode()


def test_poetry_is_every_titled_row_of_the_first_thousand(fake_hub, tmp_path):
    rows = [["A. Poet", f'Line one, "quoted",\r\nline two of poem {i}\r\n', f"Poem {i}", "Modern", "Love"] for i in range(1003)]
    rows[5][2] = ""  # untitled: skipped, as make_poetry.py skips None
    rows[6][2] = "NA"  # untitled too: datasets reads the CSV with pandas, which reads NA as missing (None)
    rows[7][2] = "  "  # a title of spaces is not None: make_poetry.py keeps it
    rows[9] = rows[8]  # a poem listed twice: the official set keeps both
    serve(fake_hub, "merve/poetry", "poetry.csv", poetry_csv(rows))
    (tmp_path / "poetry_val.jsonl").write_text("stale\n")
    r = prepare("poetry", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 2 rows" in r.stdout and "998 train, 0 val" in r.stdout
    train = texts(read(tmp_path / "poetry_train.jsonl"))
    assert len(train) == 998 and train[0] == ["Write a poem called Poem 0", 'Line one, "quoted",\nline two of poem 0\n']
    assert train[5][0] == "Write a poem called   " and train[6] == train[7]
    assert ["Write a poem called Poem 999", rows[999][1].replace("\r\n", "\n")] == train[-1]
    assert not (tmp_path / "poetry_val.jsonl").exists()  # every titled row trains: no validation set


@pytest.mark.parametrize("poem, why", [("", "has no poem"), ("null", "has no poem"), (" \r\n", "has a blank poem")])
def test_poetry_stops_at_a_titled_row_without_a_poem(fake_hub, tmp_path, poem, why):
    # make_poetry.py would keep the row: a missing poem (None) fails the official training, a blank one trains
    # <|endoftext|> alone, which chat.py refuses; either way the script says which row, and writes nothing
    rows = [["A. Poet", f"Poem {i}", f"Title {i}", "Modern", "Love"] for i in range(5)]
    rows[3][1] = poem
    serve(fake_hub, "merve/poetry", "poetry.csv", poetry_csv(rows))
    r = prepare("poetry", fake_hub, tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"row 3 (make_poetry.py's merve_poetry_3, titled 'Title 3') {why}" in r.stderr
    assert not (tmp_path / "poetry_train.jsonl").exists()


def test_gsm8k_is_the_first_thousand_of_train_validated_on_test(fake_hub, tmp_path):
    train = [{"question": f"Tom has {i} apples. How many?", "answer": f"He has {i}.\n#### {i}"} for i in range(1100)]
    test = [{"question": f"Ann has {i} pears?", "answer": f"#### {i}"} for i in range(230)]
    serve(fake_hub, "openai/gsm8k", "main/train-00000-of-00001.parquet", parquet(train))
    serve(fake_hub, "openai/gsm8k", "main/test-00000-of-00001.parquet", parquet(test))
    r = prepare("gsm8k", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert texts(read(tmp_path / "gsm8k_train.jsonl")) == [[r["question"], r["answer"]] for r in train[:1000]]
    assert texts(read(tmp_path / "gsm8k_val.jsonl")) == [[r["question"], r["answer"]] for r in test[:200]]


def test_mbpp_is_its_train_split_validated_on_its_validation_split(fake_hub, tmp_path):
    for split, n in (("train", 37), ("test", 25), ("validation", 9), ("prompt", 5)):
        rows = [{"task_id": i, "text": f"Write a function for {split} {i}.", "code": f"def f():\r\n    return {i}\r\n",
                 "test_list": ["assert f()"]} for i in range(n)]
        rows[4]["code"] = "def f():\r\n    return 4\r"  # as task 732's code: a lone \r at the end
        serve(fake_hub, "google-research-datasets/mbpp", f"full/{split}-00000-of-00001.parquet", parquet(rows))
    r = prepare("mbpp", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    train, val = texts(read(tmp_path / "mbpp_train.jsonl")), texts(read(tmp_path / "mbpp_val.jsonl"))
    assert len(train) == 37 and len(val) == 9
    assert train[3] == ["Write a function for train 3.", "def f():\n    return 3\n"]  # CRLF -> LF
    assert train[4] == ["Write a function for train 4.", "def f():\n    return 4\n"]  # CR -> LF
    assert all("test" not in q and "prompt" not in q for q, _ in train + val)


KFR = "Food Ingredients and Recipe Dataset with Image Name Mapping.csv"


def test_recipes_from_the_csv_with_spaces_in_its_name(fake_hub, tmp_path):
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["", "Title", "Ingredients", "Instructions", "Image_Name", "Cleaned_Ingredients"])
    for i in range(1060):
        ingredients = repr([f"{i} cups flour, sifted", 'a "pinch" of salt', "1 egg's yolk"])
        w.writerow([i, f"Cake {i}", ingredients, f"Mix.\nBake {i} minutes.", f"cake-{i}", ingredients])
    text = buf.getvalue().splitlines(keepends=True)
    rows = list(csv.reader(io.StringIO(buf.getvalue())))
    rows[3][1] = ""  # no title
    rows[4][3] = ""  # no instructions
    rows[5][5] = "__import__('os').system('echo pwned')"  # not a literal: skipped, never run
    rows[6][5] = "['unclosed"
    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    assert len(text) > 1060  # multi-line quoted fields
    serve(fake_hub, "Hieu-Pham/kaggle_food_recipes", KFR, buf.getvalue().encode())
    r = prepare("recipes", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 4 of the first 1000 rows" in r.stdout and "pwned" not in r.stdout + r.stderr
    train, val = texts(read(tmp_path / "recipes_train.jsonl")), texts(read(tmp_path / "recipes_val.jsonl"))
    assert len(train) == 996 and len(val) == 50
    assert train[0] == ["Recipe for Cake 0", ' - 0 cups flour, sifted\n - a "pinch" of salt\n - 1 egg\'s yolk\n'
                                             "\n\nMix.\nBake 0 minutes."]
    assert val[0][0] == "Recipe for Cake 1000" and val[-1][0] == "Recipe for Cake 1049"
    ids, _ = chat.encode_chat(read(tmp_path / "recipes_train.jsonl")[0])  # the chat format strips the turn, as
    assert "<|assistant|>\n- 0 cups" in chat.tokenizer().decode(ids)   # open-instruct does: the first " - " loses its space


def pgn_game(i, moves=True, white=True):
    lines = [f'[Event "Rated Blitz game {i}"]', '[Site "https://lichess.org/x"]', '[White "a"]', '[Black "b"]']
    lines += [f'[WhiteElo "{1500 + i}"]'] if white else []
    lines += [f'[BlackElo "{1400 + i}"]', '[Opening "?"]', ""]
    lines += [f"1. e4 e5 2. Nf3 Nc6 {i}. Bb5 1-0", ""] if moves else ["0-1", ""]
    return lines


def test_chess_streams_the_first_thousand_games_from_the_listed_files(fake_hub, tmp_path):
    games = [pgn_game(i, moves=i != 7, white=i != 11) for i in range(1200)]
    first = "\r\n".join(line for g in games[:600] for line in g) + "\r\n"
    second = "\n".join(line for g in games[600:] for line in g) + "\n"
    repo = "patrickfrank1/chess-pgn-games"
    serve(fake_hub, repo, "data/lichess_db_standard_rated_2013-02.txt", second.encode())  # listed out of order
    serve(fake_hub, repo, "data/lichess_db_standard_rated_2013-01.txt", first.encode())
    serve(fake_hub, repo, "data/lichess_db_standard_rated_2013-01.pgn.zst", b"\x28\xb5\x2f\xfd")  # compressed: not read
    serve(fake_hub, repo, "README.md", b"# chess\n")
    fake_hub.page = 2  # the listing comes in pages, linked by rel="next"
    r = prepare("chess", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "skipped 2 games" in r.stdout
    train, val = texts(read(tmp_path / "chess_train.jsonl")), texts(read(tmp_path / "chess_val.jsonl"))
    assert len(train) == 1000 and len(val) == 50
    assert train[0] == ['[WhiteElo "1500"]\n[BlackElo "1400"]\n', "1. e4 e5 2. Nf3 Nc6 0. Bb5 1-0"]
    kept = [i for i in range(1200) if i not in (7, 11)]
    assert [int(t[0].split('"')[1]) - 1500 for t in train + val] == kept[:1050]
    assert not fake_hub.gets(".zst") and len(fake_hub.gets("2013-02.txt")) == 1


def test_alpaca_ranking_set_draws_the_official_templates(fake_hub, tmp_path):
    rows = [{"instruction": f"  Do task {i}. ", "input": f"input {i}" if i % 3 == 0 else "", "output": f" Result {i}\n",
             "text": "ignored"} for i in range(1010)]
    serve(fake_hub, "tatsu-lab/alpaca", "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet", parquet(rows))
    serve(fake_hub, "tatsu-lab/alpaca", "alpaca_data.json", b"[]")
    r = prepare("alpaca", fake_hub, tmp_path)
    assert r.returncode == 0, r.stderr
    got = chat.read_instructions(tmp_path / "alpaca.jsonl")
    assert len(got) == 1000
    # random.choices(templates, weights) takes one random() per call and picks where it falls in the cumulative
    # weights: with instruction_encode_templates.py's weights, seeded 42 as reformat_datasets.py is
    rng, weights = random.Random(42), [.2, .1, .1] + [.05] * 10 + [.1]  # the same for both template lists
    for i, row in enumerate(got):
        u, k = rng.random() * sum(weights), 0
        while u >= sum(weights[:k + 1]):
            k += 1
        if i % 3 == 0:  # the first template with an input is "{instruction}\n\n{input}\n\n"; the last, Alpaca's own
            assert (k == 0) == (row["instruction"] == f"Do task {i}.\n\ninput {i}\n\n"), i
            assert (k == 13) == row["instruction"].startswith("Below is an instruction that describes a task, paired")
        else:
            assert (k == 2) == (row["instruction"] == f"Do task {i}." and row["reference"] == f"\nResult {i}"), i
            assert (k == 13) == row["instruction"].endswith(f"### Instruction:\nDo task {i}.\n\n### Response:")
        assert row["reference"].strip() == f"Result {i}" and row["dataset"] == "stanford_alpaca"


@pytest.mark.parametrize("name", ["lima", "dolly", "gsm8k", "mbpp", "poetry", "recipes", "chess", "alpaca", "alpaca_eval"])
def test_prepare_scripts_take_help_and_refuse_other_arguments(fake_hub, tmp_path, name):
    work = tmp_path / "work"  # beside the fake hub's cache folder
    work.mkdir()
    r = prepare(name, fake_hub, work)  # the fake hub serves nothing: one line that says what is missing
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: "), r.stderr
    asked = len(fake_hub.requests)
    script = str(ROOT / "data" / name / "prepare.py")
    r = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True, cwd=work,
                       env={**os.environ, "HF_ENDPOINT": fake_hub.url})
    assert r.returncode == 0 and "python data/" in r.stdout and "--out_dir=DIR" in r.stdout
    assert len(fake_hub.requests) == asked  # --help downloads nothing
    r = subprocess.run([sys.executable, script, "--outdir=x"], capture_output=True, text=True, cwd=work)
    assert r.returncode == 1 and r.stderr == "error: unknown argument '--outdir=x' (the one flag is --out_dir=DIR; see --help)\n"
    r = subprocess.run([sys.executable, script, "--out_dir="], capture_output=True, text=True, cwd=work,
                       env={**os.environ, "HF_ENDPOINT": fake_hub.url})
    assert r.returncode == 1 and r.stderr == "error: --out_dir is empty; name a directory, e.g. --out_dir=.\n"
    assert len(fake_hub.requests) == asked  # refused before a download (it used to write 11 files into the cwd)
    assert list(work.iterdir()) == []  # nothing written anywhere, no folder named after a flag
