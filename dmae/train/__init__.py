"""Training: the one training loop, and the steps it runs (pretraining, fine-tuning on noisy or De^3 inputs), with
their noise, batches, optimizer groups and schedule, losses and mixup.

May import dmae.util, dmae.data, dmae.models and dmae.settings.
"""
