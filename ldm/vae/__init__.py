"""Stage 1: the KL-regularised autoencoder, its PatchGAN discriminator and losses."""
