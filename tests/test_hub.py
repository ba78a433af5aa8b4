"""Loading like diffusers: a file, a folder with weight_name / subfolder, a hub repo from huggingface_hub's own
cache (offline, no network), and a state dict in memory; every wrong input refused with one sentence."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel

from lily_diffusion import LilyConfig, LilyFileError, add_lily, lily_state_dict, load_lily_weights, save_lily_weights
from lily_diffusion.hub import resolve_lily_file
from tests.helpers import run_unet, unet_inputs

CONFIG = LilyConfig(r=2, stride_A=2, num_B=2, init_weights=False)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
OLD_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


@pytest.fixture
def trained(unet, tmp_path):
    """A UNet with a non-zero adapter, its outputs, and its weights saved as the default file."""
    add_lily(unet, CONFIG)
    inputs = unet_inputs(2)
    path = save_lily_weights(tmp_path / "saved", unet=unet)
    return unet, run_unet(unet, inputs), path


def put_in_hub_cache(cache: Path, repo_id: str, commit: str, files: dict[str, bytes], ref: str = "main") -> None:
    """Lay `files` out as huggingface_hub's cache does: content-addressed blobs, a snapshot of symlinks, a ref."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    for name, data in files.items():
        blob = hashlib.sha256(data).hexdigest()
        (repo / "blobs" / blob).write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(repo / "blobs" / blob, link.parent))
    (repo / "refs" / ref).write_text(commit)


def fresh(tiny_sdxl_dir):
    return UNet2DConditionModel.from_pretrained(tiny_sdxl_dir, subfolder="unet")


def test_hub_repo_from_the_cache_with_local_files_only(trained, tiny_sdxl_dir, tmp_path):
    _, expected, path = trained
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "user/my-lily-dog", COMMIT, {"pytorch_lily_weights.safetensors": path.read_bytes()})
    target = fresh(tiny_sdxl_dir)
    load_lily_weights(target, "user/my-lily-dog", cache_dir=cache, local_files_only=True)
    assert torch.equal(run_unet(target, unet_inputs(2)), expected)


def test_revision_subfolder_and_weight_name_pick_the_file(trained, tiny_sdxl_dir, tmp_path):
    unet, expected, path = trained
    other = tmp_path / "other.safetensors"
    with torch.no_grad():
        unet.lily_adapters["default"].lily_B[0].mul_(3.0)
    save_lily_weights(tmp_path / "v2", unet=unet, weight_name="dog.safetensors").rename(other)
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "user/dogs", OLD_COMMIT, {"lily/dog.safetensors": path.read_bytes()}, ref="v1")
    put_in_hub_cache(cache, "user/dogs", COMMIT, {"lily/dog.safetensors": other.read_bytes()})
    options = {"weight_name": "dog.safetensors", "subfolder": "lily", "cache_dir": cache, "local_files_only": True}
    for revision, want_first in (("v1", True), (OLD_COMMIT, True), (None, False), ("main", False)):
        target = fresh(tiny_sdxl_dir)
        load_lily_weights(target, "user/dogs", revision=revision, **options)
        outputs = run_unet(target, unet_inputs(2))
        assert torch.equal(outputs, expected) is want_first, revision
    assert not torch.equal(outputs, expected)


def test_offline_mode_reads_the_cache_and_names_what_is_missing(trained, tiny_sdxl_dir, tmp_path):
    _, expected, path = trained
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "user/my-lily-dog", COMMIT, {"pytorch_lily_weights.safetensors": path.read_bytes()})
    torch.save(expected, tmp_path / "expected.pt")
    code = f"""
import torch
from diffusers import UNet2DConditionModel
from lily_diffusion import load_lily_weights
from tests.helpers import run_unet, unet_inputs
unet = UNet2DConditionModel.from_pretrained({str(tiny_sdxl_dir)!r}, subfolder="unet")
load_lily_weights(unet, "user/my-lily-dog", cache_dir={str(cache)!r})
assert torch.equal(run_unet(unet, unet_inputs(2)), torch.load({str(tmp_path / "expected.pt")!r}))
try:
    load_lily_weights(unet, "user/not-there", cache_dir={str(cache)!r})
except FileNotFoundError as error:
    print(error)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        "pytorch_lily_weights.safetensors at revision main of hub repo user/not-there is not in the local hub cache "
        "and downloads are off (local_files_only=True or HF_HUB_OFFLINE=1): download it once online, "
        "or pass a local folder."
    )


def test_missing_repo_file_and_revision_are_one_sentence(trained, tmp_path):
    _, _, path = trained
    cache = tmp_path / "cache"
    put_in_hub_cache(cache, "user/dogs", COMMIT, {"pytorch_lily_weights.safetensors": path.read_bytes()})
    with pytest.raises(FileNotFoundError, match=r"^lily/x.safetensors at revision main of hub repo user/dogs is not"):
        resolve_lily_file("user/dogs", "x.safetensors", "lily", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"^pytorch_lily_weights.safetensors at revision v9 of hub repo"):
        resolve_lily_file("user/dogs", revision="v9", cache_dir=cache, local_files_only=True)
    with pytest.raises(FileNotFoundError, match=r"^No Lily weights at \./nowhere/x: no such file or folder, nor"):
        resolve_lily_file("./nowhere/x")


def test_folder_with_weight_name_and_subfolder(trained, tiny_sdxl_dir, tmp_path):
    unet, expected, _ = trained
    save_lily_weights(tmp_path / "repo" / "lily", unet=unet, weight_name="dog.safetensors")
    target = fresh(tiny_sdxl_dir)
    load_lily_weights(target, tmp_path / "repo", weight_name="dog.safetensors", subfolder="lily")
    assert torch.equal(run_unet(target, unet_inputs(2)), expected)
    with pytest.raises(
        FileNotFoundError,
        match=r"No Lily weights file pytorch_lily_weights.safetensors in .*lily "
        r"\(it has \['dog.safetensors'\]; pass weight_name=...\)\.",
    ):
        load_lily_weights(target, tmp_path / "repo", subfolder="lily")


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"proxies": {}}, TypeError, r"unknown keyword\(s\) \['proxies'\]; its hub options are \('cache_dir', "),
        ({"revision": "v1"}, ValueError, r"^revision apply to a hub repo id, but .* is a local path\.$"),
        ({"weight_name": "x.bin"}, ValueError, r"^weight_name must be a plain file name ending in \.safetensors"),
        ({"weight_name": "../x.safetensors"}, ValueError, r"^weight_name must be a plain file name"),
        ({"subfolder": "a"}, ValueError, r"^weight_name and subfolder choose a file in a folder or hub repo; .* is a"),
    ],
)
def test_options_that_do_not_apply_are_refused_before_any_change(trained, tiny_sdxl_dir, kwargs, error, message):
    _, _, path = trained
    target = fresh(tiny_sdxl_dir)
    source = path if "subfolder" in kwargs else path.parent
    with pytest.raises(error, match=message):
        load_lily_weights(target, source, **kwargs)
    assert not hasattr(target, "lily_adapters")


def test_state_dict_round_trip_equals_file_loading(trained, tiny_sdxl_dir, pipe):
    unet, expected, path = trained
    state = lily_state_dict(unet)
    assert set(state.metadata) == {"format", "format_version", "lily_config"}
    assert LilyConfig.from_json(state.metadata["lily_config"]) == CONFIG
    from_dict, from_file = fresh(tiny_sdxl_dir), fresh(tiny_sdxl_dir)
    load_lily_weights(from_dict, state)
    load_lily_weights(from_file, path)
    inputs = unet_inputs(2)
    assert torch.equal(run_unet(from_dict, inputs), run_unet(from_file, inputs))
    assert torch.equal(run_unet(from_dict, inputs), expected)
    load_lily_weights(pipe, {"unet": state}, adapter_name="dog")  # a dict keyed by component, into a pipeline
    assert torch.equal(run_unet(pipe.unet, inputs), expected)


def test_state_dicts_without_the_config_are_refused(trained, tiny_sdxl_dir):
    unet, _, _ = trained
    target = fresh(tiny_sdxl_dir)
    with pytest.raises(TypeError, match=r"^A state dict for load_lily_weights is what lily_state_dict returns"):
        load_lily_weights(target, dict(lily_state_dict(unet)))
    with pytest.raises(LilyFileError, match=r"^the state dict for unet is a plain dict without the Lily config"):
        load_lily_weights(target, {"unet": dict(lily_state_dict(unet))})
    with pytest.raises(ValueError, match=r"a state dict needs none of them\.$"):
        load_lily_weights(target, lily_state_dict(unet), weight_name="a.safetensors")
    assert not hasattr(target, "lily_adapters")


def test_save_refuses_a_weight_name_that_is_not_a_plain_safetensors_name(trained, tmp_path):
    unet, _, _ = trained
    for bad in ("x.bin", "sub/x.safetensors", ".hidden.safetensors"):
        with pytest.raises(ValueError, match=r"^weight_name must be a plain file name ending in \.safetensors"):
            save_lily_weights(tmp_path / "bad", unet=unet, weight_name=bad)
    assert not (tmp_path / "bad").exists()


def test_hub_options_of_the_wrong_type_are_refused():
    with pytest.raises(TypeError, match=r"^revision must be one of \['str'\] or None, got 3\.$"):
        resolve_lily_file("user/dogs", revision=3, local_files_only=True)
    with pytest.raises(TypeError, match=r"^local_files_only must be one of \['bool'\] or None, got 'yes'\.$"):
        resolve_lily_file("user/dogs", local_files_only="yes")
