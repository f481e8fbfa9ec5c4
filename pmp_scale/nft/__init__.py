"""The non-fine-tunability evaluation of a release: a grid of fine-tuning runs (unauthorized,
LoRA, authorized) summarised into a report, its baselines, and the paper's analyses. The
fine-tuner itself is `pmp_scale.finetune`."""
