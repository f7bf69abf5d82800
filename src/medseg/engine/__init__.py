"""Training loops: fine-tuning the promptable model (and, later, supervised and in-context training)."""
