"""Unified evaluation: FID/KID, LPIPS, CLIPScore, CUDA-synchronised timing, reports, grids and plots."""

__version__ = "0.1.0"
