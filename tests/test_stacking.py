"""Several Lily adapters active at once (`set_lily_adapters`), like diffusers' `set_adapters`."""

import pytest
import torch

from lily_diffusion import LilyConfig, add_lily, set_lily_adapter, set_lily_adapters, set_lily_scale
from tests.helpers import run_unet, take, unet_inputs
from tests.layer_probe import base_output, lily_delta, recorded_layers

SUBJECT = LilyConfig(r=4, stride_A=2, num_B=3, init_weights=False)
STYLE = LilyConfig(r=2, stride_A=1, num_B=2, init_weights=False, target_modules=["to_q", "to_v", "proj_in"])


@pytest.fixture
def stacked(unet):
    add_lily(unet, SUBJECT, "subject")
    add_lily(unet, STYLE, "style")
    return unet


def test_each_layer_adds_the_weighted_deltas_of_every_active_adapter(stacked):
    set_lily_scale(stacked, 0.7, "style")  # a per-adapter scale stays in effect under stacking
    set_lily_adapters(stacked, ["subject", "style"], adapter_weights=[1.0, 0.6])
    paths = sorted(set(stacked.lily_adapters["subject"].layers) | set(stacked.lily_adapters["style"].layers))
    with recorded_layers(stacked, paths) as records:
        run_unet(stacked, unet_inputs(2))
    worst, checked, both = 0.0, 0, 0
    for path, calls in records.items():
        for x, output in calls:
            expected = base_output(stacked, path, x)
            if path in stacked.lily_adapters["subject"].layers:
                expected = expected + 1.0 * lily_delta(stacked, path, x, "subject")
            if path in stacked.lily_adapters["style"].layers:
                expected = expected + 0.6 * lily_delta(stacked, path, x, "style")
                both += path in stacked.lily_adapters["subject"].layers
            worst = max(worst, (output - expected).abs().max().item())
            checked += 1
    assert checked >= len(paths) and both > 0
    assert worst < 1e-5


def test_every_adapter_routes_each_sample_on_its_own(stacked):
    set_lily_adapters(stacked, ["subject", "style"], adapter_weights=[1.0, 0.6])
    inputs = unet_inputs(3)
    batched = run_unet(stacked, inputs)
    for index in range(3):
        alone = run_unet(stacked, take(inputs, index))
        assert (batched[index : index + 1] - alone).abs().max() < 1e-5


def test_weights_switch_adapters_and_loading_another_keeps_the_first(stacked):
    inputs = unet_inputs(2)
    set_lily_adapter(stacked, "subject")
    subject_only = run_unet(stacked, inputs)
    set_lily_adapters(stacked, ["subject", "style"], adapter_weights=[1.0, 0.0])
    assert torch.equal(run_unet(stacked, inputs), subject_only)
    set_lily_adapters(stacked, "subject")
    assert torch.equal(run_unet(stacked, inputs), subject_only)
    set_lily_adapter(stacked, ["subject", "style"])  # a list is a stack with weight 1 each
    both = run_unet(stacked, inputs)
    set_lily_adapters(stacked, ["style", "subject"], 1.0)  # order and a single weight for all
    assert (run_unet(stacked, inputs) - both).abs().max() < 1e-5
    assert (both - subject_only).abs().max() > 1e-3
    assert list(stacked.lily_adapters) == ["subject", "style"]


@pytest.mark.parametrize(
    ("names", "weights", "error", "message"),
    [
        (["subject", "nope"], None, ValueError, r"No Lily adapter named \['nope'\] is loaded here; loaded: "),
        (["subject", "style"], [1.0], ValueError, "adapter_weights has 1 entries for 2 adapter_names"),
        (["subject", "subject"], None, ValueError, "more than once"),
        (["subject"], [float("nan")], ValueError, "must be a finite number"),
        ([1, 2], None, TypeError, "adapter_names must be a name or a list of names"),
        (["subject"], {"unet": 1.0}, TypeError, "adapter_weights must be a number or a list of numbers"),
    ],
)
def test_bad_stacks_are_refused_with_one_sentence_and_change_nothing(stacked, names, weights, error, message):
    inputs = unet_inputs(2)
    before = run_unet(stacked, inputs)
    with pytest.raises(error, match=message):
        set_lily_adapters(stacked, names, adapter_weights=weights)
    assert torch.equal(run_unet(stacked, inputs), before)
