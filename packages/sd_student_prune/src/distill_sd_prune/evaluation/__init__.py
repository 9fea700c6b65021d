"""Evaluation: periodic FID/LPIPS during training, ``distill prune evaluate``, and per-budget champions."""
