"""LoRA adapters: training them on a U-Net and optionally the text encoder (config.py, train.py, export.py; resume.py
checks a resumed checkpoint's settings), saving them in diffusers' and kohya's formats (save.py), and loading them at
inference (load.py, apply.py, prompt_tags.py)."""
