import pytest

from snnet_reference import write_v1, write_v2


@pytest.fixture(scope="session")
def v1_ckpt(tmp_path_factory):
    """A 3-anchor, depth-12 SN-Net v1 checkpoint (71 configs) in the public layout."""
    path = tmp_path_factory.mktemp("v1") / "snnet_v1.pth"
    state = write_v1(path)
    return path, state


@pytest.fixture(scope="session")
def v2_ckpt(tmp_path_factory):
    """A depth 12/24 SN-Netv2 checkpoint (134 configs, LoRA stitching layers)."""
    path = tmp_path_factory.mktemp("v2") / "snnet_v2.pth"
    state = write_v2(path)
    return path, state
