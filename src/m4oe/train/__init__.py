"""Training workflows: phase-1 MAE pre-training, phase-2 gated fine-tuning, baselines."""
