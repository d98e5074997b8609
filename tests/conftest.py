import warnings

import pytest
import torch

import stitch_compile
from cli_runner import run_cli
from snnet_reference import V1_SHAPE, V2_SHAPE, v1_state, write_v1, write_v2


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny tensors: one torch thread beats two contending for the 2 shared cores many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def v1_ckpt(tmp_path_factory):
    """A 3-anchor, depth-12 SN-Net v1 checkpoint (71 configs) in the public layout."""
    path = tmp_path_factory.mktemp("v1") / "snnet_v1.pth"
    state = write_v1(path, **V1_SHAPE)
    return path, state


@pytest.fixture(scope="session")
def v2_ckpt(tmp_path_factory):
    """A depth 12/24 SN-Netv2 checkpoint (134 configs, LoRA stitching layers)."""
    path = tmp_path_factory.mktemp("v2") / "snnet_v2.pth"
    state = write_v2(path, **V2_SHAPE)
    return path, state


@pytest.fixture(scope="session")
def v2_12_ckpt(tmp_path_factory):
    """A depth 12/12 SN-Netv2 checkpoint (the S-B pair's enumeration)."""
    path = tmp_path_factory.mktemp("v2_12") / "snnet_v2_12.pth"
    state = write_v2(path, **{**V2_SHAPE, "depths": (12, 12)})
    return path, state


@pytest.fixture(scope="session")
def v1_net(v1_ckpt):
    return stitch_compile.load(str(v1_ckpt[0]))


@pytest.fixture(scope="session")
def v2_net(v2_ckpt):
    return stitch_compile.load(str(v2_ckpt[0]))


@pytest.fixture(scope="session")
def v2_12_net(v2_12_ckpt):
    return stitch_compile.load(str(v2_12_ckpt[0]))


@pytest.fixture(scope="session")
def small_v1_state():
    """Three anchors of 2 blocks (3 + 2 x 4 = 11 configs): quick to write, load and corrupt."""
    return v1_state(depth=2)


@pytest.fixture
def cli(capsys):
    """Run the real entry point in-process: (exit code, stdout, stderr).

    Warnings other than deprecations would reach a user's stderr, so they are added to it.
    """
    def run(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            code = run_cli(*args)
        out, err = capsys.readouterr()
        shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
        return code, out, err + "".join(f"{w.category.__name__}: {w.message}\n" for w in shown)
    return run
