"""MNIST-1D in the training command, and ``--warmup-steps`` with the warmed-up baselines."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch

from zenith_fused.train import loop, main, methods, mnist1d

pytest.importorskip("mnist1d", reason="the [train] extra's mnist1d generates the data")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache folder of this module's own, filled once."""
    folder = tmp_path_factory.mktemp("mnist1d-cache")
    mnist1d.generate(data_dir=folder)
    return folder


# ----------------------------------------------------------------------------------------- data
def test_generation_uses_the_templates_and_never_downloads(monkeypatch, tmp_path):
    import mnist1d.data as package
    import requests

    def refuse(*args, **kwargs):
        raise AssertionError("nothing may be downloaded")

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(package, "get_dataset", refuse)
    arrays = mnist1d.generate(data_dir=tmp_path)
    assert arrays["x"].shape == (4000, 40) and arrays["x_test"].shape == (1000, 40)
    assert sorted(np.unique(arrays["y"])) == list(range(10))
    assert "url" not in mnist1d.generation_args()


def test_generation_is_the_papers_default_dataset(cache):
    from mnist1d.data import get_dataset_args, make_dataset

    saved = np.random.get_state(), random.getstate()
    expected = make_dataset(get_dataset_args())
    np.random.set_state(saved[0])
    random.setstate(saved[1])
    arrays = mnist1d.generate(data_dir=cache)
    for key in ("x", "y", "x_test", "y_test"):
        np.testing.assert_array_equal(arrays[key], expected[key])


def test_generation_leaves_the_global_generators_alone(tmp_path):
    np.random.seed(3)
    random.seed(3)
    mnist1d.generate(data_dir=tmp_path, use_cache=False)  # make_dataset seeds both with 42
    after = (np.random.rand(), random.random())
    np.random.seed(3)
    random.seed(3)
    assert after == (np.random.rand(), random.random())


def test_split_is_fixed_whatever_the_seeds(cache, tmp_path):
    torch.manual_seed(0)
    np.random.seed(0)
    first = mnist1d.load_mnist1d(cache)
    torch.manual_seed(1)
    np.random.seed(1)
    fresh = mnist1d.load_mnist1d(tmp_path, use_cache=False)  # generated again, not read back
    assert first.fingerprint() == fresh.fingerprint()
    assert first.sizes() == {"train": 3600, "val": 400, "test": 1000}
    assert first.x_train.shape == (3600, 1, 40) and first.x_train.dtype == torch.float32
    assert abs(first.x_train.mean().item()) < 1e-4 and first.x_train.std().item() == pytest.approx(1, abs=1e-3)
    # The test split is the generator's own, in its order.
    np.testing.assert_array_equal(first.y_test.numpy(), mnist1d.generate(data_dir=cache)["y_test"])


def test_cache_is_keyed_by_the_settings(cache):
    names = {path.name for path in cache.iterdir()}
    assert names == {mnist1d._cache_name(mnist1d.generation_args())}
    assert mnist1d._cache_name(mnist1d.generation_args(1000)) not in names


def test_model_has_the_papers_cnn_shapes():
    model = mnist1d.Conv1dNet()
    assert sum(p.numel() for p in model.parameters()) == 5210
    assert model.head.in_features == 125  # 25 channels x 5 positions
    assert model(torch.zeros(3, 1, 40)).shape == (3, 10)


# ----------------------------------------------------------------------------- warmup schedules
class _TinyTask:
    """Twenty steps of a linear model, evaluated every 2 steps with a flat validation loss, so the
    plateau rule reduces as soon as its patience allows."""

    name = "tiny"
    metric = "final_test_accuracy"
    higher_is_better = True
    total_steps = 20
    eval_after = tuple(range(2, 21, 2))

    def init_model(self):
        return torch.nn.Linear(4, 3)

    def batches(self, seed):
        order = torch.Generator().manual_seed(seed)
        for _ in range(self.total_steps):
            yield torch.randn(8, 4, generator=order), torch.randint(0, 3, (8,), generator=order)

    def evaluate(self, model):
        return {"val_loss": 1.0}

    def final_evaluation(self, model):
        return {}

    def final_fields(self, evals, final):
        return {}


def _rates(method, warmup, **cfg):
    task = _TinyTask()
    torch.manual_seed(0)
    init = task.init_model().state_dict()
    config = methods.TrainConfig(lr=0.1, warmup_steps=warmup, backend="reference", **cfg)
    group_lrs = []
    result = loop.train_run(method, task, config, init, seed=0,
                            step_callback=lambda opt, step: group_lrs.append(opt.param_groups[0]["lr"]))
    return result["effective_lr"], group_lrs


RAMP = [0.025, 0.05, 0.075, 0.1]  # lr t/K over K = 4 steps


def test_warmup_constant_ramps_then_holds_and_sgd_keeps_its_constant_rate():
    assert _rates(methods.WARMUP_CONSTANT, 4)[0] == pytest.approx(RAMP + [0.1] * 16)
    assert _rates("sgd", 4)[0] == [0.1] * 20  # the constant rate without warmup: the reference


def test_warmed_up_cosine_and_adamw_decay_over_the_steps_after_the_warmup():
    cosine = [0.1 * 0.5 * (1 + math.cos(math.pi * s / 16)) for s in range(16)]
    assert _rates("sgd-cosine", 4)[0] == pytest.approx(RAMP + cosine)
    adamw = _rates("adamw", 4, adamw_lr=1e-3)[0]
    assert adamw == pytest.approx([r / 100 for r in RAMP + cosine])  # K replaces AdamW's 5 %


def test_warmed_up_plateau_rule_counts_only_evaluations_after_the_warmup():
    rates, _ = _rates("sgd-plateau", 4)
    # Counted from the evaluation after step 4 (the best so far), the flat loss is bad at steps
    # 6, 8, 10 and 12: the fourth exceeds patience 3, so steps 13 on run at a tenth.
    assert rates == pytest.approx(RAMP + [0.1] * 8 + [0.01] * 8)
    # Without warmup the same rule counts from step 2: reductions after steps 10 and 18.
    assert _rates("sgd-plateau", 0)[0] == pytest.approx([0.1] * 10 + [0.01] * 8 + [0.001] * 2)


def test_lr_free_methods_warm_up_their_multiplier():
    if "prodigy" not in methods.lr_free_available():
        pytest.skip("prodigyopt is not installed")
    _, group_lrs = _rates("prodigy", 4)
    assert group_lrs == pytest.approx([0.25, 0.5, 0.75] + [1.0] * 17)


def test_zero_warmup_keeps_the_schedules_of_the_committed_runs():
    params = [torch.zeros(2, requires_grad=True)]
    _, cosine = methods.make_optimizer("sgd-cosine", params, methods.TrainConfig(), 100)
    _, plateau = methods.make_optimizer("sgd-plateau", params, methods.TrainConfig(), 100)
    assert type(cosine) is torch.optim.lr_scheduler.CosineAnnealingLR
    assert type(plateau) is torch.optim.lr_scheduler.ReduceLROnPlateau
    # AdamW keeps its 5 % warmup: 1 step of 20.
    factor = methods.warmup_cosine(1, 20)
    assert _rates("adamw", 0, adamw_lr=1e-3)[0] == pytest.approx([1e-3 * factor(s) for s in range(20)])


def test_warmup_constant_needs_warmup_steps():
    with pytest.raises(ValueError, match="method 'warmup\\+constant' needs warmup_steps > 0"):
        methods.make_optimizer(methods.WARMUP_CONSTANT, [torch.zeros(2, requires_grad=True)],
                               methods.TrainConfig(), 10)


def test_zenith_gets_the_same_warmup():
    rates, _ = _rates("zenith", 4)
    # Step K + 1 is the first after the warmup: its norm is the whole history, so the scale is 1.
    assert rates[:5] == pytest.approx(RAMP + [0.1])
    assert max(rates) <= 0.1


# ------------------------------------------------------------------------------- command line
def _command(tmp_path, argv):
    out = tmp_path / "out"
    assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    return json.loads((out / "results.json").read_text(encoding="utf-8")), out


@pytest.fixture(scope="module")
def quick_run(cache, tmp_path_factory):
    """``--dataset mnist1d --quick``: every default method."""
    return _command(tmp_path_factory.mktemp("quick"), ["--dataset", "mnist1d", "--quick", "--data-dir", str(cache)])


def test_quick_run_trains_every_default_method_on_the_generated_data(quick_run, cache):
    results, out = quick_run
    expected = list(methods.BASE_METHODS) + methods.lr_free_available()[:1]
    assert list(results["runs"]) == expected
    described = results["dataset"]
    assert described["name"] == "mnist1d"
    assert (described["train"], described["val"], described["test"]) == (3600, 400, 1000)
    assert described["fingerprint"] == mnist1d.load_mnist1d(cache).fingerprint()
    assert described["generation"]["num_samples"] == 5000 and described["model"]["parameters"] == 5210
    assert results["config"]["epochs"] == 3 and results["config"]["warmup_steps"] == 0
    for method, (run,) in results["runs"].items():
        assert run["steps"] == 3 * 113 and run["final_test_accuracy"] > 0.3, method  # 10 classes: 0.1 by chance
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_split_does_not_follow_the_seeds(quick_run, cache, tmp_path):
    other, _ = _command(tmp_path, ["--dataset", "mnist1d", "--quick", "--epochs", "1", "--methods", "sgd",
                                   "--seeds", "3", "--data-dir", str(cache)])
    assert other["config"]["seeds"] == [3] and quick_run[0]["config"]["seeds"] == [0]
    assert other["dataset"] == quick_run[0]["dataset"]


def test_warmup_steps_reach_zenith_and_the_baselines(cache, tmp_path):
    results, out = _command(tmp_path, ["--dataset", "mnist1d", "--quick", "--epochs", "1", "--warmup-steps", "20",
                                       "--data-dir", str(cache)])
    assert results["config"]["warmup_steps"] == 20
    assert "warmup: K = 20 steps: ZENITH's warmup_steps" in (out / "table.md").read_text(encoding="utf-8")
    runs = {method: per_seed[0] for method, per_seed in results["runs"].items()}
    assert list(runs)[:3] == ["zenith", "sgd", methods.WARMUP_CONSTANT]
    ramp = [0.1 * t / 20 for t in range(1, 21)]
    for method in ("zenith", methods.WARMUP_CONSTANT, "sgd-cosine", "sgd-plateau"):
        assert runs[method]["effective_lr"][:20] == pytest.approx(ramp), method
    assert runs[methods.WARMUP_CONSTANT]["effective_lr"][20:] == [0.1] * (113 - 20)
    assert runs["sgd"]["effective_lr"] == [0.1] * 113
    assert runs["zenith"]["lr_scale"][:20] == pytest.approx([t / 20 for t in range(1, 21)])


@pytest.mark.parametrize("argv, match", [
    (["--warmup-steps", "-1"], "argument --warmup-steps: expected an integer >= 0, got '-1'"),
    (["--warmup-steps", "1.5"], "argument --warmup-steps: expected an integer >= 0, got '1.5'"),
    (["--warmup-steps", "ten"], "argument --warmup-steps: expected an integer >= 0, got 'ten'"),
    (["--methods", "zenith", methods.WARMUP_CONSTANT], "--methods warmup+constant needs --warmup-steps K > 0"),
    (["--dataset", "mnist1d", "--steps", "3"], "--steps is for stdlib-text; --dataset mnist1d runs --epochs"),
])
def test_command_line_messages(argv, match, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
