"""Caption tags (ldm/data/caption_tags.py): kohya's shuffle/keep/dropout rules, their statistics, determinism per
dataset key, and the refusal with the text-embedding cache. Exact resume with tags on: tests/test_masked_loss.py's
end-to-end runs (one set of tiny training runs serves both features)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch

from ldm.config import load_config
from ldm.data.caption_tags import TagOptions, process_tags
from ldm.errors import UserError
from ldm.latents.cache import LatentCache
from ldm.unet.config import LDMConfig

CAPTION = "sks person, red hair, smiling, outdoors, looking at viewer, upper body"
TAGS = [t.strip() for t in CAPTION.split(",")]


def test_defaults_leave_the_caption_as_written_and_draw_nothing():
    rng = random.Random(0)
    odd = "  a,b ,,c  "
    assert process_tags(odd, TagOptions(), rng) == odd
    assert process_tags(odd, TagOptions(keep_tokens=2), rng) == odd  # keep_tokens alone changes nothing (as kohya)
    assert rng.random() == random.Random(0).random()  # no draw was made


def test_shuffle_keeps_the_first_tags_in_place_and_every_tag():
    seen_first = Counter()
    for seed in range(400):
        out = process_tags(CAPTION, TagOptions(shuffle=True, keep_tokens=2), random.Random(seed)).split(", ")
        assert out[:2] == TAGS[:2] and sorted(out) == sorted(TAGS)
        seen_first[out[2]] += 1
    # each of the 4 free tags leads the shuffled part about 1/4 of the time: 100 +- 5 sigma (sigma = sqrt(400 * 3/16))
    assert set(seen_first) == set(TAGS[2:])
    assert all(abs(n - 100) < 5 * math.sqrt(400 * 3 / 16) for n in seen_first.values()), seen_first


def test_the_draws_are_kohyas_shuffle_then_one_coin_per_free_tag():
    # the same draws by hand: strip, split on ",", keep 1, rng.shuffle(rest), then rng.random() >= p keeps a tag
    rng = random.Random(7)
    rest = TAGS[1:]
    rng.shuffle(rest)
    expected = ", ".join(TAGS[:1] + [t for t in rest if rng.random() >= 0.5])
    assert process_tags(CAPTION, TagOptions(shuffle=True, keep_tokens=1, dropout=0.5), random.Random(7)) == expected


def test_tag_dropout_rate_and_kept_tags_are_never_dropped():
    kept, total, n = 0, 0, 2000
    for seed in range(n):
        out = process_tags(CAPTION, TagOptions(keep_tokens=1, dropout=0.3), random.Random(seed)).split(", ")
        assert out[0] == TAGS[0]
        assert out[1:] == [t for t in TAGS[1:] if t in out[1:]]  # order unchanged without shuffle
        kept, total = kept + len(out) - 1, total + len(TAGS) - 1
    # 10000 Bernoulli(0.7) draws: sd 0.0046; 0.02 is over 4 sigma
    assert kept / total == pytest.approx(0.7, abs=0.02)
    assert process_tags(CAPTION, TagOptions(keep_tokens=2, dropout=1.0), random.Random(0)) == ", ".join(TAGS[:2])


def test_the_latent_dataset_draws_tags_from_the_key(tmp_path):
    # a cache of 3 rows, no flips: the item for a key is a pure function of (seed, key); each epoch shuffles anew
    cache = LatentCache.__new__(LatentCache)
    cache.manifest = {"data": {"random_flip": False, "resolution": 8}}
    cache.indices = torch.arange(3)
    cache.captions = [CAPTION] * 3
    cache.tensors = {"mean": torch.zeros(3, 4, 1, 1), "std": torch.zeros(3, 4, 1, 1),
                     "original_size": torch.zeros(3, 2, dtype=torch.long),
                     "crop_top_left": torch.zeros(3, 2, dtype=torch.long)}
    cache._position = {i: i for i in range(3)}
    tags = TagOptions(shuffle=True, keep_tokens=1)
    a, b = cache.dataset(seed=5, tags=tags), cache.dataset(seed=5, tags=tags)
    captions = [a[key]["caption"] for key in range(30)]
    assert captions == [b[key]["caption"] for key in range(30)]  # the same keys, the same captions
    assert len(set(captions)) > 10  # and not one order for all (120 possible orders)
    assert all(c.startswith(TAGS[0] + ", ") for c in captions)
    assert [cache.dataset(seed=5)[key]["caption"] for key in range(3)] == [CAPTION] * 3  # off: as written


@pytest.mark.parametrize("key", ["data.shuffle_tags=true", "data.tag_dropout=0.1"])
def test_the_text_embedding_cache_is_refused_with_rewritten_captions(key):
    with pytest.raises(UserError) as error:
        load_config(LDMConfig, None, ["cache.text_embeddings=true", key])
    assert str(error.value) == (
        "config key 'cache.text_embeddings': cannot be used with data.shuffle_tags or data.tag_dropout: it stores one "
        "embedding per caption as written, and those rewrite the caption every step; set one of them off")
    load_config(LDMConfig, None, [key])  # alone: fine


@pytest.mark.parametrize("key, message", [("data.keep_tokens=-1", "must be >= 0"),
                                          ("data.tag_dropout=1.5", "must be in [0, 1]")])
def test_bad_tag_settings_are_refused(key, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[")):
        load_config(LDMConfig, None, [key])
