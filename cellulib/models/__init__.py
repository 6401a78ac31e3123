"""The networks: encoder, FPN/U-Net decoders, direct and SR-cascade models, the 81 features and
LightGBM, the losses, and the device side of running them (precision, memory layout)."""

__all__ = ["engine", "features", "losses", "networks"]
