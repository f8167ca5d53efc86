"""met_lightning: Multiple-Exit Tuning (MET) of frozen timm Vision Transformers."""

__version__ = "0.1.0"
