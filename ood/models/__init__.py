"""Backbones by name (timm) and checkpoint I/O: see `backbones` and `specs`."""
