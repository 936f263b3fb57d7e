#!/usr/bin/env bash
# Train the bundled demo model (ldm/demo/shapes-32px) from nothing, with the package's own scripts, on a CPU.
# About two and a half hours on a 2-core CPU (docs/demo.md has the measured times and the results).
#
#   bash train/demo.sh [OUT_DIR]      # default runs/demo; then: ldm-generate "..." --model OUT_DIR/ldm-neutral2/model
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
# 5. two fine-tunes that make words the demo never saw neutral in a negative prompt (train.uncond_words: random
#    unseen words trained as unconditional; issue 28): 500 steps of 128 with 10% of the captions, then 600 of 64
#    with 25%, on a 4096-image cache: ~9 + ~10 min
accelerate launch --cpu train/train_ldm.py --config configs/ldm/shapes-demo-neutral.yaml \
    train.output_dir="$out/ldm-neutral" model.pretrained="$out/ldm-offset/model" cache.vae="$out/vae-f2/vae" \
    text_encoder.path="$out/text-encoder"
accelerate launch --cpu train/train_ldm.py --config configs/ldm/shapes-demo-neutral.yaml \
    train.output_dir="$out/ldm-neutral2" model.pretrained="$out/ldm-neutral/model" \
    cache.dir="$out/ldm-neutral/latents" cache.vae="$out/vae-f2/vae" text_encoder.path="$out/text-encoder" \
    train.uncond_words=0.25 train.batch_size=64 train.max_steps=600
# 6. prompt adherence, img2img, inpainting and the negative prompt (~7 min), and the README's negative prompt
ldm-eval --model "$out/ldm-neutral2/model" --json "$out/eval.json"
python bench/demo_negative.py --model "$out/ldm-neutral2/model"
