"""ldm: train and run latent diffusion text-to-image models."""

__version__ = "0.1.0"
