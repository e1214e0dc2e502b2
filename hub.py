"""
Downloads from the Hugging Face hub: GPT-2 weights for model.py and datasets for data/*/prepare.py.

    python -c "import hub; print(hub.cached_download('openai-community/gpt2', 'config.json'))"
    python -c "import hub; print(hub.list_files('tatsu-lab/alpaca', 'data', 'dataset'))"

Files are cached under $XDG_CACHE_HOME/ifwit/hub (default ~/.cache/ifwit/hub), one path per repo and file;
a cached file is used with no request at all. URLs are {HF_ENDPOINT}/{repo}/resolve/main/{file} (datasets:
{HF_ENDPOINT}/datasets/{repo}/...), HF_ENDPOINT defaulting to https://huggingface.co, and HF_TOKEN is sent as
a bearer token when set (gated sets such as LIMA need it). A download streams into `<file>.part`, resumes it
with an HTTP Range request after an interruption, checks its size and, for LFS files, the sha256 the hub
advertises, and only then renames it into place: the cache never holds a half-written file. File names are
URL-encoded (some datasets have spaces in theirs). `list_files` asks the hub's tree API which files a folder
holds; `stream_lines` reads the start of a file too large to download whole, line by line, caching nothing.
"""
import hashlib
import http.client
import json
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


def endpoint():
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def hub_url(repo, filename, repo_type="model"):
    prefix = "datasets/" if repo_type == "dataset" else ""
    return f"{endpoint()}/{prefix}{repo}/resolve/main/{urllib.parse.quote(filename)}"


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


HINT = "pass a local path (an HF directory or .safetensors file) instead, or set HF_ENDPOINT / HF_TOKEN"


def _failure(e, url):
    """A failed request as a one-line OSError that says what to do."""
    if isinstance(e, urllib.error.HTTPError):
        if e.code in (401, 403):
            return OSError(f"HTTP {e.code} for {url}: this repo is gated or private; accept its terms on the "
                           f"hub and set HF_TOKEN, or {HINT}")
        return OSError(f"HTTP {e.code} {e.reason} for {url}; {HINT}")
    return OSError(f"could not reach {url} ({getattr(e, 'reason', e)}); offline? {HINT}")


def download(url, dest):
    """Download `url` to `dest` atomically, resuming `dest.part` if an earlier try was cut off."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        response, seen = _open(url, have)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise _failure(e, url) from None
        response, seen = None, {}  # our .part already holds everything: the range starts at its end
    except (urllib.error.URLError, OSError) as e:
        raise _failure(e, url) from None
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


def list_files(repo, folder, repo_type="model"):
    """Sorted paths of the files under `folder` (recursively) of a hub repo, from the hub's tree API
    ({HF_ENDPOINT}/api/{datasets|models}/{repo}/tree/main/{folder}), following its pagination."""
    url = f"{endpoint()}/api/{repo_type}s/{repo}/tree/main/{urllib.parse.quote(folder)}?recursive=true"
    paths = []
    while url:
        try:
            response, _ = _open(url, 0)
            with response:
                entries, link = json.loads(response.read()), response.headers.get("Link") or ""
        except (urllib.error.URLError, OSError) as e:
            raise _failure(e, url) from None
        except json.JSONDecodeError:
            raise OSError(f"{url}: the hub's answer is not JSON; is HF_ENDPOINT a hub?") from None
        paths += [entry["path"] for entry in entries if entry.get("type") == "file"]
        following = re.search(r'<([^>]+)>;\s*rel="next"', link)  # more than one page of entries
        url = urllib.parse.urljoin(url, following.group(1)) if following else None
    return sorted(paths)


def stream_lines(repo, filename, repo_type="model"):
    """Yield the lines of a UTF-8 text file on the hub as they arrive, without their line ends, caching
    nothing: for reading the start of a file too large to download whole (stop iterating to stop reading)."""
    url = hub_url(repo, filename, repo_type)
    try:
        response, _ = _open(url, 0)
    except (urllib.error.URLError, OSError) as e:
        raise _failure(e, url) from None
    with response:
        n = 0
        try:
            for n, line in enumerate(response, 1):
                yield line.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise ValueError(f"{url}: line {n} is not UTF-8 (byte {e.start})") from None
        except (OSError, http.client.HTTPException) as e:
            raise OSError(f"reading {url} broke off after line {n} ({type(e).__name__}); run again") from None


def read_parquet(path):
    """Rows of a parquet file as dicts. Some sets (GSM8K, MBPP) are on the hub only as parquet; pyarrow, an
    optional dependency, is needed for them alone."""
    try:
        import pyarrow.parquet
    except ImportError:
        raise OSError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    return pyarrow.parquet.read_table(path).to_pylist()
