"""Randomized smoothing: the smoothed classifier (PREDICT, CERTIFY) and certification of a data set to a file.

May import dmae.util only: smoothing works around any base classifier.
"""

from dmae.smoothing.smooth import (ABSTAIN, ESTIMATION, NOISE_BLOCK, PREDICTION, SELECTION, Smooth, block_seed,
                                   certify_from_counts, check_certify_args, lower_confidence_bound,
                                   predict_from_counts, radius_cap)

__all__ = ["ABSTAIN", "ESTIMATION", "NOISE_BLOCK", "PREDICTION", "SELECTION", "Smooth", "block_seed",
           "certify_from_counts", "check_certify_args", "lower_confidence_bound", "predict_from_counts",
           "radius_cap"]
