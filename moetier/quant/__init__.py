"""Quantized expert formats: pre-quantized checkpoint formats (MXFP4) and, later, weight-only int8/int4."""
