"""A small world where subject-driven generation can be measured on a CPU.

- `render`: deterministic 32x32 captioned renders (shapes x colours x backgrounds);
- `subject`: the subject the base world never shows ("sks star": orange/purple stripes) and its instance images;
- `evaluate` / `classifiers`: an evaluator trained or defined only on ground-truth renders;
- `base_model`: the components of the toy `StableDiffusionXLPipeline` (`scripts/train_toy_base.py` trains it);
- `prompts`: fixed prompt sets and seeded generation.
"""

from .evaluate import ToyEvaluator, parse_prompt
from .render import BACKGROUNDS, COLOURS, SHAPES, Scene, caption, render, sample_scene
from .subject import CLASS_PROMPT, INSTANCE_PROMPT, SUBJECT_TOKEN, write_subject_samples

__all__ = [
    "BACKGROUNDS",
    "CLASS_PROMPT",
    "COLOURS",
    "INSTANCE_PROMPT",
    "SHAPES",
    "SUBJECT_TOKEN",
    "Scene",
    "ToyEvaluator",
    "caption",
    "parse_prompt",
    "render",
    "sample_scene",
    "write_subject_samples",
]
