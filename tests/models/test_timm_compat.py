"""timm `shvit_s*` <-> official-layout state_dict mapping: exact key round trip and identical logits."""
import importlib.util
import math

import pytest
import torch

from shvit_kernels.models.shvit import _build
from shvit_kernels.models.timm_compat import (
    import_timm,
    load_timm_state_dict,
    official_to_timm,
    timm_to_official,
)

if importlib.util.find_spec("timm") is None:  # skip only when timm is truly absent, never on import errors
    pytest.skip("timm is not installed", allow_module_level=True)

NAMES = ["shvit_s1", "shvit_s2", "shvit_s3", "shvit_s4"]
NUM_CLASSES = 10


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """fp64 convs of these small models gain little from threads, and on a busy 2-core CI box OpenMP
    oversubscription made this file ~20x slower (200 s vs 11 s); restore the setting for other tests."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def timm():
    return import_timm()


def _timm_model(timm, name):
    return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES).double().eval()


@torch.no_grad()
def _randomize(model, gen):
    """Random values in every parameter and BN buffer: stock init zeroes many BN weights, which would turn
    blocks into identities and let a wrong mapping of their weights go unnoticed."""
    for name, t in model.state_dict().items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "num_batches_tracked":
            t.copy_(torch.randint(1, 1000, (), generator=gen))
        elif leaf == "running_var":
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) * 1.5 + 0.5)
        elif t.dim() > 1:  # conv / linear weight: keep activations O(1) through the depth
            fan_in = t[0].numel()
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) / math.sqrt(fan_in))
        elif leaf == "weight":  # BN / GroupNorm scale
            t.copy_(torch.rand(t.shape, generator=gen, dtype=t.dtype) + 0.5)
        else:  # biases, running_mean
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.2)


def _assert_same_logits(actual, expected):
    err = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert scale > 0 and err <= 1e-10 * scale, (err, scale)


@pytest.mark.parametrize("name", NAMES)
def test_timm_weights_give_identical_logits(timm, name):
    gen = torch.Generator().manual_seed(NAMES.index(name))
    ref = _timm_model(timm, name)
    _randomize(ref, gen)
    timm_sd = ref.state_dict()

    ours = _build(name, NUM_CLASSES, fused=False).double().eval()
    load_timm_state_dict(ours, timm_sd, strict=True)

    x = torch.randn(2, 3, 224, 224, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
        _assert_same_logits(ours(x), expected)

    # Back: ours -> timm into a fresh timm model.
    ours_sd = ours.state_dict()
    back = _timm_model(timm, name)
    back.load_state_dict(official_to_timm(ours_sd), strict=True)
    with torch.no_grad():
        _assert_same_logits(back(x), expected)

    # Pure renaming, exact inverses both ways: same keys in the same order, the very same tensors.
    there = timm_to_official(timm_sd)
    assert list(there) == list(ours_sd)
    assert all(there[k] is v for k, v in zip(there, timm_sd.values()))
    for sd, fwd, inv in ((timm_sd, timm_to_official, official_to_timm), (ours_sd, official_to_timm, timm_to_official)):
        round_trip = inv(fwd(sd))
        assert list(round_trip) == list(sd)
        assert all(round_trip[k] is sd[k] for k in sd)


def test_key_sets_disjoint_and_complete(timm):
    ref = _timm_model(timm, "shvit_s1")
    ours = _build("shvit_s1", NUM_CLASSES, fused=False).double()
    timm_sd, ours_sd = ref.state_dict(), ours.state_dict()
    mapped = timm_to_official(timm_sd)
    assert set(mapped) == set(ours_sd)
    # Only the stage keys differ between the layouts, and none of them is shared.
    shared = set(timm_sd) & set(ours_sd)
    assert shared and all(k.startswith(("patch_embed.", "head.")) for k in shared)
    assert set(official_to_timm(ours_sd)) == set(timm_sd)

    with pytest.raises(RuntimeError):  # unmapped timm keys
        ours.load_state_dict(timm_sd, strict=True)
    with pytest.raises(RuntimeError):  # one key missing
        ours.load_state_dict({k: v for k, v in mapped.items() if k != "blocks2.1.conv1.bn.running_var"})
    with pytest.raises(RuntimeError):  # one key too many
        ours.load_state_dict({**mapped, "blocks3.99.conv.m.c.weight": torch.zeros(1)})

    # A dict already in the other layout, or a malformed stage key, is refused instead of passed through.
    with pytest.raises(ValueError):
        timm_to_official(ours_sd)
    with pytest.raises(ValueError):
        official_to_timm(timm_sd)
    with pytest.raises(ValueError):
        timm_to_official({"stages.1.downsample.5.c.weight": torch.zeros(1)})
    with pytest.raises(ValueError):
        official_to_timm({"blocks2.0.0.m.c.weight": torch.zeros(1), "blocks2.2.conv.m.c.weight": torch.zeros(1)})


def test_import_timm_is_idempotent(timm):
    assert import_timm() is timm
    assert hasattr(torch.ops.torchvision, "nms") and hasattr(torch.ops.torchvision, "qnms")
