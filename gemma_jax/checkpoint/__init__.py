"""Checkpoint formats and conversion (modules are imported on demand).

    native   this project's orbax params + model config (save / load)
    hf       Hugging Face config.json + safetensors, streamed tensor by tensor
    kaggle   official Gemma Flax/orbax checkpoints (flat '/'-keyed dict)
    layout   the native parameter tree's shapes and shape checks
"""
