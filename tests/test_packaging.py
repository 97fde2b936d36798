"""What pyproject.toml promises and the README says about installing agree."""

import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(sys.version_info < (3, 11), reason="tomllib is Python 3.11+")
def test_extras_exist_and_the_readme_names_them():
    import tomllib

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    extras = project["optional-dependencies"]
    assert {"sam", "seg", "hf", "test", "bench"} <= set(extras)
    assert "segment-anything" in extras["sam"] and "transformers" in extras["hf"]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for name in ("sam", "seg", "hf", "test", "bench"):
        assert f'".[{name}]"' in readme, name
    floor = re.fullmatch(r"torch>=([0-9.]+)", project["dependencies"][0]).group(1)
    assert f"Supported: torch {floor} to" in readme
    # the floor check installs exactly the floor
    with open(os.path.join(ROOT, ".ci", "torch_floor.sh")) as f:
        assert f'TORCH_SPEC:-"torch=={floor}.0 ' in f.read()
    python_floor = re.fullmatch(r">=([0-9.]+)", project["requires-python"]).group(1)
    assert f"Python {python_floor} and later" in readme and f"Python {python_floor}+" in readme
