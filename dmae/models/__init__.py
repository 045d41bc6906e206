"""Models: the named architectures, the denoising masked autoencoder (DMAE / NIM / MAE), the ViT classifier, their
checkpoints (safetensors + JSON config) and the import of released checkpoints.

May import dmae.util only.
"""
