"""The `data` section shared by both training stages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ldm.config import check
from ldm.image_io import MAX_PIXELS


@dataclass
class DataConfig:
    # A local folder ("imagefolder" layout, metadata.jsonl optional), a hub dataset id, or "shapes": the synthetic
    # captioned shapes set, generated into `shapes_dir` on first use. Or webdataset tar shards: one `.tar` or a brace
    # pattern such as "/data/shards/{00000..00999}.tar" (ldm/data/shards.py).
    path: str = "shapes"
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
        check(self.num_workers >= 0, "data.num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.shapes_count > 0, "data.shapes_count", f"must be > 0, got {self.shapes_count}")
        check(self.max_image_pixels > 0, "data.max_image_pixels", "must be > 0")
        if self.buckets:
            check(self.bucket_step >= 1, "data.bucket_step", f"must be >= 1, got {self.bucket_step}")
            check(self.max_aspect >= 1, "data.max_aspect", f"must be >= 1 (width/height or height/width), got "
                  f"{self.max_aspect}")
            check(self.min_side >= 0 and self.max_side >= 0, "data.min_side", "min_side and max_side must be >= 0")
