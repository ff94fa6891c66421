"""The checkpointing engine: how activations are kept between forward and backward."""

from ftune.engine.recompute import (
    MODE_POLICIES,
    CheckpointingEngine,
    Policy,
    decoder_layers,
    install_checkpointing,
)

__all__ = ["MODE_POLICIES", "CheckpointingEngine", "Policy", "decoder_layers", "install_checkpointing"]
