"""The sparsifier bound to a real model and optimizer: invariants a user relies on."""

import ast
import copy
import itertools
import math
import pathlib

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

from itop_dist import (PruneRateSchedule, SparseConfig, Sparsifier, UpdateSchedule, list_methods,
                       total_steps)
from itop_dist.sparsifier import assemble, local_block, region
from itop_dist.state import SparseState
from itop_dist.suptickets import ReExplore
from itop_dist.topology import GROW_FNS, PRUNE_FNS, pack_bits, unpack_rows
from launcher.checkpoint import read_state, write_state

REPO = pathlib.Path(__file__).resolve().parents[1]


class TinyConvNet(nn.Module):
    """Conv + linear with biases and BN: what the masks must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.bn(self.conv(x))), 4)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def make(config: SparseConfig, steps: int = 40, opt: str = "sgd"):
    torch.manual_seed(0)
    model = TinyConvNet()
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True,
                                    weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)
    return model, optimizer, Sparsifier(model, optimizer, config, total_steps=steps)


def train_step(model, optimizer, gen):
    x = torch.randn(8, 3, 8, 8, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


COMBOS = list(itertools.product(sorted(PRUNE_FNS), sorted(GROW_FNS), ["none", "magnitude", "nonzeros"]))


@pytest.mark.parametrize("death,growth,redistribution", COMBOS)
def test_invariants_after_every_step(death, growth, redistribution):
    cfg = SparseConfig(density=0.2, death=death, growth=growth, redistribution=redistribution,
                       update_frequency=3, death_rate=0.3)
    model, opt, sp = make(cfg, steps=24)
    gen = torch.Generator().manual_seed(1)
    start = sp.state.nonzeros()
    fired_before = {n: f.clone() for n, f in sp.state.fired.items()}
    updates = 0
    for _ in range(24):
        train_step(model, opt, gen)
        report = sp.step()
        updates += report is not None
        counts = sp.state.nonzeros()
        if redistribution == "none":
            assert counts == start  # each layer's count is unchanged
        else:
            assert sum(counts.values()) == sum(start.values())  # the total is unchanged
        for name, p in sp.params.items():
            assert not p[~sp.masks[name]].any(), f"masked weight of {name} not zero"
            buf = opt.state[p]["momentum_buffer"]
            if cfg.mask_momentum:
                assert not buf[~sp.masks[name]].any(), f"momentum of pruned {name} not zero"
        for n, f in sp.state.fired.items():  # the explored union only grows and covers masks
            assert not (fired_before[n] & ~f).any() and not (sp.masks[n] & ~f).any()
            fired_before[n] = f.clone()
    assert updates == 8


@pytest.mark.parametrize("method", list_methods())
def test_every_method_keeps_masked_weights_zero_and_never_grows_density(method):
    gradual = method not in ("DST", "static")
    cfg = SparseConfig(method=method, density=0.2, final_density=0.1 if gradual else None,
                       init_prune_epoch=0, final_prune_epoch=2, update_frequency=3)
    torch.manual_seed(0)
    model = TinyConvNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = Sparsifier(model, opt, cfg, total_steps=12, epoch_steps=4)
    gen = torch.Generator().manual_seed(2)
    d0 = densities = sp.density
    for _ in range(12):
        train_step(model, opt, gen)
        sp.step()
        assert sp.density <= densities + 1e-12
        densities = sp.density
        assert all(not p[~sp.masks[n]].any() for n, p in sp.params.items())
    if gradual:
        assert sp.density == pytest.approx(0.1, abs=0.01)
    else:
        assert sp.density == d0


def test_static_method_never_changes_masks():
    model, opt, sp = make(SparseConfig(method="static", density=0.1, update_frequency=2))
    before = {n: m.clone() for n, m in sp.masks.items()}
    gen = torch.Generator().manual_seed(2)
    for _ in range(10):
        train_step(model, opt, gen)
        assert sp.step() is None
    assert all(torch.equal(before[n], m) for n, m in sp.masks.items())
    assert sp.itop_rate == pytest.approx(sp.density)


def test_only_conv_and_linear_weights_are_masked():
    _, _, sp = make(SparseConfig(density=0.1))
    assert set(sp.masks) == {"conv.weight", "fc1.weight", "fc2.weight"}
    assert all(m.dtype == torch.bool for m in sp.masks.values())
    _, _, sp = make(SparseConfig(density=0.1, exclude=("conv.",)))
    assert set(sp.masks) == {"fc1.weight", "fc2.weight"}


@pytest.mark.parametrize("reinit", [False, True])
def test_values_and_momentum_of_regrown_weights(reinit):
    cfg = SparseConfig(density=0.3, growth="gradient", update_frequency=5, death_rate=0.5,
                       regrow_reinit_zero=reinit)
    model, opt, sp = make(cfg)
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        train_step(model, opt, gen)
        sp.step()
    train_step(model, opt, gen)
    old_masks = {n: m.clone() for n, m in sp.masks.items()}
    sp.apply_masks()  # what step() does before the update; snapshot masked values
    before = {n: p.detach().clone() for n, p in sp.params.items()}
    mom_before = {n: opt.state[p]["momentum_buffer"].clone() for n, p in sp.params.items()}
    assert sp.step() is not None
    kept_regrown = 0
    for name, p in sp.params.items():
        new, old = sp.masks[name], old_masks[name]
        fresh = new & ~old  # grown from inactive positions: value 0, momentum 0 either way
        assert not p[fresh].any() and not opt.state[p]["momentum_buffer"][fresh].any()
        stayed = new & old
        if reinit:
            # RigL: every regrown weight is 0, including ones pruned and regrown at once.
            changed = stayed & (p.detach() != before[name])
            assert not p[changed].any()
        else:
            # Reference: a weight that stays active keeps its value and momentum.
            assert torch.equal(p.detach()[stayed], before[name][stayed])
            assert torch.equal(opt.state[p]["momentum_buffer"][stayed], mom_before[name][stayed])
            kept_regrown += int(stayed.sum())
    if reinit:
        zeroed = sum(int(((sp.masks[n] & old_masks[n]) & (p.detach() == 0)).sum())
                     for n, p in sp.params.items())
        assert zeroed > 0  # the dense layer pruned and regrew its own weights as zeros


def test_gradient_growth_needs_gradients():
    model, opt, sp = make(SparseConfig(density=0.2, growth="gradient", update_frequency=1))
    train_step(model, opt, torch.Generator().manual_seed(0))
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="before optimizer.zero_grad"):
        sp.step()


def test_momentum_growth_with_adam_and_unmasked_momentum():
    model, opt, sp = make(SparseConfig(density=0.2, growth="momentum", update_frequency=2), opt="adam")
    assert sp.config.mask_momentum is False  # momentum growth needs inactive momentum (docs/algorithms.md §4.3)
    gen = torch.Generator().manual_seed(0)
    start = sp.state.nonzeros()
    for _ in range(6):
        train_step(model, opt, gen)
        sp.step()
    assert sp.state.nonzeros() == start and sp.itop_rate > sp.density


def test_itop_rate_is_union_over_time_and_reported():
    cfg = SparseConfig(density=0.1, growth="random", update_frequency=2, death_rate=0.5)
    model, opt, sp = make(cfg, steps=20)
    gen = torch.Generator().manual_seed(4)
    union = {n: m.clone() for n, m in sp.masks.items()}
    rates = [sp.itop_rate]
    assert rates[0] == pytest.approx(sp.density)
    for _ in range(20):
        train_step(model, opt, gen)
        report = sp.step()
        if report is not None:
            for n, m in sp.masks.items():
                union[n] |= m
            assert f"The percentage of the total fired weights is {report.itop_rate:.4f}" in str(report)
            rates.append(report.itop_rate)
    total = sum(m.numel() for m in union.values())
    assert sp.itop_rate == sum(int(u.sum()) for u in union.values()) / total
    assert rates == sorted(rates) and rates[-1] > 2 * rates[0]


def test_state_dict_round_trip_is_bit_packed_and_refuses_other_runs():
    cfg = SparseConfig(density=0.1, update_frequency=2)
    model, opt, sp = make(cfg)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        train_step(model, opt, gen)
        sp.step()
    sd = sp.state_dict()
    bits = sd["state"]["masks"]["conv.weight"]["bits"]  # 16 rows of 3x3x3 = 27 weights: 4 bytes each
    assert bits.dtype == torch.uint8 and tuple(bits.shape) == (16, 4)
    _, _, fresh = make(cfg)
    fresh.load_state_dict(sd)
    assert all(torch.equal(fresh.masks[n], m) for n, m in sp.masks.items())
    assert all(torch.equal(fresh.state.fired[n], f) for n, f in sp.state.fired.items())
    assert fresh.itop_rate == sp.itop_rate > sp.density and fresh.state.step == 6
    # what a sharded run reads of its block: rows 5..8 of every layer, and nothing else
    part = SparseState.from_state_dict(sd["state"], sp.shapes, rows={n: (5, 4) for n in sp.shapes})
    assert all(torch.equal(part.masks[n], m[5:9]) and torch.equal(part.fired[n], sp.state.fired[n][5:9])
               for n, m in sp.masks.items())
    # a checkpoint of an earlier version (one flat bit string per tensor, 54 bytes for conv) loads
    flat = copy.deepcopy(sd)
    for key in ("masks", "fired"):
        for entry in flat["state"][key].values():
            entry["bits"] = pack_bits(unpack_rows(entry["bits"], entry["shape"]))
    assert flat["state"]["masks"]["conv.weight"]["bits"].shape == (54,)
    _, _, old = make(cfg)
    old.load_state_dict(flat)
    assert all(torch.equal(old.masks[n], m) for n, m in sp.masks.items()) and old.itop_rate == sp.itop_rate
    _, _, other = make(SparseConfig(density=0.2, update_frequency=2))
    with pytest.raises(ValueError, match="density=0.1"):
        other.load_state_dict(sd)


def test_schedules_follow_the_spec():
    r = PruneRateSchedule(0.5, 0.005, 1000, "cosine")
    assert r(0) == 0.5 and r(1000) == pytest.approx(0.005)
    assert r(500) == pytest.approx(0.005 + 0.495 / 2)
    assert r(250) == pytest.approx(0.005 + 0.495 * (1 + math.cos(math.pi / 4)) / 2)
    assert PruneRateSchedule(0.5, 0.005, 1000, "constant")(700) == 0.5
    assert PruneRateSchedule(0.5, 0.005, 1000, "linear")(250) == pytest.approx(0.375)
    assert UpdateSchedule(100, 1000).update_steps() == list(range(100, 1001, 100))
    assert UpdateSchedule(100, 1000, stop_fraction=0.75).update_steps()[-1] == 700
    assert UpdateSchedule(None, 1000).update_steps() == []
    assert total_steps(391, 250, 5) == 488750 and total_steps(352, 160, 2.5) == 140800


@pytest.mark.parametrize("field,value,flag", [
    ("density", 0.0, "--density"), ("density", 1.5, "--density"),
    ("update_frequency", 0, "--update_frequency"), ("growth", "magic", "--growth"),
    ("death", "x", "--death"), ("sparse_init", "ERKK", "--sparse_init"),
    ("redistribution", "momentumz", "--redistribution"), ("death_rate", 2.0, "--death-rate"),
])
def test_bad_settings_name_the_flag(field, value, flag):
    with pytest.raises(ValueError, match=flag):
        SparseConfig(**{field: value})


def test_unknown_method_lists_known():
    with pytest.raises(ValueError, match="--method: 'nope' is unknown.*DST"):
        SparseConfig(method="nope")


def test_sparse_core_never_imports_the_rest():
    for path in (REPO / "itop_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in {"models", "data_pipelines", "launcher"}, path


@pytest.mark.slow
def test_no_module_of_ours_shadows_the_standard_library():
    """``python launcher/train.py`` puts launcher/ first on sys.path: a launcher/inspect.py
    was imported for the standard library's ``inspect`` (a partially initialised module)."""
    import sys

    ours = {p.stem for pkg in ("itop_dist", "models", "data_pipelines", "launcher")
            for p in (REPO / pkg).rglob("*.py")} | {p.name for pkg in ("itop_dist", "models",
                                                    "data_pipelines", "launcher")
                                                    for p in (REPO / pkg).rglob("*") if p.is_dir()}
    assert not ours & set(sys.stdlib_module_names)
    import subprocess

    proc = subprocess.run([sys.executable, str(REPO / "launcher" / "train.py"), "--help"],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "--density" in proc.stdout, proc.stderr[-2000:]


# --- every optimizer state follows the masks; dense layers are never explored ----------------

OPTIMIZERS = {
    # name: (factory, the per-weight state tensors it must keep, besides the scalar ``step``)
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4),
            {"momentum_buffer"}),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=5e-4, amsgrad=True),
             {"exp_avg", "exp_avg_sq", "max_exp_avg_sq"}),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-2),
              {"exp_avg", "exp_avg_sq"}),
}


def per_weight_state(opt, p, expected: set[str]) -> dict[str, torch.Tensor]:
    """The optimizer's state tensors of p's shape, by name; the names must be ``expected``."""
    state = {k: v for k, v in opt.state[p].items() if k != "step"}
    assert set(state) == expected and all(v.shape == p.shape for v in state.values())
    return state


def capture_grown(sp) -> list[dict[str, torch.Tensor]]:
    """Record the positions each update grows (including weights pruned and regrown at once)."""
    seen, update = [], sp.method.update

    def recording(inputs):
        result = update(inputs)
        seen.append({n: g.clone() for n, g in result.grown.items()})
        return result

    sp.method.update = recording
    return seen


@pytest.mark.parametrize("opt_name", sorted(OPTIMIZERS))
def test_every_optimizer_state_is_zero_where_masked_and_where_regrown(opt_name):
    factory, names = OPTIMIZERS[opt_name]
    torch.manual_seed(0)
    model = TinyConvNet()
    opt = factory(model.parameters())
    cfg = SparseConfig(density=0.3, growth="gradient", update_frequency=4, death_rate=0.5,
                       regrow_reinit_zero=True)
    sp = Sparsifier(model, opt, cfg, total_steps=24)
    grown_log = capture_grown(sp)
    gen = torch.Generator().manual_seed(5)
    updates = 0
    for _ in range(24):
        train_step(model, opt, gen)
        report = sp.step()
        for name, p in sp.params.items():
            off = ~sp.masks[name]
            assert torch.equal(p.detach()[off], torch.zeros(int(off.sum())))  # exactly 0
            for key, t in per_weight_state(opt, p, names).items():
                assert not t[off].any(), f"{key} of masked-off {name} not zero"
        if report is None:
            continue
        updates += 1
        grown = grown_log[-1]
        assert sum(int(g.sum()) for g in grown.values()) == report.regrown > 0
        for name, p in sp.params.items():
            g = grown[name]
            assert not (g & ~sp.masks[name]).any()
            assert not p.detach()[g].any(), f"regrown {name} not 0 after the update"
            for key, t in per_weight_state(opt, p, names).items():
                assert not t[g].any(), f"{key} of regrown {name} not zero"
        # With fresh state a regrown weight does not move on a zero gradient (Adam's stale
        # moments moved it by about lr per step).
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for name, p in sp.params.items():
            assert not p.detach()[grown[name]].any(), f"regrown {name} moved on a zero gradient"
        sp.apply_masks()
    assert updates == 6


class TinyMLP(nn.Module):
    """ERK at density 0.2 makes the small first and last layers dense, the middle ones sparse."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                                 nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def mlp_step(model, opt, gen):
    x, y = torch.randn(16, 4, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def fake_gradients(model, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)


VARIANTS = [(m, "random", "none") for m in list_methods() if m != "DST"] + [
    ("DST", growth, redistribution)
    for growth in sorted(GROW_FNS) for redistribution in ("none", "magnitude", "nonzeros")
]


@pytest.mark.parametrize("method,growth,redistribution", VARIANTS)
def test_dense_layers_are_never_pruned_or_regrown(method, growth, redistribution):
    gradual = method not in ("DST", "static")
    if method.startswith("GraNet"):
        growth = "gradient"
    # Gradual methods: the pruning window [0, 1 epoch] closes before their first update at
    # step 4 (c1 = 0), so every update is a prune-and-regrow one (or none, for GMP).
    cfg = SparseConfig(method=method, density=0.2, final_density=0.1 if gradual else None,
                       init_prune_epoch=0, final_prune_epoch=1, update_frequency=4, death_rate=0.5,
                       growth=growth, redistribution=redistribution, regrow_reinit_zero=True)
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = Sparsifier(model, opt, cfg, total_steps=40, epoch_steps=2)
    dense = {n for n, m in sp.masks.items() if bool(m.all())}
    expected_dense = set(sp.masks) if method == "GMP" else {"net.0.weight", "net.6.weight"}
    assert dense == expected_dense
    gen = torch.Generator().manual_seed(6)

    def check(update):
        before = {n: sp.params[n].detach().clone() for n in dense}
        state = {n: opt.state[sp.params[n]]["momentum_buffer"].clone() for n in dense}
        report = update()
        for n in dense:
            assert torch.equal(sp.params[n].detach(), before[n]), f"dense {n} changed by {method}"
            assert torch.equal(opt.state[sp.params[n]]["momentum_buffer"], state[n])
            assert bool(sp.masks[n].all())
            if report is not None:
                assert report.layer_densities[n] == 1.0
        return report

    for i in range(8):  # the training loop's own updates (steps 4 and 8)
        mlp_step(model, opt, gen)
        check(sp.step)
    for seed in range(3):  # explicit updates with a fake gradient, and Sup-tickets' re-explore
        fake_gradients(model, seed)
        sp.apply_masks()
        report = check(sp.update)
        if method in ("DST", "GraNet", "GraNet_uniform"):
            assert report.pruned > 0 and report.pruned == report.regrown
        check(lambda: sp.update(ReExplore(cfg, 100, rate=0.5)))


@pytest.mark.parametrize("redistribution", ["none", "magnitude", "nonzeros"])
def test_weights_zeroed_per_update_are_exactly_those_the_sparse_layers_prune(redistribution):
    cfg = SparseConfig(density=0.2, growth="gradient", update_frequency=4, death_rate=0.3,
                       redistribution=redistribution, regrow_reinit_zero=True)
    torch.manual_seed(0)
    model = TinyMLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    sp = Sparsifier(model, opt, cfg, total_steps=40)
    dense = {n for n, m in sp.masks.items() if bool(m.all())}
    assert dense == {"net.0.weight", "net.6.weight"}
    gen = torch.Generator().manual_seed(7)
    for i in range(3):
        for _ in range(3):
            mlp_step(model, opt, gen)
            assert sp.step() is None
        mlp_step(model, opt, gen)
        sp.apply_masks()  # what step() does before it updates
        masks = {n: m.clone() for n, m in sp.masks.items()}
        with torch.no_grad():  # a regrown weight whose inputs stayed dead is still exactly 0
            for n, p in sp.params.items():
                p[masks[n] & (p == 0)] = 1e-4
        before = {n: p.detach().clone() for n, p in sp.params.items()}
        assert all(bool((before[n] != 0).eq(masks[n]).all()) for n in masks)  # active <=> non-zero
        report = sp.step()
        assert report is not None and sp.state.step == 4 * (i + 1)
        zeroed = {n: int(((before[n] != 0) & (p.detach() == 0)).sum()) for n, p in sp.params.items()}
        assert all(zeroed[n] == 0 for n in dense)
        assert sum(zeroed.values()) == report.pruned == report.regrown > 0
        if redistribution == "none":
            expected = {n: math.ceil(report.rate * int(masks[n].sum())) for n in masks if n not in dense}
            assert {n: zeroed[n] for n in expected} == expected
            assert sp.state.nonzeros() == {n: int(m.sum()) for n, m in masks.items()}
        assert sum(sp.state.nonzeros().values()) == sum(int(m.sum()) for m in masks.values())


@pytest.mark.parametrize("wrapped,name", [
    ("module.features.0.weight", "features.0.weight"),                          # DDP
    ("_orig_mod.module.fc.weight", "fc.weight"),                                 # compiled DDP
    ("module._orig_mod.fc.weight", "fc.weight"),                                 # DDP of compiled
    ("layer1._fsdp_wrapped_module.0.conv1.weight", "layer1.0.conv1.weight"),     # nested FSDP unit
    ("blocks.2._checkpoint_wrapped_module.attn.qkv.weight", "blocks.2.attn.qkv.weight"),
    ("submodule.weight", "submodule.weight"),                                    # "module." inside a name
    ("encoder.module.weight", "encoder.module.weight"),                          # a user's own "module"
    ("module.submodule.module.weight", "submodule.module.weight"),
])
def test_canonical_name_removes_whole_wrapper_components_only(wrapped, name):
    from itop_dist.sparsifier import canonical_name

    assert canonical_name(wrapped) == name


# --- the sharded state in one process (two-process runs: test_sharded_state.py) ----------------


def test_assemble_puts_each_rank_block_in_place():
    full = torch.arange(7 * 3).reshape(7, 3)
    c = math.ceil(7 / 4)  # FSDP's dim-0 chunks over 4 ranks: 2, 2, 2, 1 rows
    blocks = [((min(r * c, 7), 0), (max(0, min(c, 7 - r * c)), 3)) for r in range(4)]
    pieces = [full[region(*b)].reshape(-1) for b in blocks]
    assert [p.numel() for p in pieces] == [6, 6, 6, 3]
    assert torch.equal(assemble(pieces, blocks, (7, 3)), full)
    # HSDP: two replicas of 2 shards; each block arrives twice, identically
    c = math.ceil(7 / 2)
    halves = [((r * c, 0), (min(c, 7 - r * c), 3)) for r in range(2)]
    assert torch.equal(assemble([full[region(*b)] for b in halves * 2], halves * 2, (7, 3)), full)
    # a rank with no rows (more ranks than rows)
    empty = [((0, 0), (1, 3)), ((1, 0), (0, 3))]
    assert torch.equal(assemble([full[:1], full[1:1]], empty, (1, 3)), full[:1])


class ShardedMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def train_sharded(sharded: bool, config: SparseConfig, steps: int = 12) -> Sparsifier:
    torch.manual_seed(0)
    model = ShardedMLP()
    if sharded:
        for m in (model.fc1, model.fc2, model):
            fully_shard(m)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, optimizer, config, total_steps=steps, epoch_steps=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        sp.step()
    return sp


@pytest.fixture
def single_rank_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("config", [
    SparseConfig(density=0.2, growth="gradient", update_frequency=3, regrow_reinit_zero=True),
    SparseConfig(method="GraNet", density=0.5, final_density=0.1, growth="momentum", update_frequency=2,
                 init_prune_epoch=0, final_prune_epoch=2),
    SparseConfig(density=0.2, growth="momentum", redistribution="magnitude", update_frequency=3),
    SparseConfig(method="GMP_uniform", density=0.5, final_density=0.1, update_frequency=2,
                 init_prune_epoch=0, final_prune_epoch=2),
], ids=["rigl", "granet", "sparse-momentum", "gmp-uniform"])
def test_sharded_path_decides_as_the_replicated_one_and_checkpoints_interchange(single_rank_group, config,
                                                                              tmp_path):
    """A world-size-1 FSDP2 wrap takes the sharded path (gather, decide, scatter, checks) on
    shards that happen to be whole: the same masks, numbers and checkpoints as without it."""
    sharded, plain = train_sharded(True, config), train_sharded(False, config)
    assert sharded.sharded and not plain.sharded
    assert local_block(sharded.params["fc2.weight"]) == ((0, 0), (32, 32))
    for name, m in plain.masks.items():
        assert torch.equal(sharded.full_masks()[name], m) and torch.equal(sharded.full_fired()[name],
                                                                          plain.state.fired[name])
    assert sharded.state.updates == plain.state.updates > 0
    assert (sharded.density, sharded.itop_rate, sharded.layer_densities(), sharded.nonzeros()) == (
        plain.density, plain.itop_rate, plain.layer_densities(), plain.nonzeros())
    assert sharded.itop_rate > sharded.density
    sharded.verify()
    fresh = train_sharded(True, config, steps=1)
    fresh.load_state_dict(plain.state_dict())  # an unsharded checkpoint into a sharded run
    assert all(torch.equal(fresh.masks[n], m) for n, m in plain.masks.items())
    fresh.verify()
    # and back, through a sharded checkpoint's files (its blocks, read back as one state)
    write_state(tmp_path, "sparse_state-shard-0", sharded.state_dict())
    assert not (tmp_path / "sparse_state.json").exists()
    back = train_sharded(False, config, steps=1)
    back.load_state_dict(read_state(tmp_path, "sparse_state"))
    assert all(torch.equal(back.state.fired[n], f) for n, f in plain.state.fired.items())
    assert back.state.step == plain.state.step and back.itop_rate == plain.itop_rate
