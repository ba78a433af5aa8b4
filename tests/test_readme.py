"""The README's Python example runs as written (on the tiny pipeline instead of the hub id)."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_starts_with_the_two_commands():
    lines = README.read_text().splitlines()
    commands = lines[lines.index("```bash") + 1 : lines.index("```bash") + 3]
    install = 'pip install torch==2.13.0 && pip install -e ".[train]"'
    assert commands[0].startswith(f"{install} && python -m toyworld.demo")
    assert commands[1].startswith('pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q ')


def test_python_example_runs(tiny_sdxl_dir, tmp_path):
    example = re.search(r"## Python API\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len(example.splitlines()) <= 22
    code = example.replace("stabilityai/stable-diffusion-xl-base-1.0", str(tiny_sdxl_dir))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    saved = tmp_path / "my-lily" / "pytorch_lily_weights.safetensors"
    assert saved.is_file() and saved.stat().st_size > 5_000


def test_layout_section_lists_every_library_module():
    layout = README.read_text().split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = README.parent / "lily_diffusion"
    modules = sorted(f"lily_diffusion/{path.relative_to(package).as_posix()}" for path in package.rglob("*.py"))
    missing = [module for module in modules if f"`{module}`" not in layout]
    assert modules and not missing, f"README's Layout section lacks {missing}"
    for folder in ("toyworld/", "benchmarks/", "scripts/"):
        assert f"`{folder}`" in layout
