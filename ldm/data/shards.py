"""WebDataset tar shards (the layout img2dataset writes) as records with random access, for `build_image_dataset`.

`data.path` may be one `.tar` file or a brace pattern such as `/data/shards/{00000..00999}.tar`, local or remote
(`s3://bucket/{00000..00099}.tar`, `https://host/{...}.tar`: read through `ldm.data.remote`); the pattern is
expanded by webdataset's own `expand_urls` (braceexpand). Inside a shard, consecutive members with the same key form
one sample, split as webdataset splits them (`webdataset.tariterators.base_plus_ext`: `000017.jpg`, `000017.txt`,
`000017.json` -> key `000017`). A sample's image is its first member with an image extension; its caption is the
`.txt` member, or else the `data.caption_column` key of its `.json` member (img2dataset's json calls it "caption").

Why not webdataset's own reader (or `datasets` streaming of the tars): both are sequential streams (an
`IterableDataset`). Our data order is a pure function of (seed, epoch, index) so a resumed run sees exactly the batches
an uninterrupted one would, the latent cache is keyed by the dataset index, and a bad sample is reported by its index
and name; all three need map-style access. So each shard is indexed once (`tarfile` gives every member's byte offset;
the index is cached as JSON, keyed by the shard's path, size and mtime, or a remote shard's URL, size and ETag) and a
record is read with one seek (remote: one ranged GET) covering its members. A global
index maps to (shard, offset) through the cumulative sample counts, and the existing sampler, caches and resume work
unchanged. Each process still reads its own shards where it reads images at all: `process_indices` gives process r
the samples of shards r, r+n, r+2n, ..., which is how the latent cache build splits the encoding work.

Faults: a missing shard of the pattern, a file that is not a tar archive, and a truncated tar (samples before the
damage are kept) are skipped, named in one warning and counted (`ShardRecords.problems`); a corrupt image inside a
good shard is skipped at decode time like any bad image file (`ldm.data.decoding`), named `<shard>/<member>`. A
shard that cannot be read mid-run (deleted; remote: still failing after `ldm.data.remote`'s retries) is skipped from
then on, named in one warning and counted too, its samples reported as skipped. A pattern that matches no readable
sample is a `UserError`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ldm.data.remote import RemoteFiles, RemoteOptions, RemoteUnavailable, check_url, is_remote
from ldm.errors import UserError
from ldm.files import atomic_write_text

log = logging.getLogger(__name__)

INDEX_VERSION = 1
# Lower-case extensions we read as the sample's image (img2dataset writes jpg by default); a sample with several
# images uses the first one in tar order.
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


def is_shard_source(source: str) -> bool:
    """True for a `.tar` path or a brace pattern of them: what `build_image_dataset` routes here."""
    return source.endswith(".tar") or ("{" in source and ".tar" in source)


def expand_pattern(source: str) -> list[str]:
    """The shard paths a pattern names, in order (webdataset's expansion: braces, `::` lists, `$WDS_` variables)."""
    from webdataset.shardlists import expand_urls  # deferred: importing webdataset pulls in numpy and more

    if source.startswith("pipe:"):
        raise UserError(f"data.path '{source}': webdataset's pipe: sources are not supported (we need random "
                        "access): use a local path, http(s):// or s3://")
    check_url(source)
    paths = [p if is_remote(p) else os.path.expanduser(p) for p in expand_urls(source) if p]
    if not paths:
        raise UserError(f"data.path '{source}' expands to no shard names: fix the brace pattern")
    return paths


class ShardRecords(Sequence):
    """`datasets`-like records over tar shards: `records[i] = {image_column: {"bytes", "path"}, caption_column: str}`.

    The image bytes are read on access (one open + seek + read); `path` is `<shard file>/<member>`, which is how a
    bad sample is named. `shard_of(i)` and `shard_starts` map global indices to shards.
    """

    def __init__(
        self, source: str, indexes: list[dict[str, Any]], image_column: str, caption_column: str | None,
        problems: list[str], remote: RemoteFiles | None = None,
    ) -> None:
        self.source = source
        self.indexes = [ix for ix in indexes if ix["samples"]]
        self.image_column, self.caption_column = image_column, caption_column
        self.problems = problems
        self.remote = remote or RemoteFiles()
        self.failed: dict[int, str] = {}  # shard -> why: shards that became unreadable mid-run (in this process)
        self.shard_starts = [0]
        for ix in self.indexes:
            self.shard_starts.append(self.shard_starts[-1] + len(ix["samples"]))
        self.column_names = [image_column] + ([caption_column] if caption_column else [])

    def __len__(self) -> int:
        return self.shard_starts[-1]

    def shard_of(self, index: int) -> int:
        return bisect.bisect_right(self.shard_starts, index) - 1

    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = self.shard_of(index)
        ix = self.indexes[shard]
        sample = ix["samples"][index - self.shard_starts[shard]]
        path = ix["path"]
        name = sample["image"][0]
        wanted = [sample["image"]] + ([sample[k] for k in ("txt", "json") if k in sample] if self.caption_column else [])
        # the sample's members lie next to each other in the tar: one read (one ranged GET) covers them all
        start, end = min(m[1] for m in wanted), max(m[1] + m[2] for m in wanted)
        try:
            span = self._read_span(shard, path, start, end)
        except (RemoteUnavailable, OSError) as error:
            why = self.failed.get(shard) or self._fail(shard, path, error)
            record: dict[str, Any] = {self.image_column: {"bytes": None, "path": f"{path}/{name}", "error": why}}
            if self.caption_column:
                record[self.caption_column] = ""
            return record

        def member(entry: list) -> bytes:
            return span[entry[1] - start:entry[1] - start + entry[2]]

        record = {self.image_column: {"bytes": member(sample["image"]), "path": f"{path}/{name}"}}
        if self.caption_column:
            record[self.caption_column] = self._caption(member, sample)
        return record

    def _read_span(self, shard: int, path: str, start: int, end: int) -> bytes:
        if shard in self.failed:
            raise RemoteUnavailable(self.failed[shard])
        if is_remote(path):
            return self.remote.read(path, start, end)
        with open(path, "rb") as file:
            file.seek(start)
            data = file.read(end - start)
        if len(data) != end - start:
            raise OSError(f"{path}: shorter than its index (rewritten or truncated mid-run)")
        return data

    def _fail(self, shard: int, path: str, error: BaseException) -> str:
        """Skip shard `shard` from now on (in this process): named in one warning and counted in `problems`."""
        reason = " ".join(str(error).split())[:200]
        why = f"shard unreadable mid-run: {reason}"
        self.failed[shard] = why
        self.problems.append(f"{path}: {why}")
        log.warning("skipping shard %s for the rest of the run: %s", path, reason)
        return why

    def _caption(self, member: Any, sample: dict[str, Any]) -> str:
        if "txt" in sample:
            return member(sample["txt"]).decode("utf-8", errors="replace").strip()
        if "json" in sample:
            try:
                value = json.loads(member(sample["json"]))
            except ValueError:
                return ""
            caption = value.get(self.caption_column) if isinstance(value, dict) else None
            return "" if caption is None else str(caption)
        return ""

    def fingerprint_parts(self) -> list[str]:
        # local shards by mtime (as ever: existing latent caches keep their keys), remote ones by ETag/Last-Modified
        return [f"{ix['path']}\t{ix['size']}\t{ix['mtime_ns'] if 'mtime_ns' in ix else ix['stamp']}"
                for ix in self.indexes]


def load_shards(
    source: str, image_column: str, caption_column: str | None, cache_dir: str | None = None,
    remote: RemoteOptions | None = None,
) -> ShardRecords:
    """Expand `source`, index every shard (or reuse its cached index), skip and report unreadable shards.

    Remote shards (`ldm.data.remote`) are stat-ed, indexed and read with `remote`'s storage options and retries; a
    shard still unreachable after them is skipped and counted, except the first one tried: a run whose storage
    cannot be reached at all stops with a `UserError` instead of trying every shard.
    """
    paths = expand_pattern(source)
    files = RemoteFiles(remote)
    index_dir = Path(cache_dir).expanduser() if cache_dir else _default_index_dir()
    indexes, problems = [], []
    reached = False
    for path in paths:
        try:
            stamp = _stamp(path, files)
        except RemoteUnavailable as error:
            if not reached:
                raise UserError(f"cannot reach {error}: check data.path, the server or endpoint "
                                "(data.storage_options, AWS_ENDPOINT_URL) and the network") from None
            problems.append(f"{error}")
            continue
        reached = True
        if stamp is None:
            problems.append(f"{path}: missing")
            continue
        try:
            ix = _cached_index(path, stamp, index_dir, files)
        except RemoteUnavailable as error:
            problems.append(f"{error}")
            continue
        if ix.get("problem"):
            problems.append(f"{path}: {ix['problem']}")
        if ix["no_image"]:
            log.warning("%s: %d samples without an image member (%s ...) are left out",
                        path, len(ix["no_image"]), ", ".join(ix["no_image"][:3]))
        indexes.append(ix)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        log.warning("skipped %d of %d shards of %s: %s", len(problems), len(paths), source, shown)
    records = ShardRecords(source, indexes, image_column, caption_column, problems, files)
    if len(records) == 0:
        raise UserError(
            f"data.path '{source}' matches {len(paths)} shard names but no readable samples "
            f"({'; '.join(problems[:3]) or 'no image members'}): fix the pattern or the shards"
        )
    if caption_column and not any(("txt" in s or "json" in s) for ix in records.indexes for s in ix["samples"]):
        raise UserError(
            f"no sample of '{source}' has a .txt or .json caption member: add captions to the shards or set "
            "data.caption_column to null to train without captions"
        )
    return records


def process_indices(records: ShardRecords, rank: int, world_size: int) -> list[int]:
    """The global indices of the samples in shards rank, rank + world_size, ... (each process its own shards)."""
    own: list[int] = []
    for shard in range(rank, len(records.indexes), world_size):
        own.extend(range(records.shard_starts[shard], records.shard_starts[shard + 1]))
    return own


# ------------------------------------------------------------------------------------------------- the shard index


def _default_index_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "ldm" / "shard-index"


def _stamp(path: str, files: RemoteFiles) -> dict[str, Any] | None:
    """What keys a shard's index: `{"size", "mtime_ns"}` (local) or `{"size", "stamp"}` (remote); None: missing."""
    if is_remote(path):
        return files.stat(path)
    if not os.path.isfile(path):
        return None
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _cached_index(path: str, stamp: dict[str, Any], index_dir: Path, files: RemoteFiles) -> dict[str, Any]:
    """The index of one shard, from `index_dir` when its path, size and mtime (remote: URL, size and ETag or
    Last-Modified) match, else built and saved there."""
    if is_remote(path):
        key_text = f"{INDEX_VERSION}\t{path}\t{stamp['size']}\t{stamp['stamp']}"
    else:
        key_text = f"{INDEX_VERSION}\t{Path(path).resolve()}\t{stamp['size']}\t{stamp['mtime_ns']}"
    key = hashlib.sha256(key_text.encode()).hexdigest()
    file = index_dir / f"{key[:32]}.json"
    try:
        ix = json.loads(file.read_text())
        if ix.get("version") == INDEX_VERSION and ix.get("path") == path:
            return ix
    except (OSError, ValueError):
        pass  # no index yet, or an unreadable one: rebuild it
    if is_remote(path):
        ix = files.index(path, lambda fileobj: index_tar(fileobj, stamp["size"], path))
    else:
        ix = index_shard(path)
    ix.update(stamp)
    try:
        index_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, json.dumps(ix) + "\n")
    except OSError as error:  # a read-only cache only costs re-indexing next time
        log.warning("cannot save the shard index %s (%s): the shard is re-indexed on every run", file, error)
    return ix


def index_shard(path: str) -> dict[str, Any]:
    """Samples of one local tar shard (see `index_tar`)."""
    with open(path, "rb") as file:
        return index_tar(file, os.path.getsize(path), path)


def index_tar(fileobj: Any, size: int, path: str) -> dict[str, Any]:
    """Samples of one tar shard as `{"image": [member, offset, size], "txt": [...], "json": [...]}`, in tar order.

    Members are grouped into samples by key like webdataset's `group_by_keys` (a new key starts a new sample). A
    damaged tar keeps the samples read before the damage (whose bytes lie wholly inside the file) and says why.
    `fileobj` is a seekable binary file of `size` bytes (local, or remote through `ldm.data.remote`).
    """
    from webdataset.tariterators import base_plus_ext

    samples: list[dict[str, Any]] = []
    no_image: list[str] = []
    problem = None
    current_key, current = None, {}

    def flush() -> None:
        if current_key is None:
            return
        if "image" in current:
            samples.append(current)
        else:
            no_image.append(current_key)

    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            while True:
                member = tar.next()
                if member is None:
                    break
                if not member.isfile():
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or os.path.basename(member.name).startswith("."):
                    continue
                if key != current_key:
                    flush()
                    current_key, current = key, {}
                entry = [member.name, member.offset_data, member.size]
                if member.offset_data + member.size > size:
                    problem = f"truncated in member {member.name} (kept {len(samples)} samples before it)"
                    current_key = None
                    break
                ext = ext.lower()
                if ext in IMAGE_EXTENSIONS and "image" not in current:
                    current["image"] = entry
                elif ext in ("txt", "json") and ext not in current:
                    current[ext] = entry
            flush()
    except (tarfile.TarError, OSError, EOFError) as error:
        if is_remote(path) and not isinstance(error, (tarfile.TarError, EOFError)):
            raise  # a network failure, not a damaged tar: `RemoteFiles.index` retries it
        kept = f" (kept {len(samples)} samples before it)" if samples else ""
        reason = "not a tar archive" if not samples and current_key is None else "damaged"
        problem = f"{reason}: {' '.join(str(error).split())[:120]}{kept}"
    if problem is None and not samples and not no_image:
        problem = "empty (no members)"
    return {"version": INDEX_VERSION, "path": path, "samples": samples, "no_image": no_image, "problem": problem}
