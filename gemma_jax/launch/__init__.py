"""Launching training on Cloud TPU: queued resources (tpu), GKE (gke), the
slice names each tool uses (slices), and the preemption watch (watch).
`gemma-jax launch` (gemma_jax/commands/launch.py) is the command line."""
