"""Model compression of a trained checkpoint: pruning, int8 quantization, distillation, export and a
measured report (``paratrain compress``; see docs/model-compression.md)."""
