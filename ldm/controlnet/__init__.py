"""ControlNet for SD 1.x/2.x and SDXL: a request's units (`unit`), opening ControlNet models (`load`), their
control images (`preprocess`, `canny`), and the per-step residuals the denoising loop adds to the U-Net
(`residuals`, `apply`). See docs/inference.md, "ControlNet"."""
