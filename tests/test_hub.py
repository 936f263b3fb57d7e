"""ldm.hub: the hub-id pattern, the offline check, and the reachability probe (direct, through a proxy, NO_PROXY).

No test contacts an external address: the "hub" and the "proxy" are sockets listening on 127.0.0.1 (or a port
nothing listens on), and the hub's endpoint is pointed at them.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Iterator

import huggingface_hub.constants
import pytest

from conftest import free_port
from ldm import hub
from ldm.errors import UserError

_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """No offline flag anywhere and no proxy configured: the probe's verdict is the network's alone."""
    for name in hub.OFFLINE_ENV:
        monkeypatch.delenv(name, raising=False)
    for name in _PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.delenv("REQUEST_METHOD", raising=False)  # CGI: urllib would then ignore HTTP_PROXY
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    if "datasets.config" in sys.modules:
        monkeypatch.setattr(sys.modules["datasets.config"], "HF_HUB_OFFLINE", False)


@pytest.fixture
def listening() -> Iterator[int]:
    """The port of a socket listening on 127.0.0.1 (the kernel completes the handshake; nobody needs to accept)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


@pytest.fixture
def closed() -> int:
    """A port on 127.0.0.1 that nothing listens on: connecting is refused at once."""
    return free_port()


def _hub_at(monkeypatch: pytest.MonkeyPatch, port: int, host: str = "127.0.0.1") -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://{host}:{port}")


# ------------------------------------------------------------------------------------------------ hub ids


@pytest.mark.parametrize(
    "name",
    ["openai/clip-vit-large-patch14", "stable-diffusion-v1-5/stable-diffusion-v1-5", "someone/some-dataset",
     "runs/text-encoder-tiny", "user_1/my.model-v2"],
)
def test_hub_ids(name: str) -> None:
    assert hub.is_hub_id(name)


@pytest.mark.parametrize(
    "name",
    ["gpt2", "no_such_folder", "./models/sd", "../sd/x", "/abs/path", "~/models/sd", "a/b/c", "org/", "/name",
     "-org/name", ".org/name", "org name/x", "C:\\models\\sd", ""],
)
def test_not_hub_ids(name: str) -> None:
    assert not hub.is_hub_id(name)


def test_a_bare_missing_text_encoder_folder_is_reported_as_missing_not_offline() -> None:
    from ldm.text.config import TextEncoderConfig
    from ldm.text.load_encoder import load_text_encoder

    with pytest.raises(UserError, match="text encoder directory 'text-encoder' does not exist"):
        load_text_encoder(TextEncoderConfig(path="text-encoder"))


# ------------------------------------------------------------------------------------------------ offline


@pytest.mark.parametrize("name", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "ON", "yes", "True"])
def test_offline_variable_set_after_import_counts(online, monkeypatch, listening, name, value) -> None:
    _hub_at(monkeypatch, listening)
    assert not hub.offline_requested() and hub.reachable()
    monkeypatch.setenv(name, value)
    assert hub.offline_requested()
    assert not hub.reachable()  # the hub answers, but offline mode means: do not ask it


@pytest.mark.parametrize("value", ["0", "", "off", "false"])
def test_offline_variable_off(online, monkeypatch, value) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", value)
    assert not hub.offline_requested()


def test_offline_flag_read_at_import_counts(online, monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert hub.offline_requested()


def test_offline_mode_forces_and_restores_the_libraries_flags(online) -> None:
    import datasets

    with hub.offline_mode(False):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    with hub.offline_mode(True):
        assert huggingface_hub.constants.HF_HUB_OFFLINE is True
        assert datasets.config.HF_HUB_OFFLINE is True and datasets.config.HF_DATASETS_OFFLINE is True
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False and datasets.config.HF_HUB_OFFLINE is False


# ------------------------------------------------------------------------------------------------ reachability


def test_direct_probe(online, monkeypatch, listening, closed) -> None:
    _hub_at(monkeypatch, listening)
    assert hub.connect_address(huggingface_hub.constants.ENDPOINT) == ("127.0.0.1", listening)
    assert hub.reachable()
    _hub_at(monkeypatch, closed)
    start = time.monotonic()
    assert not hub.reachable()
    assert time.monotonic() - start < 3


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"])
def test_behind_a_proxy_the_proxy_is_probed(online, monkeypatch, listening, closed, variable) -> None:
    # the hub itself cannot be reached (as behind a corporate proxy); what answers is the proxy
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"https://127.0.0.1:{closed}")
    monkeypatch.setenv(variable, f"http://127.0.0.1:{listening}")
    assert hub.connect_address(huggingface_hub.constants.ENDPOINT) == ("127.0.0.1", listening)
    assert hub.reachable()
    # ... and a proxy that does not answer means unreachable: the old "behind a proxy, assume reachable" is gone
    monkeypatch.setenv(variable, f"http://127.0.0.1:{closed}")
    assert not hub.reachable()


def test_a_proxy_without_scheme_is_an_http_proxy(online, monkeypatch, listening) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"127.0.0.1:{listening}")
    assert hub.connect_address("https://hub.invalid") == ("127.0.0.1", listening)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid")
    assert hub.connect_address("https://hub.invalid") == ("proxy.invalid", 80)


def test_a_malformed_proxy_is_unreachable(online, monkeypatch, listening) -> None:
    _hub_at(monkeypatch, listening)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:port")
    assert not hub.reachable()


def test_an_http_proxy_does_not_apply_to_an_https_hub(online, monkeypatch, listening) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
    assert hub.connect_address(f"https://127.0.0.1:{listening}") == ("127.0.0.1", listening)
    assert hub.connect_address("https://hub.invalid") == ("hub.invalid", 443)
    assert hub.connect_address("http://hub.invalid") == ("127.0.0.1", 1)


def test_the_https_proxy_wins_over_all_proxy(online, monkeypatch) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:9")
    assert hub.connect_address("https://hub.invalid") == ("127.0.0.1", 9)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:8")
    assert hub.connect_address("https://hub.invalid") == ("127.0.0.1", 8)


@pytest.mark.parametrize("no_proxy", ["127.0.0.1", "localhost, 127.0.0.1", "*", "example.org,127.0.0.1", "127.0.0.0/8"])
@pytest.mark.parametrize("variable", ["NO_PROXY", "no_proxy"])
def test_no_proxy_exempts_the_hub(online, monkeypatch, listening, closed, no_proxy, variable) -> None:
    _hub_at(monkeypatch, listening)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{closed}")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed}")
    assert not hub.reachable()  # through the dead proxy
    monkeypatch.setenv(variable, no_proxy)
    assert hub.connect_address(huggingface_hub.constants.ENDPOINT) == ("127.0.0.1", listening)
    assert hub.reachable()


def test_no_proxy_for_another_host_keeps_the_proxy(online, monkeypatch, listening) -> None:
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    monkeypatch.setenv("NO_PROXY", "internal.example,10.0.0.1,10.1.0.0/16")
    assert hub.connect_address("https://huggingface.co") == ("127.0.0.1", listening)
    assert hub.connect_address("https://10.2.0.1") == ("127.0.0.1", listening)
    assert hub.connect_address("https://10.1.2.3") == ("10.1.2.3", 443)


def test_every_loader_asks_the_one_probe(online, monkeypatch, tmp_path) -> None:
    """The bug this module fixes: behind a proxy, datasets assumed the hub reachable while text encoders did not.

    Now datasets, text encoders and pipeline models all take `hub.reachable()`'s verdict.
    """
    from ldm.data.sources import build_image_dataset
    from ldm.data.transforms import ImageTransform
    from ldm.models.spec import resolve_model
    from ldm.text.config import TextEncoderConfig
    from ldm.text.load_encoder import load_text_encoder

    asked: list[str] = []

    def unreachable(timeout_s: float = 3.0) -> bool:
        asked.append(sys._getframe(1).f_globals["__name__"])
        return False

    monkeypatch.setattr(hub, "reachable", unreachable)
    with pytest.raises(UserError, match="cannot load dataset 'someone/some-dataset' from the Hugging Face hub"):
        build_image_dataset("someone/some-dataset", transform=ImageTransform(8), cache_dir=str(tmp_path / "ds"))
    with pytest.raises(UserError, match="cannot load text encoder 'someone/some-encoder' from the Hugging Face hub"):
        load_text_encoder(TextEncoderConfig(path="someone/some-encoder"))
    with pytest.raises(UserError, match="'someone/some-model' is not a local directory"):
        resolve_model("someone/some-model")
    assert asked == ["ldm.data.sources", "ldm.text.load_encoder", "ldm.models.spec"]
