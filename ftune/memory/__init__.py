"""Memory: live readings while training, and (with estimate-vram) the analytical model."""
