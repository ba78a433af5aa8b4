#!/usr/bin/env python
"""DreamBooth for SDXL with Lily (or LoRA) adapters; flags follow diffusers' train_dreambooth_lora_sdxl.py.

    accelerate launch train_dreambooth_lily.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog --instance_prompt "a photo of sks dog" --output_dir lily-dog

The training logic lives in `lily_diffusion.training`; this file only parses flags and reports errors.
"""

from __future__ import annotations

from lily_diffusion.training import TrainingError, TrainingOptions, parse_options, run_training


def main(options: TrainingOptions) -> None:
    """Train; a TrainingError becomes a one-line message and exit status 1."""
    try:
        run_training(options)
    except TrainingError as err:
        raise SystemExit(f"error: {err}") from None


if __name__ == "__main__":
    main(parse_options())
