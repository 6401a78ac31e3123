"""What the models learn from: the BreastPathQ and BRCA-M2C readers, cell annotations, weak
masks and augmentations, stain, the synthetic H&E generator, the quick and paper settings, and
the real-tissue proxies."""

__all__ = [
    "annotations", "breastpathq", "datasets", "fingerprint", "measure", "paths", "profiles",
    "proxy", "stain", "synth", "synthset", "transforms",
]
