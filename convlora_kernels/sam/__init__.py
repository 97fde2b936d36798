"""Conv-LoRA for Segment Anything: set up, train, save and load the adapters.

    apply_conv_lora(model, ...)       the encoder blocks' qkv (or q, v) -> ConvLoRALinear
    add_modules_to_save(model, ...)   modules added later (a head) train and are saved too
    box_prompted_masks / mask_loss    a batched box-prompt forward and its loss
    aux_loss(model)                   the routers' load-balancing loss, to add to the task loss
    adapters_disabled(model)          the frozen model for a while (set_adapters_enabled)
    remove_conv_lora(model)           the plain nn.Linear layers back
    adapter_state_dict(model)         exactly the trained tensors; load_adapter_state_dict
    save_adapter / load_adapter       the same in a safetensors file that records the settings
    read_adapter_config(path)         those settings, as apply_conv_lora's keyword arguments
    read_base_model(path)             the base model a file's adapters were trained on, when
                                      save_adapter(..., base_model=...) recorded it
    trainable_parameters(model)       trainable count and share; print_trainable_parameters

Models (or any module holding one of their image encoders):
    SAM      segment_anything's Sam / ImageEncoderViT; transformers' SamModel,
             SamVisionModel; SamHQModel, SamHQVisionModel
    SAM 2    transformers' Sam2Model, Sam2VisionModel, Sam2VideoModel (Hiera); the sam2
             package's SAM2Base / Hiera
    SAM 3    transformers' Sam3Model, Sam3TrackerModel, Sam3VisionModel (a ViT with separate
             q/k/v projections: q and v adapted by default); the sam3 package's ViT
Each encoder block's attention calls its projections on a channels-last map: in SAM,
(B·nW, 14, 14, C) windows in the windowed blocks and (B, 64, 64, C) in the global blocks for
a 1024×1024 image; in Hiera, maps that shrink stage by stage (8×8 windows of a 256×256 map
first). ConvLoRALinear takes each map as it comes, so with ``gating="map"`` a windowed block
routes each window and a global block each image.

The helpers accept the model wrapped in DistributedDataParallel or torch.compile, and blocks
wrapped by torch's activation-checkpoint wrapper; tensor names are those of the unwrapped
model's ``state_dict()``.
"""

from .adapter_files import (adapter_state_dict, load_adapter, load_adapter_state_dict,
                            read_adapter_config, read_base_model, save_adapter)
from .model import (ConvLoRAConfig, TrainableParameters, adapters_disabled, add_modules_to_save,
                    apply_conv_lora, aux_loss, print_trainable_parameters, remove_conv_lora,
                    set_adapters_enabled, trainable_parameters)
from .prompted import PromptedMasks, box_prompted_masks, mask_loss

__all__ = [
    "ConvLoRAConfig", "PromptedMasks", "TrainableParameters", "adapter_state_dict",
    "adapters_disabled", "add_modules_to_save", "apply_conv_lora", "aux_loss",
    "box_prompted_masks", "load_adapter", "load_adapter_state_dict", "mask_loss",
    "print_trainable_parameters", "read_adapter_config", "read_base_model", "remove_conv_lora",
    "save_adapter",
    "set_adapters_enabled", "trainable_parameters",
]
