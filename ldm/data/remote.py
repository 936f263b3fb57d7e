"""Remote data files (`http://`, `https://`, `s3://`) through fsspec: the one home for reading training data over a
network. `ldm.data.shards` reads remote tar shards (image shards and `ldm-latent-shards` output) only through here.

What a shard reader needs is three calls, each retried the same way:

    stat(url)              size and a version stamp (ETag, else Last-Modified; a server with neither: the size
                           alone), or None for a missing file; keys the cached shard index, so a rewritten remote
                           shard is re-indexed and a resumed run is not
    read(url, start, end)  bytes [start, end): one ranged GET (a sample's members lie next to each other in a tar)
    open(url)              a seekable file object with a read-ahead cache, to walk a tar's headers once

Retries: a transient failure (a timeout, a dropped connection, HTTP 5xx or 429, and, mid-run, a file that has
disappeared) is retried `tries` times in all with exponential backoff (`backoff_s`, 2 x, 4 x ...), then raised as
`RemoteUnavailable`, which the shard reader turns into "skip this shard, name it, count it". A missing file at
start (`stat`: HTTP 404 / S3 NoSuchKey) is not retried: it is counted as missing, like a missing local shard. Access
denied (HTTP 401/403, S3 AccessDenied) and a missing s3fs are `UserError`s: retrying cannot fix a configuration.
The library clients' own retries are turned off (s3fs `retries`, botocore `max_attempts`) so `tries` means what it
says.

Credentials and endpoints: `storage_options` are passed to the URL's fsspec filesystem as they are (s3fs:
`endpoint_url`, `key`, `secret`, `anon`, `client_kwargs`; http: `headers`, `client_kwargs`) and win over defaults.
Without them S3 uses botocore's standard chain: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN,
AWS_PROFILE and ~/.aws, AWS_DEFAULT_REGION, and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an S3-compatible
server. Filesystems are made lazily in each process (a DataLoader worker makes its own after the fork: fsspec's
async clients must not cross a fork).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from ldm.errors import UserError

log = logging.getLogger(__name__)

SCHEMES = ("http", "https", "s3")
T = TypeVar("T")


def scheme_of(path: str) -> str | None:
    """The URL scheme of `path` ('s3', 'https', ...), or None for a local path."""
    head, sep, _ = path.partition("://")
    return head.lower() if sep and head.isalnum() else None


def is_remote(path: str) -> bool:
    return scheme_of(path) is not None


def check_url(path: str) -> None:
    """Refuse a scheme we do not read, naming those we do."""
    scheme = scheme_of(path)
    if scheme is not None and scheme not in SCHEMES:
        raise UserError(f"data.path '{path}': the '{scheme}://' scheme is not supported: use a local path, "
                        f"{', '.join(s + '://' for s in SCHEMES)}, or mount the storage")


class RemoteUnavailable(Exception):
    """A remote file that could not be read after every try; the message is one line naming it and why."""


@dataclass
class RemoteOptions:
    """How remote files are reached: fsspec `storage_options`, and the retry policy (`tries` attempts in all)."""

    storage_options: dict[str, Any] = field(default_factory=dict)
    tries: int = 4
    backoff_s: float = 1.0  # the wait after the first failed try; doubled after each later one
    timeout_s: float = 60.0  # per request: connecting and each read

    @classmethod
    def from_data_config(cls, cfg: Any) -> RemoteOptions:
        """From the `data` section (`ldm.data.config.DataConfig`)."""
        return cls(dict(cfg.storage_options), cfg.remote_tries, cfg.remote_backoff_s, cfg.remote_timeout_s)


class RemoteFiles:
    """stat / read / open of remote URLs with retries; picklable (each process makes its own filesystems)."""

    def __init__(self, options: RemoteOptions | None = None) -> None:
        self.options = options or RemoteOptions()
        self._filesystems: dict[str, Any] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"options": self.options}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["options"])  # type: ignore[misc]

    def stat(self, url: str) -> dict[str, Any] | None:
        """`{"size": bytes, "stamp": ETag or Last-Modified or ""}`, or None when the file does not exist."""
        try:
            info = self._retry(url, lambda: self._fs(url).info(url), missing_is_transient=False)
        except FileNotFoundError:
            return None
        stamp = next((str(info[k]) for k in ("ETag", "LastModified", "Last-Modified", "mtime") if info.get(k)), "")
        if info.get("size") is None:
            raise RemoteUnavailable(f"{url}: the server does not say its size (no Content-Length)")
        return {"size": int(info["size"]), "stamp": stamp}

    def read(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of `url` in one ranged request (a server that ignores the range is an error)."""

        def read_range() -> bytes:
            data = self._fs(url).cat_file(url, start=start, end=end)
            if len(data) != end - start:  # fsspec's http returns a 200's whole body as it is
                raise UserError(f"{url}: asked for bytes {start}-{end - 1}, got {len(data)} bytes: the server must "
                                "support HTTP range requests (Accept-Ranges: bytes)")
            return data

        return self._retry(url, read_range, missing_is_transient=True)

    def index(self, url: str, walk: Callable[[Any], T]) -> T:
        """`walk(file)` over a seekable, read-ahead-cached file object of `url`, retried from the start on failure."""

        def run() -> T:
            with self._fs(url).open(url, "rb", block_size=1 << 20, cache_type="readahead") as file:
                return walk(file)

        return self._retry(url, run, missing_is_transient=True)

    # ------------------------------------------------------------------------------------------------ internals

    def _retry(self, url: str, call: Callable[[], T], missing_is_transient: bool) -> T:
        delay = self.options.backoff_s
        for attempt in range(1, self.options.tries + 1):
            try:
                return call()
            except Exception as error:  # noqa: BLE001 (classified below, the rest re-raised)
                kind = _classify(error)
                if kind == "denied":
                    raise UserError(f"access to {url} was denied ({_reason(error)}): set credentials (AWS_* "
                                    "variables for s3://) or data.storage_options") from None
                if kind == "missing" and not missing_is_transient:
                    raise FileNotFoundError(url) from None
                if kind == "other":
                    raise
                if attempt == self.options.tries:
                    reason = "not found (deleted?)" if kind == "missing" else _reason(error)
                    raise RemoteUnavailable(f"{url}: {reason} (after {attempt} tries)") from None
                log.debug("%s: %s; try %d of %d in %.2f s", url, _reason(error), attempt + 1, self.options.tries,
                          delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    def _fs(self, url: str) -> Any:
        if os.getpid() != self._pid:  # forked into a DataLoader worker: make fresh clients
            self._filesystems, self._pid = {}, os.getpid()
        scheme = scheme_of(url) or "file"
        if scheme not in self._filesystems:
            self._filesystems[scheme] = self._make_filesystem(scheme)
        return self._filesystems[scheme]

    def _make_filesystem(self, scheme: str) -> Any:
        import fsspec

        timeout = self.options.timeout_s
        options: dict[str, Any] = dict(self.options.storage_options)
        if scheme == "s3":
            try:
                import s3fs  # noqa: F401
            except ImportError:
                raise UserError("s3:// data paths need s3fs: pip install 'ldm[remote]'") from None
            config = {"connect_timeout": timeout, "read_timeout": timeout, "retries": {"max_attempts": 1}}
            options["config_kwargs"] = {**config, **options.get("config_kwargs", {})}
        else:
            try:
                import aiohttp
            except ImportError:
                raise UserError(f"{scheme}:// data paths need aiohttp: pip install 'ldm[remote]'") from None
            options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=timeout),
                                        **options.get("client_kwargs", {})}
        try:
            fs = fsspec.filesystem(scheme, skip_instance_cache=True, **options)
        except (TypeError, ValueError) as error:
            raise UserError(f"data.storage_options do not fit the {scheme}:// filesystem ({_reason(error)}): "
                            "fix them") from None
        if scheme == "s3":
            fs.retries = 1  # s3fs's own retry loop; ours is `tries`
        return fs


def _classify(error: BaseException) -> str:
    """'missing', 'denied', 'transient' or 'other', looking through the chain of causes (fsspec's http `info`
    wraps every failure, a refused connection included, in a FileNotFoundError)."""
    chain: list[BaseException] = []
    node: BaseException | None = error
    while node is not None and len(chain) < 8:
        chain.append(node)
        node = node.__cause__ or node.__context__
    for node in chain:
        status = getattr(node, "status", None)
        if isinstance(status, int):
            if status in (401, 403):
                return "denied"
            if status in (404, 410):
                return "missing"
            if status == 429 or status >= 500:
                return "transient"
    if any(isinstance(node, PermissionError) for node in chain):
        return "denied"
    if any(_is_transient(node) for node in chain):
        return "transient"
    if any(isinstance(node, FileNotFoundError) for node in chain):
        return "missing"
    return "other"


def _is_transient(error: BaseException) -> bool:
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    kind = type(error)
    names = {c.__module__.split(".")[0] + "." + c.__name__ for c in kind.__mro__}
    transient = {"aiohttp.ClientConnectionError", "aiohttp.ClientPayloadError", "aiohttp.ServerTimeoutError",
                 "botocore.EndpointConnectionError", "botocore.ConnectionError", "botocore.ReadTimeoutError",
                 "botocore.ConnectTimeoutError", "urllib3.HTTPError"}
    if names & transient:
        return True
    return isinstance(error, OSError) and not isinstance(error, (FileNotFoundError, PermissionError))


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:160]
