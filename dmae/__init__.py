"""dmae: robust image classification with denoising (masked) autoencoders.

The core library: models, data, training loops, randomized smoothing and attacks. It knows nothing of the
command line or of DVC; `stages/` wires it to both.
"""

__version__ = "0.1.0"
