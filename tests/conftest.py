"""Shared fixtures: random-weight HF GPT-2 checkpoints (the reference we compare against) and a fake hub.

No real GPT-2 weights are needed or reachable: transformers builds GPT2LMHeadModel with random weights in the
real shapes, save_pretrained writes it, and our loader must reproduce it exactly.
"""
import hashlib
import http.server
import json
import os
import re
import sys
import threading
import urllib.parse
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# the GPT-2 BPE files, when the shared folder is beside the repo (CI exports this too)
if "TIKTOKEN_CACHE_DIR" not in os.environ and (ROOT.parent / "shared" / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(ROOT.parent / "shared" / "tiktoken")
torch.set_num_threads(min(4, os.cpu_count() or 1))

SMALL = dict(n_layer=3, n_head=4, n_embd=64, n_positions=128)  # an odd shape: 16-dim heads, short context
GPT2 = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024)  # the real gpt2 (124M) shape


def make_hf(directory, init_range=0.3, seed=0, **shape):
    """Random-weight HF GPT2LMHeadModel saved with save_pretrained into `directory`. A wide init range makes
    greedy decoding wander over many tokens instead of repeating one, so generation tests can fail."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    hf = GPT2LMHeadModel(GPT2Config(**shape, initializer_range=init_range)).eval()
    hf.save_pretrained(directory)
    return hf


def write_hub_layout(hf, directory):
    """The layout the hub hosts for openai-community/gpt2: no `transformer.` prefix, the attention-mask
    buffers present, no lm_head. Written with the safetensors package, not our code."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sd = {k.removeprefix("transformer."): v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    P = hf.config.n_positions
    for i in range(hf.config.n_layer):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(sd, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf.config.to_dict()))
    return directory


@pytest.fixture(scope="session")
def small_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("small_hf")
    return make_hf(d, **SMALL), d


@pytest.fixture(scope="session")
def gpt2_hf(tmp_path_factory):
    d = tmp_path_factory.mktemp("gpt2_hf")
    return make_hf(d, init_range=0.1, **GPT2), d


class FakeHub:
    """A real HTTP server on 127.0.0.1 that answers like the hub: /{repo}/resolve/main/{file} (the file name
    URL-encoded). LFS files get a 302 to /cdn/{sha256} carrying X-Linked-Etag and X-Linked-Size, as
    huggingface.co does; Range requests get 206. /api/{models|datasets}/{repo}/tree/main/{folder} lists a folder
    as the hub's tree API does (JSON entries; `page` entries per answer, further pages linked by a Link header
    with rel="next"). A Range starting at or past a file's end gets 416 with Content-Range `bytes */{size}`, as
    the hub's CDN answers. Knobs: `cut` (path -> bytes after which the next answer breaks off), `corrupt` (paths
    whose served bytes differ from the advertised sha256), `token` (required bearer token), `page`, `portal`
    (answer every request with HTTP 200 and an HTML login page, as a captive portal does; `portal_type` is its
    Content-Type, None for none, to make the client recognise the page by its first bytes), `no_length` (paths
    served without Content-Length: the body ends where the connection closes, as HTTP/1.0 allows)."""

    PORTAL_PAGE = b"<!DOCTYPE html>\n<html><head><title>Sign in to CoffeeShop WiFi</title></head>\n" \
                  b"<body><form action=/login><input name=room></form></body></html>\n"

    def __init__(self):
        self.files, self.lfs, self.requests = {}, {}, []
        self.cut, self.corrupt, self.token, self.page, self.no_length = {}, set(), None, 1000, set()
        self.portal, self.portal_type = False, "text/html; charset=utf-8"
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.requests.append((self.path, dict(self.headers)))
                if hub.portal:
                    return self.portal()
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    if not self.path.startswith("/cdn/"):
                        return self.send_error(401)
                if self.path.startswith("/api/"):
                    return self.tree()
                if self.path.startswith("/cdn/"):
                    path = hub.lfs.get(self.path[5:])
                elif self.path in hub.files and self.path in hub.lfs.values():
                    sha = next(s for s, p in hub.lfs.items() if p == self.path)
                    self.send_response(302)
                    self.send_header("Location", f"/cdn/{sha}")
                    self.send_header("X-Linked-Etag", f'"{sha}"')
                    self.send_header("X-Linked-Size", str(len(hub.files[self.path])))
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                else:
                    path = self.path
                if path not in hub.files:
                    return self.send_error(404)
                body = hub.files[path]
                if path in hub.corrupt:
                    body = bytes([body[0] ^ 1]) + body[1:]
                start = int(self.headers["Range"].split("=")[1].rstrip("-")) if "Range" in self.headers else 0
                if start and start >= len(body):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(body)}")
                    self.send_header("Content-Length", "0")
                    return self.end_headers()
                self.send_response(206 if start else 200)
                if path not in hub.no_length:
                    self.send_header("Content-Length", str(len(body) - start))
                self.send_header("ETag", f'"{hashlib.sha1(body).hexdigest()}"')
                self.end_headers()
                cut = hub.cut.pop(path, None)
                self.wfile.write(body[start:cut] if cut is not None else body[start:])

            def portal(self):
                self.send_response(200)
                if hub.portal_type:
                    self.send_header("Content-Type", hub.portal_type)
                self.send_header("Content-Length", str(len(hub.PORTAL_PAGE)))
                self.end_headers()
                self.wfile.write(hub.PORTAL_PAGE)

            def tree(self):
                url = urllib.parse.urlsplit(self.path)
                kind, repo, folder = re.fullmatch(r"/api/(models|datasets)/([^/]+/[^/]+)/tree/main/(.*)", url.path).groups()
                prefix = ("/datasets/" if kind == "datasets" else "/") + f"{repo}/resolve/main/"
                entries, dirs = [], set()
                for served in sorted(hub.files):
                    path = urllib.parse.unquote(served.removeprefix(prefix))
                    if served.startswith(prefix) and path.startswith(urllib.parse.unquote(folder) + "/"):
                        body = hub.files[served]
                        entry = {"type": "file", "oid": hashlib.sha1(body).hexdigest(), "size": len(body), "path": path}
                        if served in hub.lfs.values():
                            entry["lfs"] = {"oid": hashlib.sha256(body).hexdigest(), "size": len(body), "pointerSize": 134}
                        entries.append(entry)
                        dirs.add(path.rsplit("/", 1)[0])
                entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": d} for d in sorted(dirs)]
                start = int(urllib.parse.parse_qs(url.query).get("cursor", ["0"])[0])
                body = json.dumps(entries[start:start + hub.page]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if start + hub.page < len(entries):
                    self.send_header("Link", f'<{hub.url}{url.path}?recursive=true&cursor={start + hub.page}>; rel="next"')
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def add(self, path, data, lfs=False):
        self.files[path] = data
        if lfs:
            self.lfs[hashlib.sha256(data).hexdigest()] = path

    def gets(self, suffix):
        return [headers for path, headers in self.requests if path.endswith(suffix)]


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """A FakeHub with HF_ENDPOINT pointed at it and an empty cache directory."""
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield hub
    hub.server.shutdown()
    hub.server.server_close()


# ------------------------------------------------------------------------------------- numeric comparisons
# Kernels differ from CPU to CPU (MKL and oneDNN pick them by instruction set: AVX2, AVX-512, AMX), and a padded
# batch, a cache or another library runs other kernels than the reference. So two computations of the same value
# agree to a few units in the last place of their dtype *at the magnitude of the computation*, never to a fixed
# number of decimals: float32 spaces values near 23 by 1.9e-6, so atol=1e-5 there is 5 ulps, which one CPU meets
# and another does not (tests/test_model.py once failed so on an Intel Xeon).

def assert_close(actual, expected, ulps=64, scale=None, msg=None):
    """`actual` equals `expected` to within `ulps` units of their dtype's resolution at the computation's
    magnitude: each element within ulps * eps * scale, where scale is the largest |expected| (or `scale`, when the
    values are differences of larger terms). A matrix product, a softmax normalizer or a mean errs in proportion
    to its largest terms, so an element near 0 errs as much as its large neighbours; a relative bound alone would
    ask it for digits its inputs never had. A real bug moves values by far more than this (tests check that)."""
    actual, expected = torch.as_tensor(actual), torch.as_tensor(expected)
    dtype = expected.dtype if expected.is_floating_point() else torch.float32
    if actual.is_floating_point() and torch.finfo(actual.dtype).eps > torch.finfo(dtype).eps:
        dtype = actual.dtype  # the coarser of the two sets the resolution
    finite = expected[torch.isfinite(expected)]
    if scale is None:
        scale = finite.abs().max().item() if finite.numel() else 0.0
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(actual, expected, rtol=ulps * eps, atol=ulps * eps * scale, check_dtype=False,
                               msg=msg)


def assert_same_greedy(got, want, prompt, scores, ulps=64):
    """Greedy continuations of `prompt` agree, but for a near-tie: where they first differ, the two tokens' scores
    at that step (scores(prompt, generated) -> (V,), the next-token scores after `generated`, computed from scratch
    on `want`'s prefix) must be within `ulps` of each other at the scores' magnitude: a choice that rounding in another
    kernel may flip. After it the two continue from different prefixes and cannot be compared. A real difference
    (a wrong cache, mask or bias) moves the scores by far more, so the check fails on it; with no tie on the way,
    this is plain equality (as it is for every fixed input these tests use on the CPUs measured so far)."""
    k = first_difference(got, want)
    if k is None:
        assert len(got) == len(want), (got, want)
        return
    s = scores(list(prompt), list(want[:k]))
    eps = torch.finfo(s.dtype).eps  # float32's, or bfloat16's for a model in bf16 weights
    s = s.float()
    tol = ulps * eps * s[torch.isfinite(s)].abs().max().item()
    gap = (s[want[k]] - s[got[k]]).item()
    assert abs(gap) <= tol, (f"step {k}: {got[k]} instead of {want[k]}, {gap:.3g} apart (a near-tie would be "
                             f"within {tol:.2g})", got, want)


def first_difference(got, want):
    """The first step where two token lists differ, or None where one is a prefix of the other."""
    return next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)


def assert_same_generations(got, want, prompts, scores, ulps=64):
    """assert_same_greedy for each row of a batch: got[b] and want[b] continue prompts[b]."""
    assert len(got) == len(want) == len(prompts)
    for g, w, p in zip(got, want, prompts):
        assert_same_greedy(g, w, p, scores, ulps)


def last_logits(model, rule_set=None):
    """scores(prompt, generated) for assert_same_greedy: the model's next-token logits after prompt + generated, in
    one uncached pass; with a rule set, the log-probs of the product of experts the sampler picks from."""
    import torch.nn.functional as F
    from rules import rule_bias

    def scores(prompt, generated):
        with torch.no_grad():
            logits = model(torch.tensor([prompt + generated], device=model.lm_head.weight.device))[0][0, -1].cpu()
        if rule_set is None:
            return logits
        return F.log_softmax(logits.float(), -1) + rule_bias(prompt + generated, len(prompt), rule_set)
    return scores


def agreeing_steps(got, want):
    """How many steps every row of two batches of generations agrees for: the steps whose per-step values can be
    compared (after a near-tie, assert_same_greedy's exception, a row continues from another prefix)."""
    firsts = [first_difference(g, w) for g, w in zip(got, want)]
    return min((min(len(g), len(w)) if k is None else k for k, g, w in zip(firsts, got, want)), default=0)


def assert_losses_close(got, want, ulps=64):
    """Two runs' losses from log.jsonl: float32 computations (ulps at the losses' magnitude, as assert_close),
    written to 6 decimals (so 1e-6 more: two equal losses may round apart)."""
    assert len(got) == len(want), (len(got), len(want))
    tol = ulps * torch.finfo(torch.float32).eps * max(abs(v) for v in want) + 1e-6
    worst = max(abs(a - b) for a, b in zip(got, want))
    assert worst <= tol, (f"losses differ by up to {worst:.3g} (allowed {tol:.2g})", got, want)


def assert_clear_margins(model, prompt, tokens, ulps=1024):
    """The premise of a token-exact check: at every step of the greedy continuation `tokens` of `prompt`, the top
    token beats the runner-up by more than `ulps` of float32 at the logits' magnitude, hundreds of times what
    another CPU's kernels move a logit (tens of ulps), so every machine picks the same tokens. For fixed inputs
    only: it holds here, hence everywhere; the first step that fails names an input to replace."""
    if not tokens:
        return
    with torch.no_grad():
        ids = torch.tensor([prompt + tokens[:-1]], device=model.lm_head.weight.device)
        logits = model(ids)[0][0, len(prompt) - 1:].float().cpu()  # (n, V): the logits each token was chosen from
    top2 = logits.topk(2, dim=-1).values
    margins = top2[:, 0] - top2[:, 1]
    tol = ulps * torch.finfo(torch.float32).eps * logits.abs().max().item()
    assert margins.min().item() > tol, f"step {int(margins.argmin())} of {tokens} is a near-tie ({margins.min():.3g})"
