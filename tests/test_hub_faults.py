"""The download cache holds only verified files: a captive portal's HTML page, a complete but corrupt .part
left by an earlier run (HTTP 416 to its Range request) and a cached file that fails to parse, against a real
HTTP server on 127.0.0.1 that answers like the Hugging Face hub (conftest.FakeHub)."""
import hashlib

import pytest

import hub

REPO = "/datasets/someone/poems/resolve/main"
DATA = b'{"poem": "roses are red"}\n' * 40  # longer than FakeHub's portal page


def cache(tmp_path):
    return tmp_path / "cache" / "ifwit" / "hub" / "datasets" / "someone" / "poems"


def cached_files(tmp_path):
    return sorted(p.name for p in cache(tmp_path).rglob("*") if p.is_file())


@pytest.mark.parametrize("portal_type", ["text/html; charset=utf-8", None])  # None: known by its first bytes
@pytest.mark.parametrize("lfs", [False, True])
@pytest.mark.parametrize("had_part", [False, True])  # a .part from an interrupted run, before the portal
def test_captive_portal_page_is_never_cached(fake_hub, tmp_path, portal_type, lfs, had_part):
    fake_hub.add(f"{REPO}/poems.jsonl", DATA, lfs=lfs)
    if had_part:
        cache(tmp_path).mkdir(parents=True)
        (cache(tmp_path) / "poems.jsonl.part").write_bytes(DATA[:100])
    fake_hub.portal, fake_hub.portal_type = True, portal_type
    url = hub.hub_url("someone/poems", "poems.jsonl", "dataset")
    with pytest.raises(OSError, match=f"download of {url} got an HTML page instead of the file "
                                      r"\(a captive portal or login page\?\); deleted it") as e:
        hub.cached_download("someone/poems", "poems.jsonl", "dataset")
    assert "\n" not in str(e.value)
    assert cached_files(tmp_path) == []  # neither the page nor a .part holding it
    fake_hub.portal = False  # signed in: the real hub answers
    assert hub.cached_download("someone/poems", "poems.jsonl", "dataset").read_bytes() == DATA
    assert cached_files(tmp_path) == ["poems.jsonl"]


def test_portal_page_in_the_cache_names_the_file_to_delete(fake_hub, tmp_path):
    """A page cached before these checks existed is an error naming it, not data."""
    fake_hub.add(f"{REPO}/poems.jsonl", DATA)
    cache(tmp_path).mkdir(parents=True)
    (cache(tmp_path) / "poems.jsonl").write_bytes(fake_hub.PORTAL_PAGE)
    with pytest.raises(ValueError, match="poems.jsonl: an HTML page .*delete this cached file") as e:
        hub.cached_download("someone/poems", "poems.jsonl", "dataset")
    assert str(cache(tmp_path) / "poems.jsonl") in str(e.value) and "\n" not in str(e.value)
    assert not fake_hub.requests  # a cached file is still used (here: refused) with no request


def test_portal_page_is_not_a_listing_or_lines(fake_hub):
    fake_hub.add(f"{REPO}/data/poems.jsonl", DATA)
    assert hub.list_files("someone/poems", "data", "dataset") == ["data/poems.jsonl"]
    assert next(hub.stream_lines("someone/poems", "data/poems.jsonl", "dataset")) == '{"poem": "roses are red"}'
    fake_hub.portal, fake_hub.portal_type = True, None
    with pytest.raises(OSError, match="listing .*/api/datasets/someone/poems/tree/main/data.* got an HTML page"):
        hub.list_files("someone/poems", "data", "dataset")
    with pytest.raises(OSError, match=f"reading {fake_hub.url}{REPO}/data/poems.jsonl got an HTML page"):
        next(hub.stream_lines("someone/poems", "data/poems.jsonl", "dataset"))


BAD_PARTS = [  # .part files that hold at least as many bytes as the file, so that a Range request gets 416
    pytest.param(True, bytes([DATA[0] ^ 1]) + DATA[1:], id="lfs-complete-but-corrupt"),  # caught by the sha256
    pytest.param(False, DATA + b"old tail\n", id="longer-than-the-file"),  # by the 416's Content-Range
    pytest.param(False, b"<!DOCTYPE html>" + b" " * len(DATA), id="a-portal-page"),  # by its first bytes
]


@pytest.mark.parametrize("lfs, part_bytes", BAD_PARTS)
def test_complete_but_bad_part_is_downloaded_afresh(fake_hub, tmp_path, capsys, lfs, part_bytes):
    """A .part holding at least the whole file gets HTTP 416 to its Range request; it is checked like any
    download and, failing, deleted and the file downloaded once more from the start."""
    fake_hub.add(f"{REPO}/poems.jsonl", DATA, lfs=lfs)
    cache(tmp_path).mkdir(parents=True)
    (cache(tmp_path) / "poems.jsonl.part").write_bytes(part_bytes)
    assert hub.cached_download("someone/poems", "poems.jsonl", "dataset").read_bytes() == DATA
    assert cached_files(tmp_path) == ["poems.jsonl"]
    served = fake_hub.gets("/cdn/" + hashlib.sha256(DATA).hexdigest() if lfs else "poems.jsonl")
    assert [h.get("Range") for h in served] == [f"bytes={len(part_bytes)}-", None]  # a 416, then afresh
    assert "left by an earlier run" in capsys.readouterr().err


def test_complete_good_part_is_moved_into_the_cache(fake_hub, tmp_path):
    fake_hub.add(f"{REPO}/poems.jsonl", DATA, lfs=True)
    cache(tmp_path).mkdir(parents=True)
    (cache(tmp_path) / "poems.jsonl.part").write_bytes(DATA)
    assert hub.cached_download("someone/poems", "poems.jsonl", "dataset").read_bytes() == DATA
    assert [h.get("Range") for h in fake_hub.gets("/cdn/" + hashlib.sha256(DATA).hexdigest())] == \
        [f"bytes={len(DATA)}-"]  # the 416 alone: nothing downloaded twice


def test_cached_parquet_that_does_not_parse_names_the_file_to_delete(fake_hub, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    import pyarrow
    buffer = io.BytesIO()
    pq.write_table(pyarrow.table({"question": ["1+1?", "2+2?"]}), buffer)
    fake_hub.add(f"{REPO}/train.parquet", buffer.getvalue(), lfs=True)
    path = hub.cached_download("someone/poems", "train.parquet", "dataset")
    assert hub.read_parquet(path) == [{"question": "1+1?"}, {"question": "2+2?"}]
    for bad in (path.read_bytes()[:-20], b"PAR1" + b"\0" * 40 + b"PAR1"):  # cut short; garbled metadata
        path.write_bytes(bad)
        with pytest.raises(ValueError, match="not a readable parquet file.*delete this cached file") as e:
            hub.read_parquet(path)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value)
    outside = tmp_path / "mine.parquet"  # a file of the user's own: named, but no advice to delete it
    outside.write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="mine.parquet: not a readable parquet file") as e:
        hub.read_parquet(outside)
    assert "delete" not in str(e.value)


def test_a_json_file_cut_short_without_content_length_is_never_cached(fake_hub, tmp_path):
    """A small file served without Content-Length (the body ends where the connection closes) and cut short: only
    its format can tell. A .json download that does not parse is deleted, not cached (a cut config.json used to be
    cached, and every later run failed on it with no advice)."""
    config = b'{"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50257}'
    fake_hub.add("/someone/model/resolve/main/config.json", config)
    fake_hub.no_length.add("/someone/model/resolve/main/config.json")
    fake_hub.cut["/someone/model/resolve/main/config.json"] = 30
    with pytest.raises(OSError, match=r"config.json is not valid JSON, cut short\?.*deleted it, run again") as e:
        hub.cached_download("someone/model", "config.json")
    assert "\n" not in str(e.value)
    cached = tmp_path / "cache" / "ifwit" / "hub" / "models" / "someone" / "model"
    assert sorted(p.name for p in cached.iterdir()) == []
    assert hub.cached_download("someone/model", "config.json").read_bytes() == config  # the next try gets it whole


def test_a_cached_model_file_that_does_not_parse_says_to_delete_it(fake_hub, tmp_path, monkeypatch):
    """A cached config.json that fails to parse (cached by an older version of hub.py, or edited) names the cached
    download to delete: every later run would otherwise fail on it with no advice."""
    import checkpoint
    monkeypatch.setitem(checkpoint.HUB_MODELS, "tiny", "someone/tiny")
    cached = tmp_path / "cache" / "ifwit" / "hub" / "models" / "someone" / "tiny"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text('{"n_layer": 12, "n_he')
    (cached / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match=rf"config.json: not valid JSON .*; it is a cached download: delete {cached} and "
                                         r"run again to download it afresh") as e:
        checkpoint.read_pretrained("tiny")
    assert "\n" not in str(e.value) and not fake_hub.requests
