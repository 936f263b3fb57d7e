"""The `data` section shared by both training stages."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ldm.config import check
from ldm.data.shards import is_shard_source
from ldm.hub import is_hub_id
from ldm.image_io import MAX_PIXELS


@dataclass
class DataConfig:
    # A local folder ("imagefolder" layout, metadata.jsonl optional), a hub dataset id, or "shapes": the synthetic
    # captioned shapes set, generated into `shapes_dir` on first use. Or webdataset tar shards: one `.tar` or a brace
    # pattern such as "/data/shards/{00000..00999}.tar" (ldm/data/shards.py).
    path: str = "shapes"
    # Remote shards (path "s3://bucket/{00000..00099}.tar" or "https://host/{...}.tar"; ldm/data/remote.py): options
    # for the URL's fsspec filesystem (s3: endpoint_url, key, secret, anon; http: headers; empty: AWS_* variables),
    # and the retries of a failing request: remote_tries attempts in all, waiting remote_backoff_s, 2x, 4x, ...
    # between them, each request timing out after remote_timeout_s; then the shard is skipped and counted.
    storage_options: dict[str, Any] = field(default_factory=dict)
    remote_tries: int = 4
    remote_backoff_s: float = 1.0
    remote_timeout_s: float = 60.0
    image_column: str = "image"
    caption_column: str | None = "text"
    # Tag captions (stage 2; ldm/data/caption_tags.py, kohya's rules): shuffle the comma-separated tags each time an
    # image is seen, the first keep_tokens staying in place; drop each other tag with probability tag_dropout. Not
    # with cache.text_embeddings (it stores one embedding per caption as written).
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    split: str = "train"
    resolution: int = 32
    center_crop: bool = True
    random_flip: bool = False
    # Loss masks (stage 2; ldm/data/masks.py): a metadata.jsonl "mask" column or NAME_mask.png beside NAME.ext, white =
    # trained. auto: used when the folder has any; require: refused without any (and for hub datasets / tar shards);
    # ignore: never read (_mask files are then ordinary images). Not on/off: YAML reads those as booleans.
    masks: Literal["auto", "require", "ignore"] = "auto"
    # held-out images for validation, taken from the dataset by a fixed seed (stage 2's default: 0, no validation)
    num_val: int = 64
    # or a separate held-out dataset, in any form `path` takes but "shapes" (a folder, tar shards, a hub id): all of its
    # images are validated and all of `path` trains; num_val must then be 0
    val_path: str = ""
    num_workers: int = 0
    max_image_pixels: int = MAX_PIXELS  # larger images are skipped (decompression bombs)
    shapes_count: int = 2000
    shapes_dir: str = "data/shapes"
    # Aspect-ratio buckets (stage 2; see ldm/data/buckets.py): sizes of about resolution² pixels, sides multiples
    # of bucket_step (a multiple of the VAE factor); 0 for min_side / max_side: resolution // 2 / resolution * 2.
    buckets: bool = False
    bucket_step: int = 64
    # Each bucket's area: "nearest" resolution² or "at_most" resolution² (SDXL's buckets); "auto": at_most from
    # resolution 1024 up (SDXL), nearest below (SD 1.x/2.x, the table those runs have always had).
    bucket_area: Literal["auto", "nearest", "at_most"] = "auto"
    min_side: int = 0
    max_side: int = 0
    max_aspect: float = 4.0

    def validate(self) -> None:
        check(self.resolution >= 8, "data.resolution", f"must be at least 8, got {self.resolution}")
        check(self.keep_tokens >= 0, "data.keep_tokens", f"must be >= 0 (tags kept in place), got {self.keep_tokens}")
        check(0 <= self.tag_dropout <= 1, "data.tag_dropout", f"must be in [0, 1], got {self.tag_dropout}")
        check(self.num_val >= 0, "data.num_val", f"must be >= 0, got {self.num_val}")
        if self.val_path:
            check(self.num_val == 0, "data.num_val", f"is {self.num_val} and data.val_path is set: both choose the "
                  "held-out images; set data.num_val=0 to validate on all of data.val_path, or clear data.val_path")
            check(self.val_path not in ("shapes", self.path), "data.val_path", f"'{self.val_path}' is the training "
                  "data: name a separate held-out dataset (or use data.num_val to hold images out of data.path)")
            exists = Path(self.val_path).expanduser().exists()
            check(exists or is_shard_source(self.val_path) or is_hub_id(self.val_path), "data.val_path",
                  f"'{self.val_path}' does not exist: name a local folder, tar shards or a hub id 'user/name' of "
                  "held-out images")
        check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.shapes_count > 0, "data.shapes_count", f"must be > 0, got {self.shapes_count}")
        check(self.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
        check(self.remote_tries >= 1, "data.remote_tries", f"must be >= 1, got {self.remote_tries}")
        check(self.remote_backoff_s >= 0, "data.remote_backoff_s", f"must be >= 0, got {self.remote_backoff_s}")
        check(self.remote_timeout_s > 0, "data.remote_timeout_s", f"must be > 0, got {self.remote_timeout_s}")
        if self.buckets:
            check(self.bucket_step >= 1, "data.bucket_step", f"must be >= 1, got {self.bucket_step}")
            check(self.max_aspect >= 1, "data.max_aspect", f"must be >= 1 (width/height or height/width), got "
                  f"{self.max_aspect}")
            check(self.min_side >= 0 and self.max_side >= 0, "data.min_side", "min_side and max_side must be >= 0")
