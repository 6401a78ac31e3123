"""Scores: cellularity agreement (:mod:`.agreement`, paper section 3.5: MSE, kappa, ICC, PK,
bootstrap intervals) and nucleus detection (:mod:`.detection`, the MCSpatNet protocol). No torch
import."""

__all__ = ["agreement", "detection"]
