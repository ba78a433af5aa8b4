"""Inputs and small runners shared by the tests."""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from lily_diffusion import LilyConfig
from lily_diffusion.config import TEXT_ENCODER_TARGET_MODULES

# Small random-initialised Lily configs for the tiny pipeline's UNet and text encoders.
UNET_CONFIG = LilyConfig(r=4, stride_A=2, num_B=3, init_weights=False)
TEXT_CONFIG = LilyConfig(
    r=2, stride_A=2, num_B=2, init_weights=False, target_modules=list(TEXT_ENCODER_TARGET_MODULES)
)


def unet_inputs(batch: int = 2, seed: int = 0) -> dict[str, object]:
    """Random but fixed inputs for the tiny UNet; every sample differs."""
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, 8, 8, generator=generator),
        "timestep": torch.randint(0, 1000, (batch,), generator=generator),
        "encoder_hidden_states": torch.randn(batch, 7, 64, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 32, generator=generator),
            "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * batch),
        },
    }


def run_unet(unet: UNet2DConditionModel, inputs: dict[str, object]) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def take(inputs: dict[str, object], index: int) -> dict[str, object]:
    """One sample of a batch of UNet inputs, as a batch of one."""
    added = inputs["added_cond_kwargs"]
    return {
        "sample": inputs["sample"][index : index + 1],
        "timestep": inputs["timestep"][index : index + 1],
        "encoder_hidden_states": inputs["encoder_hidden_states"][index : index + 1],
        "added_cond_kwargs": {key: value[index : index + 1] for key, value in added.items()},
    }


def generate_tiny(pipe: object, prompt: str = "a photo of sks star", **kwargs: object) -> torch.Tensor:
    """Two inference steps of the tiny pipeline at 16 px with classifier-free guidance (uncond and cond batched
    together), seed 0, as a tensor."""
    return pipe(
        prompt,
        num_inference_steps=2,
        guidance_scale=5.0,
        height=16,
        width=16,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        **kwargs,
    ).images
