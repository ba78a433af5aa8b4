"""Train the toy world's base model from scratch: a small `StableDiffusionXLPipeline` on captioned 32x32 renders.

Two stages, each resumable from a periodic checkpoint in `--output-dir` (rerun the same command to continue):

1. the VAE (`AutoencoderKL`, 32x32 -> 16x16x4) on plain base-world renders mixed with generic patterns of any colour
   (or `--vae-from` a saved pipeline's VAE, which this stage reproduces);
2. the SDXL-type UNet jointly with both CLIP text encoders, on the world's captioned renders, plain objects and a
   `--patterned-fraction` of two-colour ones (epsilon prediction, min-SNR weighting, 10% unconditional samples with
   zero text embeddings as SDXL's pipeline uses for CFG, EMA).

Every batch, caption and noise tensor is a pure function of (`--seed`, stage, step), so a resumed run ends with the
same weights as an uninterrupted one. The finished pipeline is rounded to fp16 precision and saved as fp32 safetensors
to `--save-dir`, so a plain `StableDiffusionXLPipeline.from_pretrained(save_dir)` gets one dtype in every component.

    python -m scripts.train_toy_base --output-dir runs/toy-base --save-dir assets/toy-sdxl-base
"""

from __future__ import annotations

import os

# OpenMP threads that spin while waiting make a shared 2-core machine 5-10x slower; sleep instead.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler
from tqdm.auto import tqdm

from toyworld.base_model import (
    SCHEDULER_CONFIG,
    assemble_pipeline,
    build_text_encoders,
    build_tokenizers,
    build_unet,
    build_vae,
)
from toyworld.render import (
    SIZE,
    Scene,
    caption,
    random_pattern_array,
    render_batch,
    sample_scene,
    sample_world_scene,
)

logger = logging.getLogger("train_toy_base")

VAE_STAGE, UNET_STAGE = 1, 2
# Caption forms of one scene (with colour, with background) and their probabilities. The short forms teach the
# model that an unnamed attribute is free, so "a photo of a star" gives stars of every colour and background.
CAPTION_FORMS: tuple[tuple[bool, bool], ...] = ((True, True), (True, False), (False, True), (False, False))
CAPTION_PROBS: tuple[float, ...] = (0.6, 0.15, 0.15, 0.1)


def parse_args(input_args: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/toy-base"), help="checkpoints live here")
    parser.add_argument("--save-dir", type=Path, default=Path("assets/toy-sdxl-base"), help="final fp32 pipeline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch-size", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=1e-3)
    parser.add_argument("--unet-steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet and text encoders")
    parser.add_argument("--warmup-steps", type=int, default=200)
    parser.add_argument("--unet-channels", type=int, nargs=2, default=(64, 128))
    parser.add_argument("--ema-decay", type=float, default=0.999)
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--snr-gamma", type=float, default=5.0)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument(
        "--patterned-fraction",
        type=float,
        default=0.3,
        help="share of the UNet's training scenes that are two-colour (striped, halved, ringed) objects",
    )
    parser.add_argument(
        "--vae-from",
        type=Path,
        default=None,
        help="take the VAE (and its scaling factor) from this saved pipeline instead of training stage 1",
    )
    parser.add_argument("--scale-samples", type=int, default=512, help="renders that set the VAE scaling factor")
    parser.add_argument(
        "--stop-after",
        type=int,
        default=None,
        help="checkpoint and exit after this many steps of this invocation (rerun to continue)",
    )
    args = parser.parse_args(input_args)
    if not 0.0 <= args.patterned_fraction <= 1.0:
        parser.error(f"--patterned-fraction must be from 0 to 1, not {args.patterned_fraction}")
    if args.vae_from is not None and not (args.vae_from / "vae" / "config.json").is_file():
        parser.error(f"--vae-from {args.vae_from} has no vae/config.json (give a saved pipeline's folder)")
    return args


class StopRequested(Exception):
    """`--stop-after` steps are done; the state is checkpointed and a rerun continues from it."""


@dataclass(frozen=True)
class Seconds:
    """Wall-clock and CPU seconds (all threads) spent in a stage, summed over resumed runs."""

    wall: float = 0.0
    cpu: float = 0.0

    @classmethod
    def now(cls) -> Seconds:
        return cls(time.perf_counter(), time.process_time())

    @classmethod
    def from_state(cls, state: dict) -> Seconds:
        return cls(state.get("seconds", 0.0), state.get("cpu_seconds", 0.0))

    def state(self) -> dict[str, float]:
        return {"seconds": self.wall, "cpu_seconds": self.cpu}

    def __add__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall + other.wall, self.cpu + other.cpu)

    def __sub__(self, other: Seconds) -> Seconds:
        return Seconds(self.wall - other.wall, self.cpu - other.cpu)


def step_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, stage, step])


def step_generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(step_rng(seed, stage, step).integers(2**62)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, h, w, 3] -> float [n, 3, h, w] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def save_state(path: Path, state: dict) -> None:
    """Atomic checkpoint write (a crash mid-write never leaves a truncated checkpoint)."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def vae_batch(seed: int, step: int, batch_size: int) -> torch.Tensor:
    rng = step_rng(seed, VAE_STAGE, step)
    half = batch_size // 2
    world = render_batch([sample_scene(rng) for _ in range(half)])
    generic = np.stack([random_pattern_array(rng) for _ in range(batch_size - half)])
    return to_tensor(np.concatenate([world, generic]))


def train_vae(args: argparse.Namespace) -> tuple[AutoencoderKL, Seconds]:
    """Stage 1: reconstruction (MSE + L1) with a light KL term; resumable. Returns the VAE and its training seconds."""
    path = args.output_dir / "vae_state.pt"
    vae = build_vae(args.seed)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    start, seconds, clock = 0, Seconds(), Seconds.now()
    if path.is_file():
        state = torch.load(path, weights_only=False)
        vae.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, seconds = state["step"], Seconds.from_state(state)
        logger.info("VAE: resuming at step %d", start)

    def schedule(s: int) -> float:  # 100 warmup steps, then cosine from 1 to 0.1
        return min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / args.vae_steps)))

    for group in optimizer.param_groups:
        group["lr"] = args.vae_lr * schedule(start)
    vae.train()
    bar = tqdm(range(start, args.vae_steps), initial=start, total=args.vae_steps, desc="vae")
    for step in bar:
        x = vae_batch(args.seed, step, args.vae_batch_size)
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=step_generator(args.seed, VAE_STAGE, step))
        recon = vae.decode(z).sample
        kl = posterior.kl().mean() / x[0].numel()
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-4 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = args.vae_lr * schedule(step + 1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        stop = args.stop_after is not None and step + 1 - start >= args.stop_after
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.vae_steps or stop:
            save_state(
                path,
                {
                    "step": step + 1,
                    "model": vae.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **(seconds + Seconds.now() - clock).state(),
                },
            )
        if stop and step + 1 < args.vae_steps:
            raise StopRequested(f"VAE stopped at step {step + 1}")
    vae.eval().requires_grad_(False)
    vae.register_to_config(scaling_factor=latent_scaling_factor(vae, args.seed, args.scale_samples))
    return vae, seconds + (Seconds.now() - clock if start < args.vae_steps else Seconds())


@torch.no_grad()
def latent_scaling_factor(vae: AutoencoderKL, seed: int, n: int = 512) -> float:
    """1 / std of the latents of base-world renders, as SDXL's `scaling_factor`."""
    rng = step_rng(seed, VAE_STAGE, 10**9)
    images = to_tensor(render_batch([sample_scene(rng) for _ in range(n)]))
    latents = vae.encode(images).latent_dist.mean
    return float(1.0 / latents.std())


def sample_captions(scenes: list[Scene], rng: np.random.Generator) -> list[str]:
    forms = rng.choice(len(CAPTION_FORMS), size=len(scenes), p=CAPTION_PROBS)
    return [caption(s, *CAPTION_FORMS[f]) for s, f in zip(scenes, forms, strict=True)]


class TextConditioner(torch.nn.Module):
    """Both text encoders, used exactly as SDXL's pipeline uses them (penultimate hidden states, pooled eos)."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.tokenizers = build_tokenizers()
        self.text_encoder, self.text_encoder_2 = build_text_encoders(len(self.tokenizers[0]), seed)
        self._ids: dict[str, torch.Tensor] = {}

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        for p in prompts:
            if p not in self._ids:
                tok = self.tokenizers[0]
                if len(tok(p).input_ids) > tok.model_max_length:
                    raise ValueError(f"caption {p!r} is longer than the encoders' {tok.model_max_length} tokens")
                self._ids[p] = tok(
                    p, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt"
                ).input_ids[0]
        return torch.stack([self._ids[p] for p in prompts])

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = self.token_ids(prompts)
        first = self.text_encoder(ids, output_hidden_states=True)
        second = self.text_encoder_2(ids, output_hidden_states=True)
        embeds = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        return embeds, second.text_embeds


def denoiser_batch(args: argparse.Namespace, vae: AutoencoderKL, step: int) -> tuple[torch.Tensor, list[str]]:
    rng = step_rng(args.seed, UNET_STAGE, step)
    scenes = [sample_world_scene(rng, args.patterned_fraction) for _ in range(args.batch_size)]
    with torch.no_grad():
        posterior = vae.encode(to_tensor(render_batch(scenes))).latent_dist
        latents = posterior.sample(generator=step_generator(args.seed, VAE_STAGE + 10, step))
    return latents * vae.config.scaling_factor, sample_captions(scenes, rng)


def train_denoiser(args: argparse.Namespace, vae: AutoencoderKL) -> tuple[TextConditioner, torch.nn.Module, Seconds]:
    """Stage 2: the UNet and both text encoders, jointly; returns them (the EMA UNet) and the training seconds."""
    path = args.output_dir / "unet_state.pt"
    text = TextConditioner(args.seed)
    unet = build_unet(args.seed, tuple(args.unet_channels))
    ema = copy.deepcopy(unet).requires_grad_(False)
    params = [*unet.parameters(), *text.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    start, seconds, clock = 0, Seconds(), Seconds.now()
    if path.is_file():
        state = torch.load(path, weights_only=False)
        unet.load_state_dict(state["unet"])
        ema.load_state_dict(state["ema"])
        text.load_state_dict(state["text"])
        optimizer.load_state_dict(state["optimizer"])
        start, seconds = state["step"], Seconds.from_state(state)
        logger.info("UNet: resuming at step %d", start)

    def schedule(s: int) -> float:
        warm = min(1.0, (s + 1) / args.warmup_steps)
        return warm * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(s, args.unet_steps) / args.unet_steps)))

    noise_scheduler = DDPMScheduler(**{k: v for k, v in SCHEDULER_CONFIG.items() if k != "timestep_spacing"})
    alphas = noise_scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32).repeat(args.batch_size, 1)
    unet.train()
    text.train()
    bar = tqdm(range(start, args.unet_steps), initial=start, total=args.unet_steps, desc="unet")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = args.lr * schedule(step)
        latents, prompts = denoiser_batch(args, vae, step)
        gen = step_generator(args.seed, UNET_STAGE, step)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=gen)
        keep = (torch.rand(len(latents), generator=gen) >= args.uncond_prob).float()
        embeds, pooled = text(prompts)
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        weight = torch.clamp(snr[t], max=args.snr_gamma) / snr[t]
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(args.ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema.parameters(), unet.parameters(), strict=True):
                e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        stop = args.stop_after is not None and step + 1 - start >= args.stop_after
        if (step + 1) % args.checkpoint_every == 0 or step + 1 == args.unet_steps or stop:
            save_state(
                path,
                {
                    "step": step + 1,
                    "unet": unet.state_dict(),
                    "ema": ema.state_dict(),
                    "text": text.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    **(seconds + Seconds.now() - clock).state(),
                },
            )
        if stop and step + 1 < args.unet_steps:
            raise StopRequested(f"UNet stopped at step {step + 1}")
    return text.eval(), ema.eval(), seconds + (Seconds.now() - clock if start < args.unet_steps else Seconds())


def main(args: argparse.Namespace) -> Path | None:
    """Train (or continue) both stages and save the pipeline; None if `--stop-after` ended this run early."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.num_threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.vae_from is not None:
            vae, vae_seconds = AutoencoderKL.from_pretrained(args.vae_from, subfolder="vae").eval(), Seconds()
            vae.requires_grad_(False)
            logger.info("VAE from %s (stage 1 not run)", args.vae_from)
        else:
            vae, vae_seconds = train_vae(args)
        logger.info("VAE scaling factor %.4f", vae.config.scaling_factor)
        text, unet, unet_seconds = train_denoiser(args, vae)
    except StopRequested as stop:
        logger.info("%s; rerun the same command to continue", stop)
        return None
    # Rounded to fp16 precision (the weights every reported score was measured on), stored as fp32: a plain
    # from_pretrained then loads one dtype everywhere (fp16 files make transformers load fp16 text encoders).
    pipe = assemble_pipeline(vae, text.text_encoder, text.text_encoder_2, unet).to(torch.float16).to(torch.float32)
    pipe.save_pretrained(args.save_dir, safe_serialization=True)
    total = vae_seconds + unet_seconds
    summary = {
        "command": " ".join(["python -m scripts.train_toy_base", *sys.argv[1:]]),
        "vae_minutes": vae_seconds.wall / 60,
        "unet_minutes": unet_seconds.wall / 60,
        "minutes": total.wall / 60,
        "cpu_minutes": total.cpu / 60,
        "threads": args.num_threads,
    }
    (args.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("saved %s (fp32); training took %.1f min in all", args.save_dir, summary["minutes"])
    return args.save_dir


if __name__ == "__main__":
    main(parse_args())
