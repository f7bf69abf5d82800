"""Generative models that make training pairs (GenSeg's mask-to-image generator and its discriminator)."""
