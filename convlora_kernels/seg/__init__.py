"""Prompt-free semantic segmentation with Conv-LoRA SAM: the model, losses and metrics,
datasets, and the fine-tuning steps (``python -m convlora_kernels.finetune``)."""
