"""protoseg_ext.info.gpu_coverage: whether the build's CUDA arch list covers the GPUs (faked here)."""

import pytest

from protoseg_ext import info


@pytest.mark.parametrize(
    "cap, arch_list, covered",
    [
        ((9, 0), "9.0", True),
        ((8, 0), "9.0", False),  # an A100 with the old scripts/run.sh default
        ((8, 6), "9.0", False),  # an RTX 30xx
        ((8, 9), "8.0;9.0", True),  # cubin 8.0 runs on 8.x with x >= 0
        ((8, 6), "8.6", True),
        ((8, 0), "8.6", False),  # not on an older minor
        ((10, 0), "8.0;9.0", False),  # Blackwell, no PTX
        ((10, 0), "8.0;9.0+PTX", True),  # the release list: the driver JITs 9.0 PTX
        ((12, 0), "8.0 9.0+PTX", True),  # spaces separate entries too
        ((8, 9), "9.0+PTX", False),  # PTX never runs on an older GPU
        ((9, 0), "9.0a", True),
        ((10, 0), "9.0a+PTX", False),  # arch-specific PTX is not forward compatible
        ((8, 6), "Ampere", True),
        ((9, 0), "Ampere", True),  # Ampere ends with 8.6+PTX
        ((7, 5), "Ampere", False),
    ],
)
def test_arch_covers(cap, arch_list, covered):
    assert info.arch_covers(cap, arch_list) is covered


def test_arch_covers_unreadable_list_says_nothing():
    assert info.arch_covers((9, 0), "") is None
    assert info.arch_covers((9, 0), "sm_whatever") is None


def test_gpu_coverage_message_names_the_gpu_and_the_fix():
    msg = info.gpu_coverage([(9, 0), (8, 6)], "9.0", names=["H100", "RTX 3090"])
    assert msg is not None
    assert "RTX 3090 (cuda:1, compute capability 8.6)" in msg and "H100" not in msg
    assert "TORCH_CUDA_ARCH_LIST='9.0'" in msg and "8.6;9.0" in msg
    assert info.gpu_coverage([(9, 0)], "8.0;9.0+PTX") is None
    assert info.gpu_coverage([], "9.0") is None


def test_gpu_coverage_on_this_machine_is_silent_or_a_sentence():
    # no GPU (CI): None; with a GPU, None or a message about it
    msg = info.gpu_coverage()
    assert msg is None or "compute capability" in msg


def test_parse_arch_list():
    assert info.parse_arch_list("8.0;9.0+PTX") == [(8, 0, False, False), (9, 0, True, False)]
    assert info.parse_arch_list(" 7.5 ; 9.0a ") == [(7, 5, False, False), (9, 0, False, True)]
