"""convlora-kernels: fused Conv-LoRA ("Convolution Meets LoRA", ICLR 2024) for Segment Anything.

    conv_lora_linear     the functional op (backends: reference, cpu, cuda, triton)
    conv_lora_linear_ref the pure-PyTorch definition it is checked against
    ConvLoRALinear       drop-in for nn.Linear (from_linear, from_autogluon)
    NoisyTopOneRouter    the top-1 router with its load-balancing loss
    apply_conv_lora ...  Segment Anything integration (convlora_kernels.sam)
"""

from .gating import NoisyTopOneRouter
from .modules import ConvLoRALinear
from .ops import BackendUnavailableError, available_backends, conv_lora_linear
from .reference import conv_lora_linear_ref, lora_linear_ref
from .sam import (adapter_state_dict, adapters_disabled, add_modules_to_save, apply_conv_lora,
                  aux_loss, box_prompted_masks, load_adapter, load_adapter_state_dict,
                  mask_loss, print_trainable_parameters, read_adapter_config,
                  remove_conv_lora, save_adapter, set_adapters_enabled, trainable_parameters)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "ConvLoRALinear",
    "NoisyTopOneRouter",
    "adapter_state_dict",
    "adapters_disabled",
    "add_modules_to_save",
    "apply_conv_lora",
    "available_backends",
    "aux_loss",
    "box_prompted_masks",
    "conv_lora_linear",
    "conv_lora_linear_ref",
    "load_adapter",
    "load_adapter_state_dict",
    "lora_linear_ref",
    "mask_loss",
    "print_trainable_parameters",
    "read_adapter_config",
    "remove_conv_lora",
    "save_adapter",
    "set_adapters_enabled",
    "trainable_parameters",
]
