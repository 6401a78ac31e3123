"""What the book reports: the paper's numbers and tables, findings, figures, evaluation against
labels, stain and scanner shifts, and the models on real tissue."""

__all__ = [
    "evaluation", "paper", "parameters", "plots", "realtissue", "robustness", "scoring",
    "sentences", "statistics", "tables", "verdicts",
]
