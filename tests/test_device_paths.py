"""The GPU code paths, exercised on the CPU: torch.compile, bf16 autocast, channels_last, the
fp16 loss scaler's skipped steps and the per-device mask multiplier. Each test checks values
that a plausible bug would change (a mask not applied, a recompiling update, an fp32 forward,
a skipped step that still counts)."""

import copy
import shlex

import pytest
import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from itop_dist import SparseConfig, Sparsifier
from itop_dist.sparsifier import resolve_apply_mode
from launcher.checkpoint import read_state
from launcher.config import parse_config
from launcher.events import Event, Plugin
from test_train import train

DIGITS = "--sparse --data digits --model digits-mlp --batch-size 64 --density 0.1 --seed 5"


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps one process-wide state and refuses a second mixed precision in a
    process; reset it around a test that needs its own (as Accelerate's own test case,
    accelerate.test_utils.AccelerateTestCase, does in tearDown)."""
    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


class StepChecks(Plugin):
    """After every optimizer step: masked weights are exactly zero; counts the steps whose
    masks differ from the previous step's (``changes``). ``watch(run)`` runs once, before the
    first step (hooks on the model). ``strict_from`` (compiled runs): from the step after it
    to the last, any recompilation raises (torch.compiler.set_stance("fail_on_recompile"));
    the evaluation after the last step compiles its own graph."""

    def __init__(self, strict_from: int | None = None) -> None:
        self.strict_from, self.changes, self.masks = strict_from, 0, None

    def watch(self, run) -> None:
        pass

    def on_event(self, event: Event, run) -> None:
        if event == Event.INIT:
            self.watch(run)
            self.masks = copy_masks(run.sparsifier)
        if event != Event.AFTER_OPTIMIZER_STEP:
            return
        assert masked_weights_are_zero(run.sparsifier)
        masks = copy_masks(run.sparsifier)
        self.changes += any(not torch.equal(masks[n], self.masks[n]) for n in masks)
        self.masks = masks
        if self.strict_from is not None:
            strict = self.strict_from <= run.state.step < run.last_step
            torch.compiler.set_stance("fail_on_recompile" if strict else "default")


def run_in_process(args: str, out_dir, checks: StepChecks):
    """Build a Trainer from itop-train flags, add ``checks`` as the last plug-in (its INIT
    hook runs now: the Trainer fired INIT while building), fit and close; the trainer."""
    from launcher.trainer import Trainer

    cfg = parse_config(shlex.split(f"{args} --output-dir {out_dir} --device cpu --no-progress --no-wandb --no-plots"))
    trainer = Trainer(cfg)
    trainer.plugins.append(checks)
    checks.on_event(Event.INIT, trainer)
    try:
        trainer.fit()
    finally:
        trainer.close()
        torch.compiler.set_stance("default")
    return trainer


def masked_weights_are_zero(sparsifier: Sparsifier) -> bool:
    return all(not p.detach()[~sparsifier.state.masks[n]].any() for n, p in sparsifier.params.items())


def copy_masks(sparsifier: Sparsifier) -> dict[str, torch.Tensor]:
    return {n: m.clone() for n, m in sparsifier.state.masks.items()}


# --- the mask multiplier per device ---------------------------------------------------------
def test_auto_apply_mode_resolves_per_device_type_and_explicit_modes_stand():
    assert resolve_apply_mode("auto", "cpu") == "float"  # measured: 3.4x faster than bool
    assert resolve_apply_mode("auto", "cuda") == "float"  # the default until measured on a GPU
    assert resolve_apply_mode("bool", "cuda") == "bool" and resolve_apply_mode("float", "cpu") == "float"
    with pytest.raises(ValueError, match="--mask-apply: 'half'"):
        resolve_apply_mode("half", "cpu")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    for mode, dtype in (("auto", torch.float32), ("bool", torch.bool), ("foreach", torch.float32)):
        sp = Sparsifier(model, None, SparseConfig(density=0.5, apply_mode=mode), total_steps=10)
        assert {m.dtype for m in sp._mult.values()} == {dtype}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_every_apply_mode_gives_the_same_weights_and_optimizer_state(optimizer, monkeypatch):
    """float, bool and foreach multiply the same masks into the weights and every per-weight
    optimizer state tensor; foreach in one fused call per (device, dtype) group: here two, as
    the last layer is float64."""
    def trained(mode):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6),
                                    torch.nn.ReLU(), torch.nn.Linear(6, 3).double())
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optimizer == "sgd"
               else torch.optim.Adam(model.parameters(), lr=0.01))
        sp = Sparsifier(model, opt, SparseConfig(density=0.3, apply_mode=mode, mask_momentum=True,
                                                 update_frequency=None), total_steps=10)
        x = torch.randn(7, 12)
        for _ in range(3):
            h = model[3](model[2](model[1](model[0](x)))).double()
            model[4](h).square().mean().backward()
            opt.step()
            with torch.no_grad():  # make every masked entry nonzero before the masks go in
                for p in model.parameters():
                    p.add_(0.01)
                    for t in opt.state[p].values():
                        if t.shape == p.shape:
                            t.add_(0.01)
            sp.apply_masks()
            opt.zero_grad()
        return sp, model, opt

    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda ts, ms: calls.append({t.dtype for t in ts}) or real(ts, ms))
    results = {mode: trained(mode) for mode in ("float", "bool", "foreach")}
    # at the start and after each of the 3 steps: one call per dtype
    assert calls == [{torch.float32}, {torch.float64}] * 4
    sp, ref_model, ref_opt = results["float"]
    for mode in ("bool", "foreach"):
        _, model, opt = results[mode]
        for (name, p), q in zip(ref_model.named_parameters(), model.parameters()):
            assert torch.equal(p, q), (mode, name)
            for key, t in ref_opt.state[p].items():
                assert torch.equal(t, opt.state[q][key]), (mode, name, key)
    for name, p in sp.params.items():  # the masks went in: masked entries are exactly zero
        assert (p[~sp.masks[name]] == 0).all() and (p[sp.masks[name]] != 0).all()
        for t in ref_opt.state[p].values():
            if t.shape == p.shape:
                assert (t[~sp.masks[name]] == 0).all()


# --- the fp16 loss scaler's skipped step ----------------------------------------------------
def test_a_step_skipped_for_inf_gradients_feeds_no_mask_update_and_no_step_count():
    """fp16 needs a GPU, but the skip is decided by Accelerate's AcceleratedOptimizer from its
    GradScaler, which runs on the CPU too (torch.amp.GradScaler("cpu"), torch >= 2.3)."""
    from launcher.trainer import optimizer_and_sparse_step

    Accelerator(cpu=True)  # the state AcceleratedOptimizer reads (device, sync)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    optimizer = AcceleratedOptimizer(sgd, device_placement=False, scaler=scaler)
    sp = Sparsifier(model, sgd, SparseConfig(density=0.5, growth="gradient", update_frequency=1), total_steps=100)
    x, y = torch.randn(8, 16), torch.randint(0, 4, (8,))

    def backward(poison: bool) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(torch.nn.functional.cross_entropy(model(x), y)).backward()
        if poison:
            model[0].weight.grad[0, 0] = float("inf")

    weights, masks = [p.detach().clone() for p in model.parameters()], copy_masks(sp)
    backward(poison=True)
    assert optimizer_and_sparse_step(optimizer, sp) is None
    assert optimizer.step_was_skipped and scaler.get_scale() == 2.0 ** 9  # the scaler backed off
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters()))
    assert sp.state.step == 0 and all(torch.equal(masks[n], sp.state.masks[n]) for n in masks)
    # The next, finite step is taken, counted and (update_frequency 1) updates the masks.
    backward(poison=False)
    report = optimizer_and_sparse_step(optimizer, sp)
    assert not optimizer.step_was_skipped and report is not None and report.step == 1 and sp.state.step == 1
    assert report.pruned > 0 and any(not torch.equal(masks[n], sp.state.masks[n]) for n in masks)
    assert masked_weights_are_zero(sp)


# --- torch.compile -----------------------------------------------------------------------------
@pytest.mark.slow
def test_a_compiled_model_takes_mask_updates_without_recompiling():
    """Masks are multiplied into the parameters in place, outside the compiled graph, whose
    inputs they are: after each update the compiled forward equals the eager one on the new
    weights, and no update recompiles (torch.compiler.set_stance("fail_on_recompile"), the
    public API: it raises on any recompilation)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    model.compile()  # in place, as --compile does: the parameter names stay the eager ones
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sp = Sparsifier(model, optimizer, SparseConfig(density=0.3, growth="gradient", update_frequency=2),
                    total_steps=100)
    assert set(sp.params) == {"0.weight", "2.weight"}
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        return sp.step()

    step()  # compiles
    updates = 0
    with torch.compiler.set_stance("fail_on_recompile"):
        for _ in range(6):
            before = copy_masks(sp)
            if step() is None:
                continue
            updates += 1
            assert any(not torch.equal(before[n], sp.state.masks[n]) for n in before)
            assert masked_weights_are_zero(sp)
            compiled = model(x)
            with torch.compiler.set_stance("force_eager"):
                eager = model(x)
            torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    assert updates == 3


@pytest.mark.slow
def test_compiled_sparse_run_keeps_masks_exact_and_never_recompiles_for_an_update(tmp_path):
    from torch._dynamo.utils import counters

    torch.compiler.reset()  # a digits-mlp compiled earlier in this process would be reused
    graphs = counters["stats"]["unique_graphs"]
    checks = StepChecks(strict_from=1)  # step 1 compiled the training graph
    trainer = run_in_process(f"{DIGITS} --growth gradient --update_frequency 2 --epochs 5 --max-steps 12 "
                             f"--compile", tmp_path, checks)
    assert trainer.state.step == 12 and checks.changes == 6  # an update at steps 2, 4, ..., 12
    # one graph for training, one for evaluation (model.eval() fails the first's guards):
    # a graph per mask update would make 8
    assert counters["stats"]["unique_graphs"] - graphs == 2


def test_compile_is_off_by_default_and_resumable_either_way():
    from launcher.config import identity_hash

    eager, compiled = parse_config(shlex.split(DIGITS)), parse_config(shlex.split(f"{DIGITS} --compile"))
    assert (eager.model.compile, compiled.model.compile) == (False, True)
    assert parse_config(shlex.split(f"{DIGITS} --compile --no-compile")).model.compile is False
    # the same experiment: the same identity, so the same default run folder and --resume auto
    assert identity_hash(eager.to_dict()) == identity_hash(compiled.to_dict()) and eager.run_dir == compiled.run_dir


@pytest.mark.slow
@pytest.mark.dist
def test_compiled_ddp_ranks_train_one_sparse_network(tmp_path):
    """Compiled before DDP wraps it: both ranks end with rank 0's masks, explored union and
    weights (the run checks this itself and fails otherwise) after 8 updates."""
    from test_distributed import assert_identical, launch, ranks

    launch(tmp_path, "--sharding ddp --growth gradient --compile --no-wandb")
    r0, r1 = ranks(tmp_path)
    assert_identical(r0, r1)
    assert r0["updates"] == 8 and r0["summary"]["ranks_identical"]


def test_compile_with_an_fsdp2_stage_is_refused_in_one_line(tmp_path):
    from launcher.config import ConfigError
    from launcher.trainer import Trainer

    cfg = parse_config(shlex.split(f"{DIGITS} --compile --sharding zero3 --output-dir {tmp_path} --device cpu "
                                   f"--no-progress --no-wandb"))
    with pytest.raises(ConfigError, match=r"^--compile with --sharding zero3: .* use --sharding ddp or zero1"):
        Trainer(cfg)
    assert not tmp_path.exists() or not any(tmp_path.iterdir())  # the run folder as it was


@pytest.mark.slow
def test_compiled_resume_is_exact_and_checkpoints_interchange_with_eager_runs(tmp_path):
    args = f"{DIGITS} --growth gradient --update_frequency 10 --epochs 2"  # 22 steps per epoch
    full = train(f"{args} --compile", tmp_path, "full")
    part = train(f"{args} --compile --max-steps 31", tmp_path, "part")  # stopped mid-epoch
    train(f"{args} --compile --resume auto", tmp_path, "part")
    a = read_state(full / "checkpoints" / "step-00000044", "sparse_state")["state"]
    b = read_state(part / "checkpoints" / "step-00000044", "sparse_state")["state"]
    assert a["masks"].keys() == b["masks"].keys()
    for name in a["masks"]:
        assert torch.equal(a["masks"][name]["bits"], b["masks"][name]["bits"])
        assert torch.equal(a["fired"][name]["bits"], b["fired"][name]["bits"])
    wa = load_file(full / "checkpoints" / "step-00000044" / "model.safetensors")
    wb = load_file(part / "checkpoints" / "step-00000044" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # An eager run's checkpoint holds the same names and resumes compiled (--compile is
    # resumable: the same experiment), into the same run folder.
    eager = train(f"{args} --max-steps 31", tmp_path, "eager")
    we = load_file(eager / "checkpoints" / "step-00000031" / "model.safetensors")
    e = read_state(eager / "checkpoints" / "step-00000031", "sparse_state")["state"]
    assert we.keys() == wa.keys() and e["masks"].keys() == a["masks"].keys()
    assert not any("_orig_mod" in k for k in (*wa, *a["masks"]))
    train(f"{args} --compile --resume auto", tmp_path, "eager")
    assert (eager / "checkpoints" / "step-00000044").is_dir()


# --- bf16 autocast and channels_last on the CPU ---------------------------------------------
@pytest.mark.slow
def test_bf16_autocast_computes_in_bf16_and_keeps_fp32_masked_weights_zero(tmp_path, fresh_accelerate_state):
    class Dtypes(StepChecks):
        def watch(self, run) -> None:
            self.dtypes = set()
            run.accelerator.unwrap_model(run.model).fc1.register_forward_hook(
                lambda m, i, out: self.dtypes.add(out.dtype))

    checks = Dtypes()
    trainer = run_in_process(f"{DIGITS} --growth gradient --update_frequency 2 --epochs 5 --max-steps 6 "
                             f"--mixed-precision bf16", tmp_path, checks)
    assert trainer.accelerator.mixed_precision == "bf16" and checks.dtypes == {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}  # fp32 master weights
    assert checks.changes == 3  # an update at steps 2, 4, 6


@pytest.mark.slow
def test_channels_last_on_cpu_trains_with_channels_last_weights_and_inputs(tmp_path):
    """Forced on the CPU: the first conv sees a channels_last batch and weight at every step,
    masks apply (masked weights zero after every step) and update. The masks of the two runs
    are not compared: channels_last kernels round differently, and after the first update 6 of
    270,896 entries (near-ties of magnitude) already differ; the next test compares the mask
    decision itself."""
    class Formats(StepChecks):
        def watch(self, run) -> None:  # the first conv: its 3-channel input is the loader's batch
            self.seen = set()
            run.accelerator.unwrap_model(run.model).conv.register_forward_pre_hook(lambda m, i: self.seen.add(
                (i[0].is_contiguous(memory_format=torch.channels_last),
                 m.weight.is_contiguous(memory_format=torch.channels_last))))

    args = ("--sparse --model cifar_resnet_20 --data synthetic --synthetic-shape 3,32,32 --synthetic-size 160 "
            "--batch-size 16 --density 0.2 --growth random --update_frequency 2 --epochs 2 --max-steps 6 --seed 3")
    for layout, seen in (("true", {(True, True)}), ("false", {(False, False)})):
        checks = Formats()
        run_in_process(f"{args} --channels-last {layout}", tmp_path / layout, checks)
        assert checks.seen == seen and checks.changes == 3  # an update at steps 2, 4, 6


def test_mask_updates_decide_the_same_on_channels_last_weights():
    """The same weights in either layout get the same masks, update after update (magnitude
    prune, random regrowth from the mask seed), and stay channels_last: a mask read or written
    in storage order instead of index order would scramble them."""
    torch.manual_seed(0)
    nchw = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 8, 3))
    cl = copy.deepcopy(nchw).to(memory_format=torch.channels_last)
    config = SparseConfig(density=0.3, growth="random", update_frequency=1)
    a, b = (Sparsifier(m, None, config, total_steps=100) for m in (nchw, cl))
    initial = copy_masks(a)
    for _ in range(3):
        with torch.no_grad():  # new weights, equal in both, as if trained
            for p, q in zip(nchw.parameters(), cl.parameters()):
                p.add_(torch.randn_like(p))
                q.copy_(p)
        a.update(), b.update()
        assert all(torch.equal(a.state.masks[n], b.state.masks[n]) for n in a.state.masks)
        assert all(torch.equal(p, q) for p, q in zip(nchw.parameters(), cl.parameters()))
    assert masked_weights_are_zero(b) and cl[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(not torch.equal(initial[n], b.state.masks[n]) for n in initial)  # the updates moved them


# --- the rest of the CUDA-only lines, reached through the device facts they read ------------


@pytest.mark.parametrize("device_type, input_shape, expected", [
    ("cuda", (3, 224, 224), True), ("cuda", (64,), False), ("cpu", (3, 32, 32), False)])
def test_channels_last_defaults_to_on_for_image_models_on_cuda_only(device_type, input_shape, expected):
    from launcher.config import default_channels_last
    assert default_channels_last(device_type, input_shape) is expected


@pytest.mark.parametrize("cuda, bf16, device, expected", [
    (True, True, "auto", "bf16"), (True, False, "auto", "no"), (True, True, "cpu", "no"), (False, True, "auto", "no")])
def test_mixed_precision_auto_is_bf16_on_a_gpu_that_has_it(monkeypatch, cuda, bf16, device, expected):
    from launcher.trainer import _resolve_precision
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert _resolve_precision(parse_config(shlex.split(f"--mixed-precision auto --device {device}"))) == expected


def test_every_cuda_generator_is_checkpointed_and_restored_on_the_gpus_there_are(monkeypatch, tmp_path):
    """Two GPUs' generator states go through a real checkpoint file; a run resumed on one GPU
    gets the first back (a run on more GPUs than saved keeps its own for the others)."""
    from launcher.checkpoint import RNGState, write_state
    states = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in states])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.extend)
    write_state(tmp_path, "rng_state-0", RNGState().state_dict())
    RNGState().load_state_dict(read_state(tmp_path, "rng_state-0"))
    assert len(restored) == 1 and torch.equal(restored[0], states[0])


def test_nccl_collectives_move_tensors_on_this_process_gpu(monkeypatch):
    from itop_dist import collectives
    monkeypatch.setattr(collectives.dist, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert collectives._comm_device(None) == torch.device("cuda", 3)


def test_itop_eval_takes_the_gpu_when_there_is_one(monkeypatch):
    from launcher.evaluate import resolve_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda") and resolve_device("cpu") == torch.device("cpu")
