"""Making models smaller: quantization (int8/int4, GPTQ, llama.cpp's GGUF blocks), pruning, distillation, GGUF export."""
