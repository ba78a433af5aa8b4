"""benchmarks.flops on the tiny UNet built on the meta device: ratios, a hand count, the results block."""

import pytest
import torch

from benchmarks import flops
from benchmarks.contenders import AdapterSpec
from benchmarks.report import marked_section, replace_marked_section
from lily_diffusion import LilyConfig, add_lily
from toyworld.tiny_sdxl import build_unet

SPEC = AdapterSpec(r=4, stride_A=2, num_B=3)
LATENT, TOKENS = 8, 77


def meta_unet():
    with torch.device("meta"):
        unet = build_unet(seed=0)
    return unet.requires_grad_(False)


@pytest.fixture(scope="module")
def counts():
    return flops.count_contenders(meta_unet(), SPEC, latent=LATENT, train_batch=1, cfg_batch=2)


def test_every_adapter_costs_more_than_the_base(counts):
    assert list(counts) == ["base", "lora", "ours", "peft-lily"]
    base = counts["base"]
    assert base.trainable == 0 and base.train_as_trained == 0 and base.train > 0 and base.inference > 0
    for key in ("lora", "ours", "peft-lily"):
        item = counts[key]
        assert item.trainable > 0
        assert 1.0 < item.train / base.train < 1.5 and 1.0 < item.inference / base.inference < 1.5
        assert 0 < item.train_as_trained < item.train
    assert counts["ours"].trainable == counts["peft-lily"].trainable
    table = flops.flop_table(counts, SPEC)
    assert "ours Lily r4 (default config)" in table and f"{counts['ours'].inference / base.inference:.4f}" in table


def test_lily_on_one_layer_adds_exactly_the_hand_counted_flops():
    """attn2.to_k of the first transformer block: x is the text [batch, tokens, 64], out 64 wide."""
    r, num_B, batch = 4, 3, 2
    inputs = flops.meta_inputs(meta_unet(), batch, LATENT, TOKENS)
    base = flops.count_inference_step(meta_unet(), inputs)
    unet = meta_unet()
    add_lily(
        unet,
        LilyConfig(
            r=r, num_B=num_B, target_modules=r"down_blocks\.1\.attentions\.0\.transformer_blocks\.0\.attn2\.to_k"
        ),
    )
    d_in = d_out = 64
    tokens = batch * TOKENS
    hand = (
        2 * tokens * d_in * r  # h = A x
        + 2 * tokens * r * num_B  # router logits
        + 2 * batch * num_B * r * d_out  # B_mix per sample
        + 2 * tokens * r * d_out  # h @ B_mix, added in place (baddbmm_)
    )
    assert flops.count_inference_step(unet, inputs) - base == hand


def test_the_block_in_the_results_file_is_replaced_not_duplicated():
    text = "# speed\n\ntimings\n"
    once = replace_marked_section(text, flops.MARKER, "table 1")
    twice = replace_marked_section(once + "\nafter\n", flops.MARKER, "table 2")
    assert twice.count(f"<!-- {flops.MARKER} -->") == 1 and "table 1" not in twice
    assert twice.startswith("# speed\n\ntimings\n") and twice.endswith("\nafter\n")
    assert marked_section(twice, flops.MARKER) == f"<!-- {flops.MARKER} -->\ntable 2\n<!-- /{flops.MARKER} -->"
