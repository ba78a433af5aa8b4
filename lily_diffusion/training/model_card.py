"""The model card (`README.md`) written beside the trained weights, with diffusers' template and card helpers.

The card is built from a fixed list of facts (base model, instance prompt, adapter config and parameter count read
back from the saved weights, the final validation grid, a snippet that loads the adapter), never from the flags as
a whole, so no secret can reach it. It is created fresh each run from diffusers' training-card template, as
`diffusers.utils.hub_utils.load_or_create_model_card` creates one, without that function's look-up of an existing
card on the Hub (which would need the network, and would keep an earlier run's card).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH, populate_model_card
from huggingface_hub import ModelCard, ModelCardData

from ..backends import AdapterBackend, AdapterOptions, get_backend
from ..messages import first_line
from .errors import TrainingError
from .options import TrainingOptions

CARD_NAME = "README.md"
FINAL_GRID = "validation/final.png"
COMMON_TAGS: tuple[str, ...] = ("dreambooth", "stable-diffusion-xl", "diffusers", "text-to-image")


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says; `load_from` is the hub repo id (or local folder) the snippet loads."""

    backend: AdapterBackend  # the adapter kind: its name, tag and loading code
    base_model: str
    instance_prompt: str
    load_from: str
    num_parameters: int
    configs: dict[str, str]  # component -> adapter config, as shown
    validation_prompt: str | None = None
    grid: str | None = None  # the final validation grid, relative to the card


def model_card(facts: CardFacts) -> ModelCard:
    """The card: diffusers' training-card template, the facts in its description, tags added by diffusers."""
    card = ModelCard.from_template(
        card_data=ModelCardData(
            library_name="diffusers",
            inference=True,
            base_model=facts.base_model,
            instance_prompt=facts.instance_prompt,
        ),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=_description(facts),
    )
    return populate_model_card(card, tags=[facts.backend.kind, *COMMON_TAGS])


def _description(facts: CardFacts) -> str:
    lines = [
        f"# DreamBooth {facts.backend.display_name} adapter for {facts.base_model}",
        "",
        f"Trained with `train_dreambooth_lily.py` (lily_diffusion) on the base model `{facts.base_model}`.",
        f"Instance prompt: `{facts.instance_prompt}`.",
        "",
        f"Trainable parameters: {facts.num_parameters:,}.",
        "",
    ]
    for component, config in facts.configs.items():
        lines += [f"Adapter config ({component}):", "", "```json", config, "```", ""]
    if facts.grid:
        lines += [f"Validation images for `{facts.validation_prompt}`:", "", f"![validation images]({facts.grid})", ""]
    lines += ["## Use it", "", "```python", _snippet(facts), "```", ""]
    return "\n".join(lines)


def _snippet(facts: CardFacts) -> str:
    imports, load = facts.backend.load_code(facts.load_from)
    return (
        f"from diffusers import StableDiffusionXLPipeline\n{imports}\n"
        f"pipe = StableDiffusionXLPipeline.from_pretrained({facts.base_model!r})\n"
        f"{load}\n"
        f"image = pipe({facts.instance_prompt!r}, num_inference_steps=30).images[0]"
    )


def write_model_card(
    output_dir: str | Path,
    backend: AdapterBackend,
    options: AdapterOptions,
    base_model: str,
    instance_prompt: str,
    load_from: str,
    validation_prompt: str | None = None,
) -> Path:
    """Write `output_dir/README.md` for the weights saved there; the snippet loads from `load_from`."""
    folder = Path(output_dir)
    count, configs = backend.describe_file(folder / backend.weight_name, options)
    grid = FINAL_GRID if (folder / FINAL_GRID).is_file() else None
    facts = CardFacts(backend, base_model, instance_prompt, load_from, count, configs, validation_prompt, grid)
    path = folder / CARD_NAME
    model_card(facts).save(path)
    return path


def write_run_card(options: TrainingOptions, load_from: str | None = None) -> Path:
    """The card of a finished training run (the snippet loads `load_from`, default the output folder)."""
    folder = Path(options.output.output_dir)
    try:
        return write_model_card(
            folder,
            get_backend(options.adapter.adapter),
            options.adapter,
            options.model.pretrained_model_name_or_path,
            options.data.instance_prompt,
            load_from or str(folder.resolve()),
            validation_prompt=options.output.validation_prompt,
        )
    except OSError as error:  # a full disk: the weights are saved already
        raise TrainingError(
            f"could not write the model card {folder / CARD_NAME} (the weights are saved): {first_line(error)}"
        ) from error
