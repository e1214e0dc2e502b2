"""Malformed inputs end in one line naming the file, line and field: checkpoints (non-finite weights, impossible
sizes in config.json or a bare .safetensors file), JSONL rows (unhashable roles, absurd nesting) and the data
checker `python chat.py FILE.jsonl`, which lists every malformed line."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, SMALL
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import save_file

import chat
from checkpoint import config_from_hf_json, load_safetensors
from model import GPT

DEEP = "[" * 100_000  # json.loads raises RecursionError long before the end
GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
tmp_ok = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def one_line(e, *parts):
    text = str(e.value)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


# ------------------------------------------------------------------------------------------------ checkpoints

@tmp_ok
@given(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       st.sampled_from([float("nan"), float("inf"), float("-inf")]), st.integers(0, 11))
def test_non_finite_tensor_is_refused(tmp_path, dtype, value, where):
    t = torch.zeros(12, dtype=dtype)
    t[where] = value
    path = tmp_path / "w.safetensors"
    save_file({"ok": torch.ones(3), "bad": t}, path)
    with pytest.raises(ValueError) as e:
        load_safetensors(path)
    one_line(e, str(path), "tensor 'bad'", "1 NaN or Inf")


def test_large_finite_float16_is_accepted(tmp_path):
    # their float16 sum overflows to inf: the loader's quick test must fall back to counting, and find none
    path = tmp_path / "big.safetensors"
    save_file({"big": torch.full((100,), 60000.0, dtype=torch.float16)}, path)
    assert load_safetensors(path)[0]["big"].eq(60000).all()


def test_non_finite_checkpoint_directory(small_hf, tmp_path):
    hf, directory = small_hf
    sd = {k: v.clone().contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["transformer.h.1.mlp.c_fc.weight"][3, 5] = float("nan")
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(tmp_path)
    assert one_line(e) == (f"{tmp_path / 'model.safetensors'}: tensor 'transformer.h.1.mlp.c_fc.weight' has 1 NaN "
                           f"or Inf values (a diverged or corrupted checkpoint)")


def small_config(**changes):
    from transformers import GPT2Config
    return {**GPT2Config(**SMALL).to_dict(), **changes}


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "expected a JSON object, not a list"),
    ("null", "expected a JSON object, not null"),
    ('"gpt2"', "expected a JSON object, not a string"),
    ("12", "expected a JSON object, not a number"),
    (DEEP, "not valid JSON (nested too deeply)"),
])
def test_config_json_that_is_not_an_object(tmp_path, text, message):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(tmp_path)
    assert one_line(e) == f"{tmp_path / 'config.json'}: {message}"


@tmp_ok
@given(st.sampled_from(["n_layer", "n_head", "n_embd", "n_positions", "vocab_size"]), st.integers(-10**6, 0))
def test_config_json_sizes_must_be_positive(tmp_path, field, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_config(**{field: value})))
    with pytest.raises(ValueError) as e:
        config_from_hf_json(path)
    assert one_line(e) == f"{path}: field '{field}' is {value}; it must be positive"


@tmp_ok
@given(st.integers(1, 200).filter(lambda h: 64 % h))
def test_config_json_heads_must_divide_n_embd(tmp_path, n_head):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_config(n_head=n_head)))
    with pytest.raises(ValueError) as e:
        config_from_hf_json(path)
    assert one_line(e).startswith(f"{path}: field 'n_head' is {n_head}, which does not divide n_embd 64")


@pytest.mark.parametrize("changes, message", [
    ({"n_layer": True}, "missing or non-integer field 'n_layer'"),
    ({"n_embd": 64.0}, "missing or non-integer field 'n_embd'"),
    ({"vocab_size": 3, "token_ids": [1, 2]}, "token_ids has 2 ids for vocab_size 3"),
])
def test_config_json_other_fields(tmp_path, changes, message):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_config(**changes)))
    with pytest.raises(ValueError) as e:
        config_from_hf_json(path)
    one_line(e, str(path), message)


def bare_file(path, n_embd=64, blocks=1, **metadata):
    """A .safetensors file with GPT-2's tensor names but only what config_from_shapes reads (it fails first)."""
    tensors = {"wte.weight": torch.zeros(10, n_embd), "wpe.weight": torch.zeros(8, n_embd)}
    tensors.update({f"h.{i}.ln_1.weight": torch.ones(n_embd) for i in range(blocks)})
    save_file(tensors, path, metadata=metadata)
    return path


@pytest.mark.parametrize("n_head, message", [
    ("3", "metadata 'n_head' is 3, which does not divide n_embd 64"),
    ("0", "metadata 'n_head' is 0; it must be positive"),
    ("-4", "metadata 'n_head' is '-4'; expected a positive integer"),
    ("four", "metadata 'n_head' is 'four'; expected a positive integer"),
    (" 4", "metadata 'n_head' is ' 4'; expected a positive integer"),
    ("4.0", "metadata 'n_head' is '4.0'; expected a positive integer"),
    ("\u0664", "metadata 'n_head' is '\u0664'; expected a positive integer"),  # an Arabic-Indic 4: int() takes it
])
def test_bare_safetensors_head_count(tmp_path, n_head, message):
    path = bare_file(tmp_path / "m.safetensors", n_head=n_head)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(path)
    assert one_line(e).startswith(f"{path}: {message}")


def test_bare_safetensors_shapes(tmp_path):
    path = bare_file(tmp_path / "m.safetensors", n_embd=129)  # GPT-2's 64-dim heads: 129 // 64 = 2 heads
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(path)
    one_line(e, "n_head (n_embd // 64: no metadata 'n_head') is 2, which does not divide n_embd 129")
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(bare_file(path, blocks=0))
    one_line(e, str(path), "the number of blocks (tensors h.N.*) is 0; it must be positive")
    save_file({"wte.weight": torch.zeros(10), "wpe.weight": torch.zeros(8, 4)}, path)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(path)
    one_line(e, str(path), "tensor 'wte.weight' has shape (10,); expected 2 dimensions")


# ------------------------------------------------------------------------------------------------ JSONL rows

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)


@tmp_ok
@given(json_values.filter(lambda v: not isinstance(v, str)))
def test_role_that_is_not_a_string(tmp_path, role):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps({"messages": [{"role": role, "content": "hi"}]}) + "\n")
    with pytest.raises(ValueError) as e:
        chat.read_conversations(path)
    kind = chat.JSON_KINDS[type(role)]
    assert one_line(e) == f"{path}:2: messages[0].role is {kind}; expected system, user or assistant"


def test_long_role_is_quoted_short(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "x" * 10_000, "content": "hi"}]}))
    with pytest.raises(ValueError) as e:
        chat.read_conversations(path)
    assert len(one_line(e, f"{path}:1: messages[0].role is 'xxx", "...; expected system")) < 200


def test_unhashable_role_in_encode_chat():
    with pytest.raises(ValueError, match=r"unknown role \['user'\]"):
        chat.encode_chat([{"role": ["user"], "content": "hi"}])


@pytest.mark.parametrize("reader, good", [(chat.read_conversations, GOOD_ROW), (chat.read_documents, {"text": "a"}),
                                          (chat.read_instructions, {"instruction": "a"}), (chat.jsonl_kind, None)])
@pytest.mark.parametrize("deep", [DEEP, '{"messages": ' + DEEP, '{"a": ' * 100_000])
def test_json_nested_too_deeply(tmp_path, reader, good, deep):
    path = tmp_path / "deep.jsonl"
    path.write_text((json.dumps(good) + "\n" if good else "") + deep + "\n")
    with pytest.raises(ValueError) as e:
        reader(path)
    assert one_line(e) == f"{path}:{2 if good else 1}: malformed JSON (nested too deeply)"


def test_alpaca_eval_list_nested_too_deeply_or_malformed(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(DEEP)
    with pytest.raises(ValueError) as e:
        chat.read_instructions(path)
    assert one_line(e) == f"{path}: malformed JSON (nested too deeply)"
    path.write_text('[\n{"instruction": "a"},\n{oops}\n]')
    with pytest.raises(ValueError) as e:
        chat.read_instructions(path)
    one_line(e, f"{path}:3: malformed JSON (")


# ------------------------------------------------------------------------- every malformed line, in order

EXPECTED = "expected system, user or assistant"
BAD_ROWS = [  # (line, the error it gives after "file:n: ")
    ("{oops", "malformed JSON (Expecting property name enclosed in double quotes, column 2)"),
    ('{"text": "hi"}', "missing field 'messages'"),
    (json.dumps({"messages": [{"role": ["user"], "content": "hi"}]}), f"messages[0].role is a list; {EXPECTED}"),
    (json.dumps({"messages": [{"role": "bot", "content": "hi"}]}), f"messages[0].role is 'bot'; {EXPECTED}"),
    (json.dumps({"messages": [{"content": "hi"}]}), f"messages[0].role is missing; {EXPECTED}"),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}]}), "no assistant turn, so nothing to train on"),
    (DEEP, "malformed JSON (nested too deeply)"),
]


@tmp_ok
@given(st.lists(st.one_of(st.just(None), st.just(""), st.sampled_from(BAD_ROWS)), min_size=1, max_size=30))
def test_scan_reports_every_malformed_line_in_order(tmp_path, rows):
    # None: a good row; "": a blank line (skipped); else a bad row and its error
    lines = [json.dumps(GOOD_ROW) if r is None else r if r == "" else r[0] for r in rows]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines))
    conversations, errors = chat.scan_conversations(path)
    expected = [f"{path}:{n}: {r[1]}" for n, r in enumerate(rows, 1) if isinstance(r, tuple)]
    if not expected and None not in rows:
        expected = [f"{path}: empty file, no conversations"]
    assert errors == expected and len(conversations) == rows.count(None)
    if expected:  # the reader raises the first of the same errors
        with pytest.raises(ValueError) as e:
            chat.read_conversations(path)
        assert str(e.value) == expected[0]
    else:
        assert chat.read_conversations(path) == conversations


def checker(*args):
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_checker_cli(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([json.dumps(GOOD_ROW)] + [row for row, _ in BAD_ROWS] + ["{oops"] * 20))
    r = checker(bad)
    lines = r.stderr.splitlines()
    assert r.returncode == 1 and r.stdout == "" and len(lines) == 21, r.stderr
    assert lines[:len(BAD_ROWS)] == [f"error: {bad}:{n}: {message}" for n, (_, message) in enumerate(BAD_ROWS, 2)]
    assert lines[-1] == f"error: ... and {len(BAD_ROWS)} more malformed lines in {bad}"  # 20 shown of 20 + len

    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps(GOOD_ROW) + "\n\n" + json.dumps(GOOD_ROW) + "\n")
    r = checker(good)
    assert r.returncode == 0 and r.stdout.startswith(f"{good}: 2 conversations (0 multi-turn); tokens:"), r.stderr

    r = checker("--help")
    assert r.returncode == 0 and "python chat.py" in r.stdout and r.stderr == ""
    for args, message in [(["--bogus"], "error: unknown flag '--bogus' (see --help)"),
                          ([tmp_path / "none.jsonl"], f"error: {tmp_path / 'none.jsonl'}: no such file"),
                          ([tmp_path], None),  # not a .jsonl name: a prompt, encoded
                          ([good, "extra"], "error: unexpected argument 'extra' (one file at a time; see --help)")]:
        r = checker(*args)
        if message is None:
            assert r.returncode == 0 and "<|assistant|>" in r.stdout
        else:
            assert r.returncode == 1 and r.stderr == message + "\n", r.stderr
    (tmp_path / "dir.jsonl").mkdir()
    r = checker(tmp_path / "dir.jsonl")
    assert r.returncode == 1 and r.stderr == f"error: {tmp_path / 'dir.jsonl'}: a directory, not a file\n"


def test_checker_cli_on_a_pretraining_file(tmp_path):
    """`python chat.py FILE` reads a file of documents ({"text"}, what train.py pretrains on) as one: its statistics,
    or its malformed lines. (It used to report every line of a good pretraining file as malformed.)"""
    good = tmp_path / "docs.jsonl"
    good.write_text("".join(json.dumps({"text": f"Document {i} is about the sea."}) + "\n" for i in range(500)))
    r = checker(good)
    assert r.returncode == 0 and r.stdout.startswith(f"{good}: 500 documents to pretrain on; tokens"), r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": 3}) + "\n{oops\n")
    r = checker(bad)
    assert r.returncode == 1 and r.stderr.splitlines() == [f"error: {bad}:2: missing string field 'text'",
                                                           f"error: {bad}:3: malformed JSON (Expecting property name "
                                                           f"enclosed in double quotes, column 2)"], r.stderr
