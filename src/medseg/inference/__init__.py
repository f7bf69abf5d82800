"""Inference wrappers around medseg's models: prompt predictor, 3D propagation."""
