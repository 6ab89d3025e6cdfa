"""VAE Lab's host-free library: colour, losses, metrics, data, GAN parts and models for decoder work.

Plain torch in, torch out; nothing here imports ComfyUI. ``nodes/host.py`` is the one adapter between
this library and the host's objects.
"""
