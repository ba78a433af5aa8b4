"""SDXL conditioning: prompt embeddings from both text encoders, pooled embedding, and `add_time_ids`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from ..patterns import shorten


def tokenize(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids padded/truncated to the tokenizer's max length, as the SDXL pipeline does."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def truncated_part(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str | None:
    """The text `tokenize` drops from `prompt` (tokens past the tokenizer's max length), or None if it fits.

    Sliced as StableDiffusionXLPipeline.encode_prompt does for its warning (the end-of-text token is kept)."""
    ids = tokenizer(prompt, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return None
    return tokenizer.decode(ids[limit - 1 : -1])


def truncation_warnings(tokenizers: Sequence[PreTrainedTokenizerBase], prompts: dict[str, Sequence[str]]) -> list[str]:
    """One warning per label (e.g. '--instance_prompt', 'captions') whose prompts are longer than a tokenizer's
    max length: the text encoders see only the start, as in diffusers."""
    warnings = []
    for label, texts in prompts.items():
        for tokenizer in tokenizers:
            cut = [(text, part) for text in dict.fromkeys(texts) if (part := truncated_part(tokenizer, text))]
            if not cut:
                continue
            limit = tokenizer.model_max_length
            text, part = cut[0]
            what = f"{label} is" if len(cut) == 1 else f"{len(cut)} {label} are"
            example = "" if len(cut) == 1 else f" (first: {text[:60]!r}...)"
            warnings.append(
                f"{what} longer than the {limit} tokens the text encoders take and truncated{example}; "
                f"this part is ignored: {shorten(part)}"
            )
            break
    return warnings


def encode_prompts(
    text_encoders: Sequence[nn.Module],
    tokenizers: Sequence[PreTrainedTokenizerBase],
    prompts: Sequence[str],
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt_embeds [B, T, D1+D2], pooled [B, P]): penultimate hidden states of both encoders, concatenated,
    and the projected pooled output of the last encoder (the same as StableDiffusionXLPipeline.encode_prompt)."""
    embeds: list[torch.Tensor] = []
    pooled: torch.Tensor | None = None
    for tokenizer, text_encoder in zip(tokenizers, text_encoders, strict=True):
        output = text_encoder(tokenize(tokenizer, prompts).to(device), output_hidden_states=True)
        embeds.append(output.hidden_states[-2])
        if getattr(output, "text_embeds", None) is not None:
            pooled = output.text_embeds
    if pooled is None:
        raise ValueError("the last text encoder must return `text_embeds` (CLIPTextModelWithProjection)")
    return torch.cat(embeds, dim=-1), pooled.view(len(prompts), -1)


class PromptCache:
    """Embeddings of a fixed set of prompts, computed once when the text encoders are frozen."""

    def __init__(self, table: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.table = table

    @classmethod
    def build(
        cls,
        text_encoders: Sequence[nn.Module],
        tokenizers: Sequence[PreTrainedTokenizerBase],
        prompts: Iterable[str],
        device: torch.device,
        batch_size: int = 16,
    ) -> PromptCache:
        """Encode every distinct prompt once (no grad)."""
        unique = list(dict.fromkeys(prompts))
        table: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        with torch.no_grad():
            for start in range(0, len(unique), batch_size):
                chunk = unique[start : start + batch_size]
                embeds, pooled = encode_prompts(text_encoders, tokenizers, chunk, device)
                for i, prompt in enumerate(chunk):
                    table[prompt] = (embeds[i], pooled[i])
        return cls(table)

    def lookup(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked (prompt_embeds, pooled) for `prompts`."""
        missing = [p for p in prompts if p not in self.table]
        if missing:
            raise KeyError(f"prompt not in cache: {missing[0]!r}")
        embeds = torch.stack([self.table[p][0] for p in prompts])
        pooled = torch.stack([self.table[p][1] for p in prompts])
        return embeds, pooled


def compute_time_ids(
    original_sizes: torch.Tensor,
    crop_top_lefts: torch.Tensor,
    target_size: tuple[int, int],
    device: torch.device,
    dtype: torch.dtype,
) -> torch.Tensor:
    """`add_time_ids` [B, 6] = (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    target = torch.tensor(target_size, dtype=torch.long, device=original_sizes.device).expand_as(original_sizes)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1).to(device=device, dtype=dtype)
