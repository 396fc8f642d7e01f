"""tlunet: transfer-learning U-Nets for lower-grade glioma segmentation in brain MRI."""

__version__ = "0.1.0"
