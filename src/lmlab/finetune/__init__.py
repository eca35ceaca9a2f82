"""Fine-tuning: instruction SFT, LoRA adapters, freezing, task heads, embeddings, the seed's remedies, search."""
