"""Sample-quality metrics from images: the estimators (`metrics`: FID, KID, CLIP score, CMMD), the feature extractors
(`features`) and one image set's rows and two sets' numbers (`measure`). Used by `ldm-eval --metrics` and by training
runs (`sample.metrics`); below both, so neither copies it."""
