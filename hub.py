"""
Downloads from the Hugging Face hub: GPT-2 weights for model.py and datasets for data/*/prepare.py.

    python -c "import hub; print(hub.cached_download('openai-community/gpt2', 'config.json'))"
    python -c "import hub; print(hub.list_files('tatsu-lab/alpaca', 'data', 'dataset'))"

Files are cached under $XDG_CACHE_HOME/ifwit/hub (default ~/.cache/ifwit/hub), one path per repo
and file; a cached file is used with no request at all. URLs are
{HF_ENDPOINT}/{repo}/resolve/main/{file} (datasets: {HF_ENDPOINT}/datasets/{repo}/...), HF_ENDPOINT
defaulting to https://huggingface.co, and HF_TOKEN is sent as a bearer token when set (gated sets
such as LIMA need it). File names are URL-encoded (some datasets have spaces in theirs).
`list_files` asks the hub's tree API which files a folder holds; `stream_lines` reads the start of
a file too large to download whole, line by line, caching nothing.

The cache holds only verified files. A download streams into `<file>.part`, resumes it with an HTTP
Range request after an interruption, and is moved into the cache only once it checks out: not an
HTML page (what a captive portal or login page answers with, HTTP 200 and all), its full size, and
for LFS files the sha256 the hub advertises. A `.part` that fails is deleted with a one-line error
(a short one is kept, to resume); a complete `.part` left by an earlier run (HTTP 416 to our Range)
gets the same checks, and if it fails it is deleted and the file downloaded afresh, once.

A cached file that turns out bad (an HTML page cached by an older version of this file, or one that
fails to parse in `read_parquet`) is never deleted here: the one-line error names it, to delete and
run again. We cannot re-download it ourselves (a parser gets a path, not a URL), and a file that
passed its checks yet fails to parse is worth a look before it goes; `bad_file` builds that error
for callers' own parsers too.
"""
import hashlib
import http.client
import json
import os
import re
import sys
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
    elif _is_html(dest):  # cached before the checks below existed, or put there by hand
        raise bad_file(dest, "an HTML page (a captive portal or login page?), not the file")
    return dest


def bad_file(path, why):
    """A one-line ValueError for a file that fails to parse or check: `{path}: {why}`, plus, for a
    file in our cache, the advice to delete it so that the next run downloads it afresh."""
    why = " ".join(str(why).split())  # parsers' messages may span lines
    if Path(path).resolve().is_relative_to(cache_dir().resolve()):
        return ValueError(f"{path}: {why}; "
                          f"delete this cached file and run again to download it afresh")
    return ValueError(f"{path}: {why}")


# -------------------------------------------------------------------------------------- requests

class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None  # we follow redirects ourselves, to read the hub's headers on the way


_opener = urllib.request.build_opener(_NoRedirect)


def _open(url, start):
    """GET `url` from byte `start`, following redirects by hand: the hub's first answer (a 302 to
    its CDN for LFS files) carries X-Linked-Etag / X-Linked-Size, the file's sha256 and size.
    Returns (response, headers seen on the way); an HTTPError carries them too, as `.seen` (a 416
    needs them to check a .part). The token is not sent on to another host, as `requests` does
    too."""
    token = os.environ.get("HF_TOKEN")
    host = urllib.parse.urlsplit(url).netloc  # the token goes to this host only
    seen = {}  # headers of every response on the way
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
            e.seen = seen
            raise
        for k in ("X-Linked-Etag", "X-Linked-Size", "ETag"):
            seen.setdefault(k, response.headers.get(k))
        return response, seen
    raise OSError(f"too many redirects for {url}")


HINT = ("pass a local path (an HF directory or .safetensors file) instead, "
        "or set HF_ENDPOINT / HF_TOKEN")


def _failure(e, url):
    """A failed request as a one-line OSError that says what to do (for a model, or for a dataset
    file)."""
    hint = HINT
    if "/datasets/" in url:
        hint = (f"run it where the hub is reachable and copy {cache_dir()} here, "
                f"or set HF_ENDPOINT / HF_TOKEN")
    if isinstance(e, urllib.error.HTTPError):
        if e.code in (401, 403):
            return OSError(f"HTTP {e.code} for {url}: this repo is gated or private; accept its "
                           f"terms on the hub and set HF_TOKEN, or {hint}")
        return OSError(f"HTTP {e.code} {e.reason} for {url}; {hint}")
    return OSError(f"could not reach {url} ({getattr(e, 'reason', e)}); offline? {hint}")


class HTMLPage(OSError):
    """An HTML page where a file was expected: what a captive portal or a login page answers with,
    HTTP 200 and all."""


def _html_page(doing, deleted=""):
    return HTMLPage(f"{doing} got an HTML page instead of the file (a captive portal or login "
                    f"page?); {deleted}sign in to the network or check HF_ENDPOINT, "
                    f"then run again")


# ---------------------------------------------------------------------------------------- checks

def _html_type(content_type):
    return (content_type or "").split(";")[0].strip().lower() == "text/html"


def _html_start(head):
    """Whether bytes `head`, the start of a file, are those of an HTML page."""
    # a UTF-8 byte order mark, blank lines
    head = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    return head.startswith((b"<!doctype html", b"<html"))


def _is_html(path, content_type=None):
    """Whether `path` (a file or its .part) holds an HTML page, served as text/html or starting
    like one, though its name says it is something else."""
    if Path(str(path).removesuffix(".part")).suffix.lower() in (".html", ".htm"):
        return False
    with open(path, "rb") as f:
        return _html_type(content_type) or _html_start(f.read(512))


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _expected_sha256(seen):
    # LFS files: a sha256; small git files: a sha1 we cannot use
    for k in ("X-Linked-Etag", "ETag"):
        tag = (seen.get(k) or "").removeprefix("W/").strip('"')
        if re.fullmatch(r"[0-9a-f]{64}", tag):
            return tag
    return None


def _defect(part, total, sha256):
    """What is wrong with `part`, all of a download, as a phrase; None if it is the file: not an
    HTML page, `total` bytes when known, of `sha256` when known, and for a .json file valid JSON: a
    small file served without Content-Length and cut short has no other sign of it."""
    if _is_html(part):
        return "is an HTML page (a captive portal's or login page's?)"
    size = part.stat().st_size
    if total is not None and size != total:
        return f"has {size} bytes, expected {total}"
    if sha256 is not None and (got := _sha256(part)) != sha256:
        return f"is corrupted (sha256 {got[:12]}..., the hub says {sha256[:12]}...)"
    if str(part).removesuffix(".part").endswith(".json"):
        try:
            json.loads(part.read_bytes())
        except (ValueError, RecursionError) as e:
            return f"is not valid JSON, cut short? ({' '.join(str(e).split())[:80]})"
    return None


# ------------------------------------------------------------------------------------- downloads

def download(url, dest):
    """Download `url` to `dest` atomically, resuming `dest.part` if an earlier try was cut off.
    `dest` is written only once the whole file checks out (`_defect`); a `.part` that does not is
    deleted."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    try:
        response, seen = _open(url, have)
    except urllib.error.HTTPError as e:
        if e.code != 416 or not have:
            raise _failure(e, url) from None
        return _complete_part(url, dest, part, e)
    except (urllib.error.URLError, OSError) as e:
        raise _failure(e, url) from None
    with response:
        if response.status == 200 and have:
            have = 0  # the server ignored our Range header: start over
        total = None
        if response.headers.get("Content-Length") is not None:
            total = have + int(response.headers["Content-Length"])
        if seen.get("X-Linked-Size"):
            total = int(seen["X-Linked-Size"])
        _receive(url, response, part, have, total, dest.name)
        content_type = response.headers.get("Content-Type")
    if _is_html(part, content_type):  # first: a portal's page is no start of the file to resume
        part.unlink()
        raise _html_page(f"download of {url}", deleted="deleted it; ")
    # closed early: keep what came, resume next time
    if total is not None and part.stat().st_size < total:
        have = part.stat().st_size
        raise OSError(f"download of {url} interrupted after {have} of {total} bytes; "
                      f"run again to resume")
    if defect := _defect(part, total, _expected_sha256(seen)):
        part.unlink()
        raise OSError(f"download of {url} {defect}; deleted it, run again")
    os.replace(part, dest)
    return dest


def _receive(url, response, part, have, total, name):
    """Append the body of `response` to `part` (or overwrite it when `have` is 0), with a progress
    bar."""
    try:
        mode = "ab" if have else "wb"  # resume after the bytes we have
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=name, leave=False)
        with open(part, mode) as f, bar:
            while chunk := response.read(CHUNK):
                f.write(chunk)
                bar.update(len(chunk))
    # a reset socket; a body cut short (IncompleteRead)
    except (OSError, http.client.HTTPException) as e:
        have = part.stat().st_size
        raise OSError(f"download of {url} interrupted after {have} bytes ({type(e).__name__}); "
                      f"run again to resume") from None


def _complete_part(url, dest, part, error):
    """HTTP 416 to our Range request: the server says `part` already holds the whole file. It was
    written by an earlier run, perhaps of an older version of the file or by a portal, so it gets a
    new download's checks; one that fails is deleted and the file downloaded afresh (once: with no
    .part, no Range, no 416)."""
    seen = getattr(error, "seen", {})
    total = int(seen["X-Linked-Size"]) if seen.get("X-Linked-Size") else None
    content_range = error.headers.get("Content-Range") or ""
    m = re.fullmatch(r"bytes \*/(\d+)", content_range)
    if total is None and m:
        total = int(m.group(1))  # a 416 states the file's size so
    if defect := _defect(part, total, _expected_sha256(seen)):
        part.unlink()
        print(f"{part}, left by an earlier run, {defect}; deleted it, downloading afresh",
              file=sys.stderr)
        return download(url, dest)
    os.replace(part, dest)
    return dest


# ------------------------------------------------------------------------------ listing, reading

def list_files(repo, folder, repo_type="model"):
    """Sorted paths of the files under `folder` (recursively) of a hub repo, from the hub's tree
    API ({HF_ENDPOINT}/api/{datasets|models}/{repo}/tree/main/{folder}), following its
    pagination."""
    quoted = urllib.parse.quote(folder)
    url = f"{endpoint()}/api/{repo_type}s/{repo}/tree/main/{quoted}?recursive=true"
    paths = []
    while url:
        try:
            response, _ = _open(url, 0)
            with response:
                body = response.read()
                link = response.headers.get("Link") or ""
                content_type = response.headers.get("Content-Type")
        except (urllib.error.URLError, OSError) as e:
            raise _failure(e, url) from None
        if _html_type(content_type) or _html_start(body[:512]):
            raise _html_page(f"listing {url}")
        try:
            entries = json.loads(body)
        except json.JSONDecodeError:
            raise OSError(f"{url}: the hub's answer is not JSON; is HF_ENDPOINT a hub?") from None
        paths += [entry["path"] for entry in entries if entry.get("type") == "file"]
        following = re.search(r'<([^>]+)>;\s*rel="next"', link)  # more than one page of entries
        if following:
            url = urllib.parse.urljoin(url, following.group(1))
        else:
            url = None
    return sorted(paths)


def stream_lines(repo, filename, repo_type="model"):
    """Yield the lines of a UTF-8 text file on the hub as they arrive, without their line ends,
    caching nothing: for reading the start of a file too large to download whole (stop iterating to
    stop reading). An HTML page in its place (a captive portal's) is an error, not lines of the
    file."""
    url = hub_url(repo, filename, repo_type)
    try:
        response, _ = _open(url, 0)
    except (urllib.error.URLError, OSError) as e:
        raise _failure(e, url) from None
    # else an HTML page is a portal's, not the file
    html_ok = filename.lower().endswith((".html", ".htm"))
    with response:
        if _html_type(response.headers.get("Content-Type")) and not html_ok:
            raise _html_page(f"reading {url}")
        n = 0
        try:
            for n, line in enumerate(response, 1):
                if n == 1 and _html_start(line) and not html_ok:
                    raise _html_page(f"reading {url}")
                yield line.decode("utf-8").rstrip("\r\n")
        except HTMLPage:
            raise  # an OSError, but no broken connection
        except UnicodeDecodeError as e:
            raise ValueError(f"{url}: line {n} is not UTF-8 (byte {e.start})") from None
        except (OSError, http.client.HTTPException) as e:
            raise OSError(f"reading {url} broke off after line {n} ({type(e).__name__}); "
                          f"run again") from None


def read_parquet(path):
    """Rows of a parquet file as dicts. Some sets (GSM8K, MBPP) are on the hub only as parquet;
    pyarrow, an optional dependency, is needed for them alone. A file that does not parse is a
    one-line error naming it (see `bad_file`)."""
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise OSError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    # ArrowInvalid (bad footer); OSError (bad thrift metadata)
    except (pyarrow.ArrowException, OSError) as e:
        raise bad_file(path, f"not a readable parquet file ({e})") from None
