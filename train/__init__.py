"""A Flax (nnx) LLaMA pretraining trainer for SCALE and baseline optimizers."""
