"""pmp_scale: Private Mask Pre-Training on DeepSpeed ZeRO-3."""
__version__ = "0.1.0"
