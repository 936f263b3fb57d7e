"""Stage 2: the text-conditioned U-Net, its noise objective and its export as a diffusers model directory."""
