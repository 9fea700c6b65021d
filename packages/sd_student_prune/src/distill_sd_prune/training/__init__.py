"""Training: the config and recipes, the DistillStudent module, per-step seeding, and the one training loop."""
