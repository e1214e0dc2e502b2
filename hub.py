"""
Downloads from the Hugging Face hub: GPT-2 weights for model.py and datasets for data/*/prepare.py.

    python -c "import hub; print(hub.cached_download('openai-community/gpt2', 'config.json'))"

Files are cached under $XDG_CACHE_HOME/ifwit/hub (default ~/.cache/ifwit/hub), one path per repo and file;
a cached file is used with no request at all. URLs are {HF_ENDPOINT}/{repo}/resolve/main/{file} (datasets:
{HF_ENDPOINT}/datasets/{repo}/...), HF_ENDPOINT defaulting to https://huggingface.co, and HF_TOKEN is sent as
a bearer token when set (gated sets such as LIMA need it). A download streams into `<file>.part`, resumes it
with an HTTP Range request after an interruption, checks its size and, for LFS files, the sha256 the hub
advertises, and only then renames it into place: the cache never holds a half-written file.
"""
import hashlib
import http.client
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

CHUNK = 1 << 20  # bytes read per iteration of the download loop


def cache_dir():
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ifwit" / "hub"


def hub_url(repo, filename, repo_type="model"):
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{endpoint}/{prefix}{repo}/resolve/main/{filename}"


def cached_download(repo, filename, repo_type="model"):
    """Path of `filename` from hub repo `repo`, downloading it on first use."""
    dest = cache_dir() / f"{repo_type}s" / repo / filename
    if not dest.is_file():
        download(hub_url(repo, filename, repo_type), dest)
    return dest


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # we follow redirects ourselves, to read the hub's headers on the way


_opener = urllib.request.build_opener(_NoRedirect)


def _open(url, start):
    """GET `url` from byte `start`, following redirects by hand: the hub's first answer (a 302 to its CDN for
    LFS files) carries X-Linked-Etag / X-Linked-Size, the file's sha256 and size. Returns (response, headers
    seen on the way). The token is not sent on to another host, as `requests` does too."""
    token, host, seen = os.environ.get("HF_TOKEN"), urllib.parse.urlsplit(url).netloc, {}
    for _ in range(10):
        headers = {"User-Agent": "ifwit/1.0", "Accept-Encoding": "identity"}
        if token and urllib.parse.urlsplit(url).netloc == host:
            headers["Authorization"] = f"Bearer {token}"
        if start:
            headers["Range"] = f"bytes={start}-"
        try:
            response = _opener.open(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code in (301, 302, 303, 307, 308) and e.headers.get("Location"):
                for k in ("X-Linked-Etag", "X-Linked-Size", "ETag"):
                    seen.setdefault(k, e.headers.get(k))
                url = urllib.parse.urljoin(url, e.headers["Location"])
                continue
            raise
        for k in ("X-Linked-Etag", "X-Linked-Size", "ETag"):
            seen.setdefault(k, response.headers.get(k))
        return response, seen
    raise OSError(f"too many redirects for {url}")


def _expected_sha256(seen):
    for k in ("X-Linked-Etag", "ETag"):  # LFS files: a sha256; small git files: a sha1 we cannot use
        tag = (seen.get(k) or "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def download(url, dest):
    """Download `url` to `dest` atomically, resuming `dest.part` if an earlier try was cut off."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    hint = "pass a local path (an HF directory or .safetensors file) instead, or set HF_ENDPOINT / HF_TOKEN"
    try:
        response, seen = _open(url, have)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # our .part already holds everything: the range starts at its end
            response, seen = None, {}
        elif e.code in (401, 403):
            raise OSError(f"HTTP {e.code} for {url}: this repo is gated or private; accept its terms on the "
                          f"hub and set HF_TOKEN, or {hint}") from None
        else:
            raise OSError(f"HTTP {e.code} {e.reason} for {url}; {hint}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"could not reach {url} ({reason}); offline? {hint}") from None
    if response is not None and response.status == 200 and have:
        have = 0  # the server ignored our Range header: start over
    total = None
    if response is not None and response.headers.get("Content-Length") is not None:
        total = have + int(response.headers["Content-Length"])
    if seen.get("X-Linked-Size"):
        total = int(seen["X-Linked-Size"])
    try:
        with open(part, "ab" if have else "wb") as f, \
                tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=dest.name, leave=False) as bar:
            while response is not None and (chunk := response.read(CHUNK)):
                f.write(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException) as e:  # a reset socket; a body cut short (IncompleteRead)
        raise OSError(f"download of {url} interrupted after {part.stat().st_size} bytes ({type(e).__name__}); "
                      f"run again to resume") from None
    size = part.stat().st_size
    if total is not None and size < total:  # the connection closed early: keep what came, resume next time
        raise OSError(f"download of {url} interrupted after {size} of {total} bytes; run again to resume")
    if total is not None and size > total:
        part.unlink()
        raise OSError(f"download of {url} has {size} bytes, expected {total}; deleted it, run again")
    sha256 = _expected_sha256(seen)
    if sha256 is not None:
        h = hashlib.sha256()
        with open(part, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        if h.hexdigest() != sha256:
            part.unlink()
            raise OSError(f"download of {url} is corrupted (sha256 {h.hexdigest()[:12]}..., the hub says "
                          f"{sha256[:12]}...); deleted it, run again")
    os.replace(part, dest)
    return dest


def read_parquet(path):
    """Rows of a parquet file as dicts. Some sets (GSM8K, MBPP) are on the hub only as parquet; pyarrow, an
    optional dependency, is needed for them alone."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise OSError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pyarrow.parquet.read_table(path).to_pylist()
