"""Training: fastai learners, the runs of each chapter and the recipe-keyed model cache."""

__all__ = ["cache", "train"]
