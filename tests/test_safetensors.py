"""Our safetensors reader against the safetensors package, and every way a file can be malformed."""
import json
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import load_file, save_file

from checkpoint import load_safetensors
from model import GPT

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(DTYPES), st.lists(st.integers(0, 5), max_size=3)), min_size=1, max_size=6),
       st.integers(0, 2**31))
def test_reader_equals_safetensors_package(tmp_path_factory, specs, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {f"t{i}": torch.randn(shape, generator=g).to(dtype) for i, (dtype, shape) in enumerate(specs)}
    path = tmp_path_factory.mktemp("st") / "x.safetensors"
    save_file(tensors, path, metadata={"note": "hi"})
    ours, metadata = load_safetensors(path)
    ref = load_file(path)
    assert metadata == {"note": "hi"}
    assert ours.keys() == ref.keys()
    for k in ref:
        assert ours[k].dtype == ref[k].dtype and ours[k].shape == ref[k].shape
        assert torch.equal(ours[k], ref[k])


def write_raw(path, header, data=b"", n=None):
    """A safetensors file from a header dict and data bytes, with an optionally false header length."""
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h) if n is None else n) + h + data)
    return path


GOOD = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}


def test_good_raw_file_reads(tmp_path):
    tensors, _ = load_safetensors(write_raw(tmp_path / "f.safetensors", GOOD, struct.pack("<2f", 1.5, -2)))
    assert tensors["a"].tolist() == [1.5, -2.0]


@pytest.mark.parametrize("header, data, n, message", [
    (GOOD, b"\0" * 4, None, "outside the data section"),  # truncated data
    (GOOD, b"\0" * 8, 10**6, "larger than the file"),
    (GOOD, b"\0" * 8, 2**40, "exceeds"),
    ({"a": {"dtype": "I64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unsupported dtype I64"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12"),
    ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 8]}}, b"\0" * 8, None, "invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, b"\0" * 8, None, "needs exactly"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None, "overlap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "hole"),
    (GOOD, b"\0" * 12, None, "tensors cover 8"),
    ([1, 2], b"", None, "not a JSON object"),
])
def test_malformed_files_give_one_line_errors(tmp_path, header, data, n, message):
    path = write_raw(tmp_path / "bad.safetensors", header, data, n)
    with pytest.raises(ValueError, match=message) as e:
        load_safetensors(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_not_json_and_too_short(tmp_path):
    p = tmp_path / "junk.safetensors"
    p.write_bytes(struct.pack("<Q", 3) + b"{x}")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_safetensors(p)
    p.write_bytes(b"abc")
    with pytest.raises(ValueError, match="truncated"):
        load_safetensors(p)


def test_truncated_real_checkpoint(small_hf, tmp_path):
    _, directory = small_hf
    data = (directory / "model.safetensors").read_bytes()
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="outside the data section"):
        GPT.from_pretrained(tmp_path)


def test_missing_and_misshapen_tensors(small_hf, tmp_path):
    hf, directory = small_hf
    (tmp_path / "config.json").write_bytes((directory / "config.json").read_bytes())
    sd = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v for k, v in sd.items() if k != "transformer.h.1.mlp.c_fc.bias"}, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor 'h.1.mlp.c_fc.bias'"):
        GPT.from_pretrained(tmp_path)
    sd["transformer.h.2.ln_1.weight"] = torch.ones(65)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'h.2.ln_1.weight' has shape \(65,\), expected \(64,\)"):
        GPT.from_pretrained(tmp_path)
    sd["transformer.h.2.ln_1.weight"] = torch.ones(64)
    sd["transformer.h.0.attn.c_attn.weight"] = torch.ones(192, 64)  # transposed: HF's (in, out) is (64, 192)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"'h.0.attn.c_attn.weight' has shape \(192, 64\), expected \(64, 192\)"):
        GPT.from_pretrained(tmp_path)


def test_unknown_name_missing_file_and_bad_config(small_hf, tmp_path):
    with pytest.raises(FileNotFoundError, match="gpt3.*gpt2, gpt2-medium"):
        GPT.from_pretrained("gpt3")
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        GPT.from_pretrained(tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GPT.from_pretrained(tmp_path)  # an empty directory
    _, directory = small_hf
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(ValueError, match="'activation_function' is 'relu'"):
        GPT.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "n_head"}))
    with pytest.raises(ValueError, match="'n_head'"):
        GPT.from_pretrained(tmp_path)
