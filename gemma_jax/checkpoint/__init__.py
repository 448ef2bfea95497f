"""Checkpoint formats and conversion (modules are imported on demand).

    native   this project's orbax params + model config (save / load)
    hf       Hugging Face config.json + safetensors, streamed tensor by tensor
    kaggle   official Gemma Flax/orbax checkpoints (flat '/'-keyed dict)
    layout   the native parameter tree's shapes and shape checks
    formats  any of native / hf / kaggle, detected, loaded into shardings
    placement  where converted tensors go: host numpy or device shards
    fisher   the Fisher checkpoint (gemma-jax fisher) and its checks
    fingerprint  a cheap fingerprint of a checkpoint directory
"""
