"""Running trained models: model files, the prediction engine behind ``cellulib predict``, nucleus
detection (``cellulib detect``) and whole slides."""

__all__ = ["detect", "modelfile", "normalizer", "pixelsize", "predict", "slide"]
