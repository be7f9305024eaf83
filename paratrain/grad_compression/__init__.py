"""Compression: gradient codecs for communication (this file exports only those names).

Model compression (pruning, quantization) lives in sibling modules of this package.
"""

from paratrain.grad_compression.codecs import (
    CODECS,
    Codec,
    CodecState,
    Payload,
    decode,
    get_codec,
    make_codec,
    nbytes,
)
from paratrain.grad_compression.compressor import GradientCompressor
from paratrain.grad_compression.safeguard import LossSafeguard

__all__ = [
    "CODECS",
    "Codec",
    "CodecState",
    "GradientCompressor",
    "LossSafeguard",
    "Payload",
    "decode",
    "get_codec",
    "make_codec",
    "nbytes",
]
