"""Mnemo: anomaly scoring for visual inspection lines with memory-augmented autoencoders."""

__version__ = "0.1.0"
