"""Model compression: pruning, distillation, quantization and export formats."""
