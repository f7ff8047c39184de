"""Quantized frozen weights: the only package that imports bitsandbytes.

bnb.py   QuantSpec, QuantLinear (a quantized value held in frozen parameters), quantize / dequantize / roundtrip,
         bitsandbytes' 8-bit and paged optimizer classes, DTYPES
cpu.py   bitsandbytes' CPU NF4/FP4 arithmetic in torch/numpy, chunked and threaded (bit-identical codes)

May import: the root modules (terms, errors, ...). Imported by everything that holds or makes a quantized weight.
"""
