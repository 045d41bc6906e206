"""NIM / De^3 adversarial defense: the noise-denoise-classify chain, l-infinity attacks, robust accuracy.

May import dmae.util, dmae.data, dmae.models, dmae.settings and dmae.train (for its noise).
"""
