"""Model compression: quantization (int8/int4, GPTQ, GGUF blocks), pruning, distillation, GGUF export."""
