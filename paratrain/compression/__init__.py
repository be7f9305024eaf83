"""Compression: gradient codecs for communication (this file exports only those names).

Model compression (pruning, quantization) lives in sibling modules of this package.
"""

from paratrain.compression.codecs import (
    CODECS,
    Codec,
    CodecState,
    Payload,
    decode,
    get_codec,
    make_codec,
    nbytes,
)
from paratrain.compression.compressor import GradientCompressor
from paratrain.compression.safeguard import LossSafeguard

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
