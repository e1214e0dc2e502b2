"""Downloads against a real HTTP server on 127.0.0.1 that answers like the Hugging Face hub (conftest.FakeHub)."""
import pytest
import torch
from conftest import assert_close, write_hub_layout

import hub
from model import GPT

REPO = "/openai-community/gpt2/resolve/main"


@pytest.fixture
def served_gpt2(fake_hub, small_hf, tmp_path):
    """The small random checkpoint served as if it were openai-community/gpt2, in the hub's own layout."""
    hf, _ = small_hf
    d = write_hub_layout(hf, tmp_path / "served")
    fake_hub.add(f"{REPO}/config.json", (d / "config.json").read_bytes())
    fake_hub.add(f"{REPO}/model.safetensors", (d / "model.safetensors").read_bytes(), lfs=True)
    return fake_hub, hf


def test_from_pretrained_downloads_then_uses_cache(served_gpt2, tmp_path):
    fake_hub, hf = served_gpt2
    model = GPT.from_pretrained("gpt2").eval()
    idx = torch.randint(0, 50257, (1, 16))
    with torch.no_grad():
        assert_close(model(idx)[0], hf(idx).logits)
    cached = tmp_path / "cache" / "ifwit" / "hub" / "models" / "openai-community" / "gpt2" / "model.safetensors"
    assert cached.is_file() and not cached.with_name("model.safetensors.part").exists()
    assert len(fake_hub.gets("model.safetensors")) == 1 and len(fake_hub.gets("config.json")) == 1
    n = len(fake_hub.requests)
    GPT.from_pretrained("gpt2")
    assert len(fake_hub.requests) == n  # the second load makes no request at all


def test_lfs_redirect_is_followed(served_gpt2):
    fake_hub, _ = served_gpt2
    hub.cached_download("openai-community/gpt2", "model.safetensors")
    paths = [p for p, _ in fake_hub.requests]
    assert paths[0] == f"{REPO}/model.safetensors" and paths[1].startswith("/cdn/")


def test_token_is_sent_to_the_hub_but_not_to_another_host(served_gpt2, monkeypatch):
    fake_hub, _ = served_gpt2
    fake_hub.token = "secret"
    with pytest.raises(OSError, match="HTTP 401.*HF_TOKEN"):
        hub.cached_download("openai-community/gpt2", "config.json")
    monkeypatch.setenv("HF_TOKEN", "secret")
    hub.cached_download("openai-community/gpt2", "config.json")
    assert fake_hub.gets("config.json")[-1]["Authorization"] == "Bearer secret"


def test_interrupted_download_resumes_with_range(served_gpt2, tmp_path):
    fake_hub, hf = served_gpt2
    path = f"{REPO}/model.safetensors"
    full = fake_hub.files[path]
    fake_hub.cut[path] = len(full) // 3
    with pytest.raises(OSError, match="interrupted.*run again to resume"):
        hub.cached_download("openai-community/gpt2", "model.safetensors")
    part = tmp_path / "cache" / "ifwit" / "hub" / "models" / "openai-community" / "gpt2" / "model.safetensors.part"
    assert part.stat().st_size == len(full) // 3
    dest = hub.cached_download("openai-community/gpt2", "model.safetensors")
    assert dest.read_bytes() == full and not part.exists()
    assert fake_hub.gets("/cdn/" + next(iter(fake_hub.lfs)))[-1]["Range"] == f"bytes={len(full) // 3}-"


def test_corrupted_download_is_rejected(served_gpt2, tmp_path):
    fake_hub, _ = served_gpt2
    fake_hub.corrupt.add(f"{REPO}/model.safetensors")
    with pytest.raises(OSError, match="corrupted.*sha256"):
        GPT.from_pretrained("gpt2")
    models = tmp_path / "cache" / "ifwit" / "hub" / "models" / "openai-community" / "gpt2"
    assert not (models / "model.safetensors").exists() and not (models / "model.safetensors.part").exists()


def test_dataset_url_and_missing_file(fake_hub):
    fake_hub.add("/datasets/someone/poems/resolve/main/poems.csv", b"a,b\n1,2\n")
    assert hub.hub_url("someone/poems", "poems.csv", "dataset") == f"{fake_hub.url}/datasets/someone/poems/resolve/main/poems.csv"
    assert hub.cached_download("someone/poems", "poems.csv", "dataset").read_bytes() == b"a,b\n1,2\n"
    with pytest.raises(OSError, match="HTTP 404.*nothing.csv; run it where the hub is reachable and copy .*ifwit/hub here"):
        hub.cached_download("someone/poems", "nothing.csv", "dataset")  # a dataset: no local-model hint
    with pytest.raises(OSError, match="HTTP 404.*model.safetensors; pass a local path"):
        hub.cached_download("someone/nomodel", "model.safetensors")


def test_offline_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(OSError, match=r"could not reach http://127.0.0.1:9/openai-community/gpt2.*local path") as e:
        GPT.from_pretrained("gpt2")
    assert "\n" not in str(e.value)


def test_default_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert hub.hub_url("openai-community/gpt2", "config.json") == \
        "https://huggingface.co/openai-community/gpt2/resolve/main/config.json"
