"""--target-modules: PEFT's target_modules from the command line."""

import pytest

from trimtune.cli import target_modules_arg
from trimtune.errors import TrimtuneError


def test_target_modules_arg():
    assert target_modules_arg(None) is None
    assert target_modules_arg(["qkv", "mlp.fc1"]) == ["qkv", "mlp.fc1"]  # names / suffixes
    assert target_modules_arg(["all-linear"]) == "all-linear"
    assert target_modules_arg([r".*\.(qkv|fc1)"]) == r".*\.(qkv|fc1)"  # one regex
    with pytest.raises(TrimtuneError, match="ONE regex or all-linear alone"):
        target_modules_arg(["qkv", r".*\.fc1"])
