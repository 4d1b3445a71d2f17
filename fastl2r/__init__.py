"""fastl2r: Learning to Remember from a Multi-Task Teacher, with fused GPU kernels."""
__version__ = "0.1.0"
