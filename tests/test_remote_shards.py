"""Remote webdataset shards (`ldm.data.remote`): over HTTP (a range-serving server on 127.0.0.1) and S3 (moto's server
on 127.0.0.1), read exactly as the same files are read locally; retries, skipped shards, one-line errors."""

from __future__ import annotations

import email.utils
import logging
import os
import shutil
import threading
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from shard_files import PER_SHARD, write_shards

from ldm.data.dataset import collate_images
from ldm.data.loader import train_loader
from ldm.data.remote import RemoteFiles, RemoteOptions, RemoteUnavailable
from ldm.data.shards import load_shards
from ldm.data.sources import build_image_dataset
from ldm.data.transforms import ImageTransform
from ldm.errors import UserError

FAST = RemoteOptions(tries=3, backoff_s=0.01, timeout_s=5.0)  # retries without waiting in tests


class RangeHandler(SimpleHTTPRequestHandler):
    """Static files with what a shard reader needs from a web server: HEAD with Content-Length and an ETag, and
    GET with a `Range: bytes=a-b` header answered by 206 and those bytes. `server.fail[name] = n` answers the next
    n requests for /name with 503 (a flaky server)."""

    def log_message(self, *args) -> None:  # quiet
        pass

    def _file(self) -> Path | None:
        name = self.path.split("?", 1)[0].lstrip("/")
        self.server.requests.append((self.command, name, self.headers.get("Range")))
        if self.server.fail.get(name, 0) > 0:
            self.server.fail[name] -= 1
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE)
            return None
        path = Path(self.server.root, name)
        if not path.is_file():
            self.send_error(HTTPStatus.NOT_FOUND)
            return None
        return path

    def _headers(self, path: Path, status: int, length: int, extra: dict[str, str]) -> None:
        stat = path.stat()
        self.send_response(status)
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        for key, value in extra.items():
            self.send_header(key, value)
        self.end_headers()

    def do_HEAD(self) -> None:
        path = self._file()
        if path is not None:
            self._headers(path, 200, path.stat().st_size, {})

    def do_GET(self) -> None:
        path = self._file()
        if path is None:
            return
        data = path.read_bytes()
        ask = self.headers.get("Range")
        if ask is None:
            self._headers(path, 200, len(data), {})
            self.wfile.write(data)
            return
        first, _, last = ask.removeprefix("bytes=").partition("-")
        start, end = int(first), min(int(last) + 1 if last else len(data), len(data))
        self._headers(path, 206, end - start, {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})
        self.wfile.write(data[start:end])


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> SimpleNamespace:
    root = tmp_path_factory.mktemp("remote")
    write_shards(root / "data", 4, corrupt="000000007")
    return SimpleNamespace(root=root, data=root / "data", pattern=str(root / "data" / "{00000..00003}.tar"))


@pytest.fixture(scope="module")
def http(local):
    """A threading HTTP server on a free port of 127.0.0.1 serving a copy of the shards (the test may change it)."""
    served = local.root / "served"
    shutil.copytree(local.data, served)
    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.root, server.fail, server.requests = str(served), {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    yield SimpleNamespace(server=server, root=served, url=url, pattern=f"{url}/{{00000..00003}}.tar")
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture(scope="module")
def s3(local):
    """moto's S3 server on a free port of 127.0.0.1 with bucket 'shards' holding the shards; fake credentials."""
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="shards")
    for path in sorted(local.data.glob("*.tar")):
        client.upload_file(str(path), "shards", f"data/{path.name}")
    options = RemoteOptions({"endpoint_url": endpoint}, tries=3, backoff_s=0.01, timeout_s=5.0)
    yield SimpleNamespace(client=client, options=options, pattern="s3://shards/data/{00000..00003}.tar")
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def dataset(pattern: str, index_dir: Path, remote: RemoteOptions | None = None):
    return build_image_dataset(pattern, transform=ImageTransform(16, True, True), caption_column="caption",
                               cache_dir=str(index_dir), remote=remote)


def batches(data, n: int = 6) -> list[dict]:
    process = SimpleNamespace(process_index=0, num_processes=1)
    it = iter(train_loader(data, 4, 0, seed=3, accelerator=process, start_batch=0))
    return [next(it) for _ in range(n)]


def assert_same_batches(a: list[dict], b: list[dict]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x["indices"].tolist() == y["indices"].tolist() and x["captions"] == y["captions"]
        assert x["skipped"] == y["skipped"]
        assert torch.equal(x["pixel_values"], y["pixel_values"])  # bit for bit: the same bytes, the same crops


# s3 is slow-marked: starting moto's server and importing boto3/s3fs take ~5 s on one core
@pytest.mark.parametrize("where", ["http", pytest.param("s3", marks=pytest.mark.slow)])
def test_remote_shards_give_the_records_and_batches_of_the_same_local_files(where, local, request, tmp_path):
    server = request.getfixturevalue(where)
    remote = FAST if where == "http" else server.options
    here, there = dataset(local.pattern, tmp_path / "i1"), dataset(server.pattern, tmp_path / "i2", remote)
    assert len(here) == len(there) == 4 * PER_SHARD
    for i in range(len(here)):
        a, b = here._records[i], there._records[i]
        assert a["image"]["bytes"] == b["image"]["bytes"] and a["caption"] == b["caption"]
    # random flips on: the same (seed, key) randomness; 7 is undecodable, named the same way in both
    remote_batches = batches(there)
    assert_same_batches(batches(here), remote_batches)
    skipped = [name for batch in remote_batches[:5] for name in batch["skipped"]]  # one epoch: 5 batches of 4
    assert skipped == ["00001.tar/000000007.jpg: not an image (unrecognised format)"]
    assert here.fingerprint() != there.fingerprint()  # another source: another latent cache
    # the index is cached, keyed by URL + size + ETag: a second load does not walk the tars again
    if where == "http":
        server.server.requests.clear()
        again = dataset(server.pattern, tmp_path / "i2", remote)
        assert {r[0] for r in server.server.requests} == {"HEAD"} and again.fingerprint() == there.fingerprint()
        one = again._records[3]  # one sample (jpg + json + txt members) is one ranged GET
        assert [r[0] for r in server.server.requests[4:]] == ["GET"] and one["caption"] == "caption 000000003"


def test_a_flaky_server_is_retried_and_a_vanished_shard_is_skipped_named_and_counted(http, tmp_path, caplog):
    data = dataset(http.pattern, tmp_path / "index", FAST)
    records = data._records
    http.server.fail["00002.tar"] = 2  # two 503s, then fine: within 3 tries
    assert records[10]["caption"] == "caption 000000010"
    assert not records.problems
    files = RemoteFiles(RemoteOptions(tries=2, backoff_s=0.0))
    http.server.fail["00002.tar"] = 2
    with pytest.raises(RemoteUnavailable, match=r"00002.tar: 503, message='Service Unavailable'.*\(after 2 tries\)"):
        files.read(f"{http.url}/00002.tar", 0, 10)
    http.server.fail.clear()
    # a shard deleted mid-run: retried, then skipped for the rest of the run, named once and counted
    moved = http.root / "00003.tar.gone"
    (http.root / "00003.tar").rename(moved)
    try:
        http.server.requests.clear()
        with caplog.at_level(logging.WARNING):
            batch = collate_images([data[i] for i in range(15, 20)])
    finally:
        moved.rename(http.root / "00003.tar")
    assert batch["indices"].tolist() == []
    assert len(batch["skipped"]) == 5 and batch["skipped"][0].startswith("00003.tar/000000015.jpg: shard unreadable")
    assert len(records.problems) == 1 and "00003.tar: shard unreadable mid-run" in records.problems[0]
    assert caplog.text.count("skipping shard") == 1
    assert len([r for r in http.server.requests if r[1] == "00003.tar"]) == FAST.tries  # then no more requests


def test_missing_remote_shards_are_counted_and_unreachable_storage_is_one_line(http, s3, tmp_path):
    records = load_shards(f"{http.url}/{{00002..00005}}.tar", "image", "text", str(tmp_path / "i"), FAST)
    assert len(records) == 2 * PER_SHARD
    assert [p.rsplit("/", 1)[1] for p in records.problems] == ["00004.tar: missing", "00005.tar: missing"]
    records = load_shards("s3://shards/data/{00003..00004}.tar", "image", "text", str(tmp_path / "i"), s3.options)
    assert len(records) == PER_SHARD and records.problems == ["s3://shards/data/00004.tar: missing"]
    with pytest.raises(UserError, match=r"^cannot reach http://127.0.0.1:9/00000.tar: .*\(after 3 tries\): check "
                                        r"data.path, the server or endpoint"):
        load_shards("http://127.0.0.1:9/{00000..00003}.tar", "image", "text", str(tmp_path / "i"), FAST)
    with pytest.raises(UserError, match="the 'ftp://' scheme is not supported"):
        load_shards("ftp://host/{0..1}.tar", "image", "text", str(tmp_path / "i"), FAST)
    with pytest.raises(UserError, match="is a URL but not of .tar shards"):
        dataset("https://host/images/", tmp_path / "i", FAST)


def test_remote_options_come_from_the_data_config():
    from ldm.config import load_config
    from ldm.data.config import DataConfig

    cfg = load_config(DataConfig, None, ["storage_options.endpoint_url=http://127.0.0.1:9000", "remote_tries=2",
                                         "storage_options.client_kwargs.region_name=eu-west-1", "remote_backoff_s=0"])
    options = RemoteOptions.from_data_config(cfg)
    assert options.storage_options == {"endpoint_url": "http://127.0.0.1:9000",
                                       "client_kwargs": {"region_name": "eu-west-1"}}
    assert (options.tries, options.backoff_s, options.timeout_s) == (2, 0.0, 60.0)
    with pytest.raises(UserError, match=r"config key 'storage_options': expected a mapping, got 'x'"):
        load_config(DataConfig, None, ["storage_options=x"])
    with pytest.raises(UserError, match=r"config key 'data.remote_tries': must be >= 1, got 0"):
        load_config(DataConfig, None, ["remote_tries=0"])


def test_remote_reads_have_one_home():
    """Only ldm/data/remote.py talks to fsspec, s3fs, aiohttp or boto: retries and errors are decided in one place."""
    import re

    root = Path(__file__).resolve().parents[1]
    # imports at any indentation (deferred ones inside functions count): a text search, cheaper than parsing
    client = re.compile(r"^\s*(?:import|from)\s+(?:fsspec|s3fs|aiohttp|boto3|botocore|aiobotocore)\b", re.M)
    importers = {str(p.relative_to(root)) for folder in ("ldm", "train") for p in (root / folder).rglob("*.py")
                 if client.search(p.read_text())}
    assert importers == {"ldm/data/remote.py"}


@pytest.mark.slow
@pytest.mark.usefixtures("fresh_accelerate")
def test_training_from_latent_shards_over_http_equals_training_from_the_cache_directory(http, tmp_path):
    """`ldm-latent-shards` output served over HTTP as `cache.shards` trains the same U-Net, bit for bit, as the
    cache directory it was exported from, without reading data.path (it does not exist in the second run)."""
    import sys

    from safetensors.torch import load_file

    from conftest import reset_accelerate_state
    from ldm.latents.cache import LatentCache
    from ldm.latents.shard_writer import write_latent_shards
    from ldm.unet.tiny import write_tiny_stage2_inputs

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "train"))
    import train_ldm

    parts = write_tiny_stage2_inputs(tmp_path / "parts", num_images=12)
    common = ["--config", str(root / "configs/ldm/tiny.yaml"), f"cache.vae={parts['vae']}",
              f"text_encoder.path={parts['text']}", "train.report_to=none", "sample.every=0", "train.max_steps=3",
              "train.batch_size=4", "train.checkpoint_every=3", "data.random_flip=true", "data.num_val=0",
              "train.caption_dropout=0.3", "data.remote_backoff_s=0.01"]
    train_ldm.main([*common, f"train.output_dir={tmp_path / 'a'}", f"data.path={parts['data']}",
                    f"cache.dir={tmp_path / 'latents'}"])
    reset_accelerate_state()
    written = write_latent_shards(LatentCache.read(tmp_path / "latents"), str(http.root / "lat" / "l-%05d.tar"), 5)
    assert len(written) == 3
    train_ldm.main([*common, f"train.output_dir={tmp_path / 'b'}", f"data.path={tmp_path / 'no-images'}",
                    f"cache.shards={http.url}/lat/l-{{00000..00002}}.tar"])
    assert not (tmp_path / "b" / "latents").exists()

    def weights(run: str) -> dict[str, torch.Tensor]:
        files = sorted((tmp_path / run / "checkpoints/step-00000003").rglob("*.safetensors"))
        return {k: v for f in files if not f.name.startswith("rng") for k, v in load_file(f).items()}

    a, b = weights("a"), weights("b")
    assert a.keys() == b.keys() and len(a) > 0
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
