"""LoRA adapters: training them on a U-Net (train.py), saving them in diffusers' and kohya's formats (save.py)."""
