"""lorakit: train kohya-compatible Stable Diffusion LoRAs, and draw with them."""

__version__ = "0.1.0"
