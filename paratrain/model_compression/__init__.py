"""Model compression of a trained checkpoint: pruning, int8 quantization, distillation, export
(``paratrain compress``; docs/model-compression.md)."""
