"""memtrain: memory-efficient training of high-resolution image-to-image models."""

__version__ = "0.1.0"
