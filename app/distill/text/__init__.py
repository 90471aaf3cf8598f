"""Text distillation: uploaded text datasets, offline corpora and tokenization into training tensors."""
