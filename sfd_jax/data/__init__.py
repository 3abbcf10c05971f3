"""Image sources, latent datasets and extraction."""
