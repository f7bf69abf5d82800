"""Promptable segmentation models of the Segment Anything family (SAM, MedSAM, LiteMedSAM)."""
