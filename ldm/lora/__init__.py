"""LoRA adapters: training them on a U-Net (config.py, train.py, export.py), saving them in diffusers' and kohya's
formats (save.py), and loading them at inference (load.py, apply.py, prompt_tags.py)."""
