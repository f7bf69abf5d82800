"""Neural network models (torch): architectures whose parameters match published checkpoints."""
