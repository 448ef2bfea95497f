"""Programs that drive the training core for another purpose: the
distillation dump (distill_dump) and Fisher estimation (fisher,
fisher_data). They import the core and the features, never the reverse."""
