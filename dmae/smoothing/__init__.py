"""Randomized smoothing: the smoothed classifier (PREDICT, CERTIFY, adaptive certification), its sampling engine and
confidence bounds, and certification of a data set to a file.

May import dmae.util only: smoothing works around any base classifier.
"""

from dmae.smoothing.bounds import lower_confidence_bound, radius_cap
from dmae.smoothing.engine import (ABSTAIN, ESTIMATION, NOISE_BLOCK, PREDICTION, SELECTION, block_seed,
                                   certify_from_counts)
from dmae.smoothing.smooth import METHODS, Smooth, check_certify_args, predict_from_counts

__all__ = ["ABSTAIN", "ESTIMATION", "METHODS", "NOISE_BLOCK", "PREDICTION", "SELECTION", "Smooth", "block_seed",
           "certify_from_counts", "check_certify_args", "lower_confidence_bound", "predict_from_counts",
           "radius_cap"]
