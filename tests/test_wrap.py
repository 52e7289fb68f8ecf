"""wrap / check / reproject / grouping state on small models: selection and guard rails."""

from __future__ import annotations

import copy
import io
import pickle

import geoopt
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fgo_geoopt as fg
from fgo_geoopt.collections import layer_seed

WRAPPED = {"stem.weight", "dw.weight", "grouped.weight", "proj.weight"}


class Net(nn.Module):
    """Every kind of parameter wrap has to decide about; ``fc`` is the head by convention."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4)
        self.proj = nn.Linear(12, 16)
        self.fc = nn.Linear(16, 10)
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.conv3d = nn.Conv3d(2, 2, 1)
        self.emb = nn.Embedding(5, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.stem(x)).relu()
        x = self.grouped(self.dw(x)).mean((2, 3))
        return self.fc(self.proj(x).relu())


class Reordered(Net):
    """Same parameter names as :class:`Net`, modules created in another order."""

    def __init__(self) -> None:
        nn.Module.__init__(self)
        self.fc = nn.Linear(16, 10)
        self.proj = nn.Linear(12, 16)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.conv1d = nn.Conv1d(4, 4, 3)
        self.conv3d = nn.Conv3d(2, 2, 1)
        self.emb = nn.Embedding(5, 6)


def make(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def wrapped_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if isinstance(p, geoopt.ManifoldParameter)}


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(4, 3, 6, 6, generator=gen), torch.randint(0, 10, (4,), generator=gen)


def step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    x, y = data(seed)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def as_bytes_and_back(obj, **load_kwargs):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, **load_kwargs)


# ---------------------------------------------------------------------- selection
def test_default_selection_and_names():
    model = make()
    names = [n for n, _ in model.named_parameters()]
    keys = list(model.state_dict())
    assert fg.wrap(model) is model
    assert wrapped_names(model) == WRAPPED
    assert [n for n, _ in model.named_parameters()] == names
    assert list(model.state_dict()) == keys
    assert fg.check(model) == []
    assert model.dw.weight.manifold.shape == (8, 1, 3, 3)
    assert model.grouped.weight.manifold.shape == (12, 2, 1, 1)
    assert model.grouped.weight.manifold.view == "filter"
    for name, p in model.named_parameters():
        if name in WRAPPED:
            assert p.manifold.seed == layer_seed(0, name)


def test_torchvision_heads_are_found():
    models = pytest.importorskip("torchvision.models")
    squeeze = models.squeezenet1_1(num_classes=10)  # its head is a 1x1 conv, not a Linear
    assert fg.wrapping.classifier_names(squeeze) == ("classifier",)
    fg.wrap(squeeze)
    assert "classifier.1.weight" not in wrapped_names(squeeze)
    assert "features.0.weight" in wrapped_names(squeeze)
    small = fg.wrap(models.mobilenet_v3_small(num_classes=10))
    assert not any(n.startswith("classifier.") for n in wrapped_names(small))
    assert "features.0.0.weight" in wrapped_names(small)


def test_include_exclude_patterns():
    assert wrapped_names(fg.wrap(make(), include="proj.*")) == {"proj.weight"}
    assert wrapped_names(fg.wrap(make(), include=["*"])) == WRAPPED | {"fc.weight"}
    assert wrapped_names(fg.wrap(make(), exclude=["stem.*", "dw.weight"])) == {
        "grouped.weight",
        "proj.weight",
    }
    with pytest.raises(ValueError, match="matches no conv / linear weight"):
        fg.wrap(make(), include="emb.weight")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"strategy": "nope"}, ValueError, "unknown strategy"),
        ({"strategy": "pio4", "manifolds": ["sphere"]}, ValueError, "fixes its manifolds"),
        ({"manifolds": ["sphere"]}, ValueError, "fixes its manifolds"),
        ({"strategy": "pio", "manifolds": ["circle"]}, ValueError, "circle"),
        ({"kernel": "diagonal"}, ValueError, "unknown kernel view"),
        ({"include": [1]}, ValueError, "strings"),
    ],
)
def test_invalid_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        fg.wrap(make(), **kwargs)


def test_wrap_rejects_meta_models_with_the_fix():
    with torch.device("meta"):
        model = Net()
    with pytest.raises(ValueError, match=r"stem\.weight .* meta device.*to_empty"):
        fg.wrap(model)
    model.to_empty(device="cpu")
    model.load_state_dict(make().state_dict())
    assert wrapped_names(fg.wrap(model)) == WRAPPED


def test_wrap_rejects_non_modules():
    with pytest.raises(TypeError, match=r"nn\.Module"):
        fg.wrap(torch.zeros(3))


def test_plain_strategy_with_manifolds():
    model = fg.wrap(make(), "pio", manifolds=["sphere", "stiefel"], seed=3)
    colls = {p.manifold for n, p in model.named_parameters() if n in WRAPPED}
    assert {c.manifold_names for c in colls} == {("sphere", "stiefel")}
    assert {c.strategy for c in colls} == {"pio"}
    assert fg.check(model) == []


def test_layer_seeds_are_independent_of_module_order():
    torch.manual_seed(0)
    a, b = fg.wrap(Net(), seed=5), fg.wrap(Reordered(), seed=5)
    sa, sb = fg.grouping_state(a), fg.grouping_state(b)
    assert sa.keys() == sb.keys() == WRAPPED
    for name in WRAPPED:
        assert torch.equal(sa[name]["kernel_pom"], sb[name]["kernel_pom"]), name
        assert torch.equal(sa[name]["pom_type"], sb[name]["pom_type"]), name
    other = fg.grouping_state(fg.wrap(Net(), seed=6))
    assert not torch.equal(sa["stem.weight"]["kernel_pom"], other["stem.weight"]["kernel_pom"])


def test_tied_weights_share_one_manifold_parameter():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    fg.wrap(model, exclude="3.weight")
    assert isinstance(model[0].weight, geoopt.ManifoldParameter)
    assert model[0].weight is model[2].weight
    names = ["0.weight", "0.bias", "2.bias", "3.weight", "3.bias"]
    assert [n for n, _ in model.named_parameters()] == names
    assert [r["name"] for r in fg.describe(model)] == ["0.weight"]
    fg.load_grouping_state(model, fg.grouping_state(model))
    assert model[0].weight is model[2].weight
    # assign=True unties weights in plain torch too; both stay on the manifold.
    model.load_state_dict(model.state_dict(), assign=True)
    assert isinstance(model[2].weight, geoopt.ManifoldParameter)
    assert fg.check(model) == []


# ---------------------------------------------------------------------- baseline and re-wrap
def test_euc_is_the_plain_model_and_fgsgd_is_sgd():
    model, ref = make(), make()
    assert fg.wrap(model, "euc") is model and wrapped_names(model) == set()
    opt = fg.FGSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for i in range(3):
        step(model, opt, i)
        step(ref, ref_opt, i)
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_rewrap_keeps_same_config_and_switches_others():
    model = fg.wrap(make(), "pio3")
    first = model.stem.weight.manifold
    fg.wrap(model, "pio3")
    assert model.stem.weight.manifold is first
    fg.wrap(model, "st")
    assert model.stem.weight.manifold.strategy == "single"
    assert fg.check(model) == []
    fg.wrap(model, "euc")
    assert wrapped_names(model) == set()
    assert fg.check(model) == [] and fg.describe(model) == []


# ---------------------------------------------------------------------- guard rails
def test_loading_plain_weights_projects_them():
    model = fg.wrap(make())
    plain = make(seed=1).state_dict()
    model.load_state_dict(plain)
    assert fg.check(model) == []
    coll = model.stem.weight.manifold
    torch.testing.assert_close(model.stem.weight.detach(), coll.projx(plain["stem.weight"]))


def test_loading_wrapped_weights_is_bit_exact():
    source = fg.wrap(make(seed=1))
    model = fg.wrap(make())
    state = as_bytes_and_back(source.state_dict(), weights_only=True)
    model.load_state_dict(state)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


@pytest.mark.parametrize("on_manifold", [True, False])
def test_load_with_assign_keeps_the_tagging(on_manifold):
    model = fg.wrap(make())
    state = (fg.wrap(make(seed=1)) if on_manifold else make(seed=1)).state_dict()
    before = {k: v.clone() for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    assert wrapped_names(model) == WRAPPED
    assert fg.check(model) == []
    for key, value in state.items():  # the caller's tensors are never projected in place
        assert torch.equal(value, before[key]), key
    shared = model.stem.weight.data_ptr() == state["stem.weight"].data_ptr()
    assert shared == on_manifold  # assign shares memory unless a projection was needed


def test_to_meta_and_to_empty_are_detected_and_load_restores():
    model = fg.wrap(make())
    model.to_empty(device="cpu")
    assert wrapped_names(model) == WRAPPED  # kept, but the memory is uninitialised
    model.to("meta")
    problems = fg.check(model)
    assert len(problems) == len(WRAPPED) and all("lost its manifold" in p for p in problems)
    with pytest.raises(ValueError, match="lost its manifold"):
        fg.param_groups(model)
    model.to_empty(device="cpu")
    model.load_state_dict(make(seed=2).state_dict())
    assert wrapped_names(model) == WRAPPED
    assert fg.check(model) == []


def test_swap_conversion_mode_loses_tags_detectably():
    model = fg.wrap(make())
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.double()
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert all("lost its manifold" in p for p in fg.check(model)) and fg.check(model)
    fg.reproject(model)
    assert wrapped_names(model) == WRAPPED and fg.check(model) == []
    assert model.stem.weight.dtype == torch.float64


def test_manual_replacement_and_corruption_are_reported_and_reprojected():
    model = fg.wrap(make())
    model.proj.weight = nn.Parameter(torch.randn(16, 12))
    with torch.no_grad():
        model.stem.weight.mul_(2.0)
    problems = fg.check(model)
    assert any(p.startswith("proj.weight: lost its manifold") for p in problems)
    assert any(p.startswith("stem.weight: ") and "lost" not in p for p in problems)
    assert fg.reproject(model) is model
    assert wrapped_names(model) == WRAPPED
    assert fg.check(model) == []


def test_check_reports_nonfinite_weights_anywhere():
    model = fg.wrap(make(), "pio4")
    coll = model.stem.weight.manifold
    euclidean = coll.manifold_names.index("euclidean")
    k = int((coll.kernel_type() == euclidean).nonzero()[0])
    with torch.no_grad():
        # spatial view: kernel k is W[k // c_in, k % c_in], a Euclidean kernel has no constraint
        model.stem.weight[k // coll.in_channels, k % coll.in_channels, 0, 0] = float("nan")
        model.bn.weight[1] = float("inf")
    assert fg.check(model) == [
        "stem.weight: 1 non-finite (NaN / inf) entries of 216",
        "bn.weight: 1 non-finite (NaN / inf) entries of 8",
    ]


def test_deepcopy_keeps_the_tagging():
    model = fg.wrap(make())
    clone = copy.deepcopy(model)
    assert wrapped_names(clone) == WRAPPED and fg.check(clone) == []
    assert clone.stem.weight.manifold is not model.stem.weight.manifold
    assert clone.stem.weight.manifold.same_grouping(model.stem.weight.manifold)
    clone.load_state_dict(make(seed=3).state_dict())  # the copied hooks act on the copy
    assert fg.check(clone) == [] and fg.check(model) == []
    assert not torch.equal(clone.stem.weight, model.stem.weight)


def test_pickling_the_whole_model():
    model = fg.wrap(make())
    loaded = as_bytes_and_back(model, weights_only=False)
    assert wrapped_names(loaded) == WRAPPED and fg.check(loaded) == []
    assert loaded.stem.weight.manifold.same_grouping(model.stem.weight.manifold)
    loaded.load_state_dict(make(seed=4).state_dict())
    assert fg.check(loaded) == []
    with pytest.raises(pickle.UnpicklingError):  # torch refuses; never a silent plain model
        as_bytes_and_back(model, weights_only=True)


def test_channels_last_steps_stay_on_the_manifold():
    model = make()
    del model.conv3d  # torch cannot convert a 5-D weight to channels_last
    model = fg.wrap(model).to(memory_format=torch.channels_last)
    assert wrapped_names(model) == WRAPPED
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)
    opt = fg.FGSGD(fg.param_groups(model), lr=0.1, momentum=0.9)
    for i in range(2):
        step(model, opt, i)
        assert fg.check(model) == []
    assert model.stem.weight.is_contiguous(memory_format=torch.channels_last)


def test_checkpoints_keep_plain_keys_and_name_their_groupings():
    state = as_bytes_and_back(fg.wrap(make(), seed=0).state_dict(), weights_only=True)
    assert list(state) == list(make().state_dict())
    assert set(state._metadata["stem"]["fgo_groupings"]) == {"weight"}
    assert "fgo_groupings" not in state._metadata["bn"]


@pytest.mark.parametrize(
    "wrap_kwargs", [{"seed": 1}, {"strategy": "st"}, {"strategy": "pio3"}], ids=str
)
def test_loading_weights_saved_on_other_groupings_raises_with_the_fix(wrap_kwargs):
    source = fg.wrap(make(seed=1), seed=0)
    state = as_bytes_and_back(source.state_dict(), weights_only=True)
    model = fg.wrap(make(), **wrap_kwargs)
    with pytest.raises(RuntimeError, match=r"stem\.weight was saved on another grouping") as err:
        model.load_state_dict(state)
    assert str(err.value).count("load_grouping_state") == 1  # the fix, named once
    fg.load_grouping_state(model, fg.grouping_state(source))
    model.load_state_dict(state)  # exact once the groupings match
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_unwrapped_target_takes_a_wrapped_checkpoint_then_wraps():
    source = fg.wrap(make(seed=1), seed=0)
    model = make()
    model.load_state_dict(source.state_dict())  # a plain model has no groupings to compare
    fg.wrap(model, seed=1)  # new groupings, from these weights
    assert fg.check(model) == []


def test_state_dict_without_metadata_off_manifold_warns_and_projects():
    source = fg.wrap(make(seed=1), seed=0)
    model = fg.wrap(make(), seed=1)
    stripped = dict(source.state_dict())  # a plain dict: no _metadata, source unknown
    with pytest.warns(UserWarning, match="load_grouping_state"):
        model.load_state_dict(stripped)
    assert fg.check(model) == []
    same = fg.wrap(make(), seed=0)
    same.load_state_dict(dict(source.state_dict()))  # on its manifolds: silent and exact
    assert torch.equal(same.stem.weight, source.stem.weight)


# ---------------------------------------------------------------------- grouping state
def test_grouping_state_roundtrip_rebinds_exact_groupings():
    source = fg.wrap(make(), "pio3", seed=11)
    state = as_bytes_and_back(fg.grouping_state(source), weights_only=True)
    target = fg.wrap(make(), "st", include="proj.*")
    with pytest.raises(RuntimeError, match=r"proj\.weight was saved on another grouping"):
        target.load_state_dict(source.state_dict())  # the groupings must come first
    fg.load_grouping_state(target, state)
    target.load_state_dict(source.state_dict())
    assert wrapped_names(target) == WRAPPED
    for name, p in target.named_parameters():
        if name in WRAPPED:
            assert p.manifold.same_grouping(dict(source.named_parameters())[name].manifold)
            assert torch.equal(p, dict(source.named_parameters())[name]), name  # not re-projected
    assert fg.check(target) == []
    partial = {"proj.weight": state["proj.weight"]}
    assert wrapped_names(fg.load_grouping_state(target, partial)) == {"proj.weight"}


def test_load_grouping_state_rejects_mismatches():
    state = fg.grouping_state(fg.wrap(make()))
    with pytest.raises(ValueError, match="does not have"):
        fg.load_grouping_state(make(), {"nope.weight": state["stem.weight"]})
    with pytest.raises(ValueError, match="expects"):
        fg.load_grouping_state(make(), {"proj.weight": state["stem.weight"]})


# ---------------------------------------------------------------------- reporting, groups
def test_describe_rows_and_table():
    model = fg.wrap(make(), "pio4")
    rows = fg.describe(model)
    assert [r["name"] for r in rows] == [
        "stem.weight",
        "dw.weight",
        "grouped.weight",
        "proj.weight",
    ]
    stem = rows[0]
    assert stem["shape"] == (8, 3, 3, 3) and stem["view"] == "spatial"
    assert stem["kernel_shape"] == (3, 3) and stem["kernels"] == 24
    assert sum(stem["poms_per_manifold"].values()) == stem["poms"]
    assert set(stem["poms_per_manifold"]) == {"sphere", "oblique", "stiefel", "euclidean"}
    table = fg.format_table(rows)
    lines = table.splitlines()
    assert lines[0].split()[:7] == [
        "name",
        "shape",
        "strategy",
        "view",
        "kernel",
        "kernels",
        "POMs",
    ]
    assert lines[-1].split()[0] == "total"
    assert lines[-1].split()[2] == str(sum(r["poms"] for r in rows))


def test_param_groups_are_plain_and_cover_every_parameter():
    model = fg.wrap(make(), "pio3")
    model.bn.weight.requires_grad_(False)
    groups = fg.param_groups(model, weight_decay=0.01)
    pickle.dumps([{k: v for k, v in g.items() if k != "params"} for g in groups])
    seen = [p for g in groups for p in g["params"]]
    expected = [p for p in model.parameters() if p.requires_grad]
    assert {id(p) for p in seen} == {id(p) for p in expected} and len(seen) == len(expected)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay[id(model.stem.weight)] == 0.0
    assert decay[id(model.fc.weight)] == 0.01 and decay[id(model.fc.bias)] == 0.0
    assert decay[id(model.emb.weight)] == 0.01


def test_rescale_attaches_a_rescaler():
    rescaling = pytest.importorskip("fgo_geoopt.rescaling")
    model = make()
    keys = list(model.state_dict())
    fg.wrap(model, rescale=True)
    rescaler = model.fgo_rescaler
    assert isinstance(rescaler, rescaling.Rescaler)
    assert list(model.state_dict()) == keys
    assert all(r["rescaled"] for r in fg.describe(model))
    assert fg.check(model) == []
    opt = fg.FGSGD(fg.param_groups(model), lr=0.1, momentum=0.9)
    step(model, opt)
    rescaler.update()
    assert fg.check(model) == []
    fg.wrap(model, rescale=True)  # replaces the rescaler, scales kept
    assert model.fgo_rescaler is not rescaler and not rescaler.attached
    assert fg.check(model) == []


def test_check_after_double_uses_the_projection_dtype():
    # Projected in float32, stored in float64 after model.double(): the float32 rounding of
    # the projection is not a violation; a real violation still is.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3, bias=False))
    fg.wrap(model, "pio3")
    model.double()
    assert fg.check(model) == []
    with torch.no_grad():
        model[0].weight.mul_(1.01)
    assert fg.check(model)
    # reproject in float64 tightens the tolerance again
    fg.reproject(model)
    assert fg.check(model) == []
    assert model[0].weight.manifold.projected_dtype == torch.float64
