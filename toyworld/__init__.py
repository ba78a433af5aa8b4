"""A small world where subject-driven generation can be measured on a CPU.

- `render`: deterministic 32x32 captioned renders (shapes x colours x backgrounds);
- `subjects`: the bundled subjects (shape x pattern x colours, `SUBJECTS`) and their instance images;
- `evaluate` / `classifiers`: an evaluator trained or defined only on ground-truth renders;
- `base_model`: the components of the toy `StableDiffusionXLPipeline` (`scripts/train_toy_base.py` trains it);
- `prompts`: fixed prompt sets and seeded generation.
"""

from .evaluate import ToyEvaluator, parse_prompt
from .render import BACKGROUNDS, COLOURS, SHAPES, Scene, caption, render, sample_scene
from .subjects import CLASS_PROMPT, INSTANCE_PROMPT, SUBJECT_TOKEN, SUBJECTS, Subject, write_subject_samples

__all__ = [
    "BACKGROUNDS",
    "CLASS_PROMPT",
    "COLOURS",
    "INSTANCE_PROMPT",
    "SHAPES",
    "SUBJECTS",
    "SUBJECT_TOKEN",
    "Scene",
    "Subject",
    "ToyEvaluator",
    "caption",
    "parse_prompt",
    "render",
    "sample_scene",
    "write_subject_samples",
]
