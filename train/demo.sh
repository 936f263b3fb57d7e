#!/usr/bin/env bash
# Train the bundled demo model (ldm/demo/shapes-32px) from nothing, with the package's own scripts, on a CPU.
# About two hours on a 2-core CPU (docs/demo.md has the measured times and the results).
#
#   bash train/demo.sh [OUT_DIR]      # default runs/demo; then: ldm-generate "..." --model OUT_DIR/ldm-offset/model
set -euo pipefail
out=${1:-runs/demo}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

# 1. the VAE (f=2, 16x16x4 latents): ~18 min; its reconstructions must keep every attribute readable
accelerate launch --cpu train/train_vae.py --config configs/vae/shapes-demo-f2.yaml train.output_dir="$out/vae-f2"
# 2. the frozen text encoder: a small CLIP text transformer (width 32, the real CLIP tokenizer), pre-trained
#    contrastively on shapes image-caption pairs of the training split: ~9 min (its image tower is kept in
#    text-encoder/image_tower/; the bundled one, ldm/demo/image-tower, was trained against the shipped text encoder
#    with configs/text/shapes-demo-image-tower.yaml)
python train/train_text_encoder.py --config configs/text/shapes-demo.yaml output_dir="$out/text-encoder"
# 3. the latent cache and the U-Net (4.1M parameters, 4000 steps of 128): ~1 min + ~60 min
accelerate launch --cpu train/train_ldm.py --config configs/ldm/shapes-demo.yaml train.output_dir="$out/ldm" \
    cache.vae="$out/vae-f2/vae" text_encoder.path="$out/text-encoder"
# 4. a fine-tune with offset noise, so backgrounds and layouts follow the prompt instead of the seed: ~23 min
accelerate launch --cpu train/train_ldm.py --config configs/ldm/shapes-demo-offset.yaml \
    train.output_dir="$out/ldm-offset" model.pretrained="$out/ldm/model" cache.dir="$out/ldm/latents" \
    cache.vae="$out/vae-f2/vae" text_encoder.path="$out/text-encoder"
# 5. prompt adherence, img2img, inpainting and the negative prompt (~4 min)
ldm-eval --model "$out/ldm-offset/model" --json "$out/eval.json"
