"""The training command ``python -m zenith_fused.train``: every mode trains, logs and writes its outputs."""
from __future__ import annotations

import argparse
import gzip
import io
import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from zenith_fused import ZenithFused
from zenith_fused.train import cli, data, loop, main, methods, text
from zenith_fused.train.images import ImageTask

PNG = b"\x89PNG\r\n\x1a\n"
DIGITS_QUICK = cli.MODES[("image", None)]
TEXT_QUICK = cli.MODES[("text", None)]


def _run(tmp_path_factory, name, argv):
    """One in-process run of the command; (results.json, stdout, out dir)."""
    out = tmp_path_factory.mktemp(name)
    capture = _Capture()
    with capture:
        assert main([*argv, "--out", str(out), "--no-progress"]) == 0
    with open(out / "results.json", encoding="utf-8") as f:
        return json.load(f), capture.stdout, out


class _Capture:
    """Module-scoped fixtures cannot use capsys; swap sys.stdout by hand."""

    def __enter__(self):
        self._saved, sys.stdout = sys.stdout, io.StringIO()
        return self

    def __exit__(self, *exc):
        self.stdout = sys.stdout.getvalue()
        sys.stdout = self._saved


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``--quick``: every default method on digits."""
    return _run(tmp_path_factory, "quick", ["--quick"])


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """``--dataset stdlib-text --quick``: the transformer on this interpreter's standard library."""
    return _run(tmp_path_factory, "text", ["--dataset", "stdlib-text", "--quick"])


@pytest.fixture(scope="module")
def lr_sweep(tmp_path_factory):
    return _run(tmp_path_factory, "lr-sweep", ["--quick", "--lr-sweep", "0.01", "0.1", "1.0"])


@pytest.fixture(scope="module")
def window_sweep(tmp_path_factory):
    # Seed 1, where the other digits runs use seed 0: the data split must not follow it.
    return _run(tmp_path_factory, "window-sweep", ["--quick", "--window-sweep", "10", "100", "--seeds", "1"])


def _assert_outputs(out, stdout, picture):
    assert (out / picture).read_bytes()[:8] == PNG
    table = (out / "table.md").read_text(encoding="utf-8")
    assert table.startswith("| ")
    assert table.strip() in stdout  # the printed table is the saved one, caption included
    assert "wall time" in table or "took" in table


# ------------------------------------------------------------------------------------ digits
def test_quick_run_trains_every_method(quick_run):
    results, _, _ = quick_run
    expected = list(methods.BASE_METHODS) + methods.lr_free_available()[:1]
    assert results["config"]["methods"] == expected
    assert list(results["runs"]) == expected
    for method, per_seed in results["runs"].items():
        (run,) = per_seed
        assert run["final_test_accuracy"] > 0.5, method
        assert run["best_test_accuracy"] >= run["final_test_accuracy"]
        assert 1 <= run["best_epoch"] <= results["config"]["epochs"]
        assert len(run["train_loss"]) == len(run["effective_lr"]) == run["steps"]
        assert run["evals"]["step"] == [run["steps_per_epoch"] * e for e in range(DIGITS_QUICK.quick_length + 1)]
        assert 0 < run["optimizer_step_time_s"] < run["wall_time_s"]
    assert results["config"]["epochs"] == DIGITS_QUICK.quick_length
    assert results["dataset"]["test"] == data.DIGITS_TEST_SIZE


def test_quick_run_gives_every_method_the_same_start_and_batches(quick_run):
    runs = quick_run[0]["runs"]
    # The loss of step 1 is computed before any update: same weights and batch give the same number.
    first_losses = {method: per_seed[0]["train_loss"][0] for method, per_seed in runs.items()}
    assert len(set(first_losses.values())) == 1, first_losses
    # sgd-plateau is sgd until its first reduction, which patience forbids in the first epochs.
    steps = runs["sgd"][0]["steps_per_epoch"] * (methods.PLATEAU["patience"] + 1)
    assert runs["sgd"][0]["train_loss"][:steps] == runs["sgd-plateau"][0]["train_loss"][:steps]


def test_quick_run_writes_table_json_and_png(quick_run):
    results, stdout, out = quick_run
    _assert_outputs(out, stdout, "curves.png")
    assert "| method | final test acc | best test acc | best epoch |" in stdout
    assert "One seed (0): no spread." in stdout
    for method in results["runs"]:
        assert f"| {method} |" in stdout
    assert results["summary"]["zenith"]["final_lr_scale"]["mean"] == results["runs"]["zenith"][0]["final_lr_scale"]


def test_quick_run_logs_zenith_lr_as_lr_times_lr_scale(quick_run):
    results, _, _ = quick_run
    lr = results["config"]["lr"]
    zenith = results["runs"]["zenith"][0]
    assert zenith["effective_lr"] == [lr * s for s in zenith["lr_scale"]]
    assert max(zenith["effective_lr"]) <= lr
    assert zenith["effective_lr"][-1] == zenith["final_lr"] == lr * zenith["final_lr_scale"]
    assert zenith["final_lr_scale"] < 1  # the gradient norm fell, so ZENITH lowered the rate
    assert results["runs"]["sgd"][0]["effective_lr"] == [lr] * zenith["steps"]
    cosine = results["runs"]["sgd-cosine"][0]["effective_lr"]
    assert cosine[0] == lr and cosine[-1] < 0.01 * lr


@pytest.fixture
def one_thread():
    # What the command does for digits: these 8x8 images are too small to share between threads.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_zenith_logged_lr_equals_optimizer_lr_scale_every_step(one_thread):
    cfg = methods.TrainConfig(window_size=7)  # a short window: the scale moves every step
    task = ImageTask(data.load_dataset("digits"), epochs=2, batch_size=32, device="cpu")
    torch.manual_seed(0)
    init = task.init_model().state_dict()
    read_back = []

    def record(opt, step):
        assert isinstance(opt, ZenithFused)
        assert step == len(read_back)
        read_back.append(opt.param_groups[0]["lr"] * opt.lr_scale.item())

    result = loop.train_run("zenith", task, cfg, init, seed=0, step_callback=record)
    assert result["effective_lr"] == read_back
    assert max(read_back) <= cfg.lr
    assert min(read_back) < 0.9 * cfg.lr


def _no_lr_free(monkeypatch):
    monkeypatch.setattr(methods, "lr_free_available", lambda: [])
    monkeypatch.setattr(cli, "lr_free_available", lambda: [])


def test_train_runs_without_the_lr_free_extra_and_says_it_skipped(tmp_path, monkeypatch, capsys):
    _no_lr_free(monkeypatch)
    main(["--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert list(results["runs"]) == list(methods.BASE_METHODS)
    assert "(pip install prodigyopt)" in results["skipped_methods"]["lr-free"]
    assert "skipped lr-free: neither prodigyopt nor dadaptation is installed" in capsys.readouterr().err


def test_several_seeds_print_mean_and_std_and_one_progress_bar_over_all_runs(tmp_path, capsys):
    main(["--methods", "zenith", "sgd", "--seeds", "0", "1", "--epochs", "1", "--out", str(tmp_path),
          "--window-size", "5"])
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    accs = [r["final_test_accuracy"] for r in results["runs"]["zenith"]]
    assert [r["seed"] for r in results["runs"]["zenith"]] == [0, 1]
    assert results["summary"]["zenith"]["final_test_accuracy"]["values"] == accs
    assert results["summary"]["zenith"]["final_test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    captured = capsys.readouterr()
    assert " ± " in captured.out
    assert "mean ± sample standard deviation over 2 seeds (0, 1)" in captured.out
    # One bar counts the steps of all four runs and names the run it is in.
    steps = 4 * results["runs"]["zenith"][0]["steps"]
    assert "run 4/4: sgd seed 1" in captured.err
    assert f"{steps}/{steps}" in captured.err


def test_module_runs_as_a_script():
    proc = subprocess.run([sys.executable, "-m", "zenith_fused.train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--dataset {digits,mnist,cifar10,stdlib-text,mnist1d}" in proc.stdout
    assert "--lr-sweep LR [LR ...]" in proc.stdout and "--window-sweep W [W ...]" in proc.stdout


def test_the_optimizer_package_imports_nothing_of_the_training_command():
    code = ("import sys, zenith_fused, zenith_fused.optimizer, zenith_fused.reference; "
            "print(sorted(m for m in sys.modules if m.startswith('zenith_fused.train')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_command_without_the_train_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(["--quick"]) == 2
    assert ("zenith-train needs matplotlib, which the [train] extra installs: pip install matplotlib (from a clone "
            "of the repository: pip install -e '.[train]')") in capsys.readouterr().err


# --------------------------------------------------------------------------------------- sweeps
def test_lr_sweep_runs_each_method_at_each_lr(lr_sweep):
    results, stdout, out = lr_sweep
    _assert_outputs(out, stdout, "lr_sweep.png")
    grid = [0.01, 0.1, 1.0]
    sweep = results["sweep"]
    assert sweep["parameter"] == "lr" and sweep["values"] == grid
    assert list(sweep["methods"]) == ["zenith", "sgd", "sgd-cosine"]
    for method, entry in sweep["methods"].items():
        assert entry["depends"]
        assert [p["value"] for p in entry["points"]] == grid
        assert [r["lr"] for r in results["runs"][method]] == grid
        for point in entry["points"]:
            assert 0 <= point["final_test_accuracy"]["mean"] <= 1
    zenith_lrs = [p["final_lr"]["mean"] for p in sweep["methods"]["zenith"]["points"]]
    assert all(lr < eta0 for lr, eta0 in zip(zenith_lrs, grid))  # ZENITH lowered every η0
    assert [p["final_lr"]["mean"] for p in sweep["methods"]["sgd"]["points"]] == grid
    assert "| η0 | zenith | sgd | sgd-cosine | ZENITH final lr |" in stdout
    assert "| 0.01 |" in stdout and "| 1 |" in stdout


def test_window_sweep_runs_zenith_at_each_window_and_the_rest_once(window_sweep):
    results, stdout, out = window_sweep
    _assert_outputs(out, stdout, "window_sweep.png")
    sweep = results["sweep"]
    assert sweep["parameter"] == "window_size" and sweep["values"] == [10, 100]
    assert [r["window_size"] for r in results["runs"]["zenith"]] == [10, 100]
    assert [p["final_lr"]["mean"] for p in sweep["methods"]["zenith"]["points"]][0] != \
        [p["final_lr"]["mean"] for p in sweep["methods"]["zenith"]["points"]][1]
    for method in ("sgd", "sgd-cosine"):
        assert not sweep["methods"][method]["depends"]
        assert len(results["runs"][method]) == 1 and results["runs"][method][0]["seed"] == 1
        assert sweep["methods"][method]["reference"]["seeds"] == 1
    assert "| W | zenith | sgd (one run, any W) | sgd-cosine (one run, any W) | ZENITH final lr |" in stdout


def test_digits_split_does_not_depend_on_the_seed(quick_run, window_sweep):
    assert quick_run[0]["config"]["seeds"] == [0] and window_sweep[0]["config"]["seeds"] == [1]
    assert quick_run[0]["dataset"] == window_sweep[0]["dataset"]
    torch.manual_seed(7)
    np.random.seed(7)
    assert data.load_dataset("digits", max_train=4096, max_test=1024).fingerprint() == \
        quick_run[0]["dataset"]["fingerprint"]


# ---------------------------------------------------------------------------------- stdlib-text
def test_text_quick_run_trains_every_method(text_run):
    results, stdout, out = text_run
    _assert_outputs(out, stdout, "curves.png")
    assert list(results["runs"]) == ["zenith", "sgd", "sgd-cosine", "adamw"]
    assert results["config"]["steps"] == TEXT_QUICK.quick_length and "epochs" not in results["config"]
    for method, (run,) in results["runs"].items():
        bpb = run["evals"]["val_bpb"]
        assert bpb[0] == pytest.approx(8, abs=0.5), method  # an untrained model: about uniform over bytes
        assert math.isfinite(run["final_test_bpb"]) and run["final_val_bpb"] < bpb[0] - 1, method
        assert run["final_val_bpb"] == bpb[-1] and run["best_val_bpb"] == min(bpb[1:])
        assert run["evals"]["step"][-1] == run["steps"] == len(run["train_loss"])
    assert "| method | test bpb | val bpb |" in stdout
    assert "bpb: bits per byte" in stdout


def test_text_adamw_warms_up_then_decays(text_run):
    results = text_run[0]
    lr = results["config"]["adamw_lr"]
    (adamw,) = results["runs"]["adamw"]
    rates = adamw["effective_lr"]
    warmup = max(1, round(methods.ADAMW_WARMUP_FRACTION * len(rates)))
    assert rates[0] == pytest.approx(lr / warmup)
    assert max(rates) == pytest.approx(lr) and rates.index(max(rates)) == warmup - 1
    assert rates[-1] < 0.05 * lr


def test_text_split_is_by_file_and_does_not_depend_on_the_seed(text_run, tmp_path):
    described = text_run[0]["dataset"]
    assert described["train_bytes"] > 5 * described["test_bytes"] > 0 and described["val_bytes"] > 0
    torch.manual_seed(123)
    corpus = text.load_text_corpus()
    assert corpus.fingerprint() == described["fingerprint"]

    # A small tree: every file lands whole in the split its relative path hashes to, wherever the
    # tree lies, and excluded folders are left out.
    files = {f"pkg{i}/mod{j}.py": f"# {i} {j}\n".encode() * (i + j + 1) for i in range(4) for j in range(10)}
    files["site-packages/other.py"] = b"not the standard library\n"
    files["test/test_x.py"] = b"a test\n"
    for root in (tmp_path / "a", tmp_path / "b" / "c"):
        for rel, body in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(body)
    first, second = text.load_text_corpus(tmp_path / "a"), text.load_text_corpus(tmp_path / "b" / "c")
    assert first.fingerprint() == second.fingerprint()
    kept = sorted(rel for rel in files if rel.startswith("pkg"))
    assert text.source_files(tmp_path / "a") == kept
    for split in text.SPLITS:
        expected = b"".join(files[rel] for rel in kept if text.split_of(rel) == split)
        assert bytes(getattr(first, split).numpy()) == expected
    assert {text.split_of(rel) for rel in kept} == set(text.SPLITS)


def test_text_model_is_causal():
    torch.manual_seed(0)
    model = text.TinyTransformer(d_model=32, n_layers=2, n_heads=4, context=16).eval()
    x = torch.randint(0, 256, (2, 16))
    changed = x.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(x)[:, :10], model(changed)[:, :10])
        assert not torch.allclose(model(x)[:, 10:], model(changed)[:, 10:])


# ------------------------------------------------------------------------------ offline readers
def _write_idx(path, array, *, compress=False):
    codes = {np.dtype(np.uint8): 0x08}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(header + array.tobytes())


def _fake_mnist(folder, n_train=60, n_test=20, *, compress=False):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for key, name in data.MNIST_FILES.items():
        _write_idx(folder / (name + (".gz" if compress else "")), arrays[key], compress=compress)
    return arrays


@pytest.mark.parametrize("compress, subdir", [(False, "."), (True, "MNIST/raw")])
def test_mnist_reader_reads_idx_files(tmp_path, compress, subdir):
    arrays = _fake_mnist(tmp_path / subdir, compress=compress)
    name = data.MNIST_FILES["train_images"] + (".gz" if compress else "")
    np.testing.assert_array_equal(data.read_idx(tmp_path / subdir / name), arrays["train_images"])

    splits = data.load_dataset("mnist", tmp_path)
    assert splits.sizes() == {"train": 54, "val": 6, "test": 20}
    assert splits.x_train.shape[1:] == (1, 28, 28) and splits.x_train.dtype == torch.float32
    assert abs(splits.x_train.mean().item()) < 1e-4 and splits.x_train.std().item() == pytest.approx(1, abs=1e-3)
    held = torch.cat([splits.y_train, splits.y_val]).sort().values
    np.testing.assert_array_equal(held.numpy(), np.sort(arrays["train_labels"]))
    # The test split is the file's, in the file's order.
    np.testing.assert_array_equal(splits.y_test.numpy(), arrays["test_labels"])


def _fake_cifar10(folder, per_batch=12):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in (*data.CIFAR10_TRAIN_BATCHES, data.CIFAR10_TEST_BATCH):
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
                 b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 b"filenames": [b"img%d.png" % i for i in range(per_batch)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
        batches[name] = batch
    return batches


def test_cifar10_reader_reads_python_batches(tmp_path):
    batches = _fake_cifar10(tmp_path / "cifar-10-batches-py")
    images, labels = data.read_cifar10_batch(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    np.testing.assert_array_equal(images.reshape(len(images), -1), batches["data_batch_3"][b"data"])
    assert images.shape == (12, 3, 32, 32) and labels.tolist() == batches["data_batch_3"][b"labels"]

    splits = data.load_dataset("cifar10", tmp_path)
    assert splits.sizes() == {"train": 54, "val": 6, "test": 12}
    assert splits.in_channels == 3
    assert splits.y_test.tolist() == batches["test_batch"][b"labels"]


def test_train_command_runs_on_mnist_and_cifar10_files(tmp_path):
    _fake_mnist(tmp_path / "mnist")
    _fake_cifar10(tmp_path / "cifar")
    for dataset, folder in (("mnist", "mnist"), ("cifar10", "cifar")):
        out = tmp_path / f"out-{dataset}"
        main(["--dataset", dataset, "--data-dir", str(tmp_path / folder), "--methods", "zenith", "sgd",
                    "--quick", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(out),
                    "--no-progress"])
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        assert results["dataset"]["name"] == dataset
        assert all(len(r[0]["train_loss"]) == 4 for r in results["runs"].values())
        assert results["dataset"]["fingerprint"] == data.load_dataset(dataset, tmp_path / folder,
                                                                      max_train=4096, max_test=1024).fingerprint()


class _Planted:
    def __reduce__(self):
        import os

        return (os.getcwd, ())


def test_cifar10_reader_refuses_pickles_that_are_not_data(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({b"data": _Planted(), b"labels": []}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="which a data batch never needs"):
        data.read_cifar10_batch(path)


# ------------------------------------------------------------------------------------ messages
@pytest.mark.parametrize("write, match", [
    (lambda p: p.write_bytes(pickle.dumps([1, 2], protocol=2)), "is not a CIFAR-10 batch \\(a list"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)),
     "is not a CIFAR-10 batch: keys"),
    (lambda p: p.write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})),
     "are not CIFAR-10's layout"),
])
def test_cifar10_reader_messages(tmp_path, write, match):
    path = tmp_path / "batch"
    write(path)
    with pytest.raises(ValueError, match=match):
        data.read_cifar10_batch(path)


def test_idx_reader_messages(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x02\x08\x01" + b"\x00" * 8)
    with pytest.raises(ValueError, match="is not an idx file"):
        data.read_idx(bad)
    bad.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(ValueError, match="unknown idx element type 0x07"):
        data.read_idx(bad)
    bad.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05\x00")
    with pytest.raises(ValueError, match=r"header says shape \(5,\), 13 bytes, file has 9"):
        data.read_idx(bad)


def test_dataset_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte not found"):
        data.load_dataset("mnist", tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1 not found"):
        data.load_dataset("cifar10", tmp_path)
    with pytest.raises(ValueError, match="pass --data-dir PATH"):
        data.load_dataset("mnist")
    with pytest.raises(ValueError, match="Unknown dataset: 'svhn'"):
        data.load_dataset("svhn")
    arrays = _fake_mnist(tmp_path / "short")
    _write_idx(tmp_path / "short" / data.MNIST_FILES["test_labels"], arrays["test_labels"][:-1])
    with pytest.raises(ValueError, match="MNIST test files disagree"):
        data.load_dataset("mnist", tmp_path / "short")
    _write_idx(tmp_path / "short" / data.MNIST_FILES["test_labels"], arrays["test_labels"] + 5)
    with pytest.raises(ValueError, match=r"mnist test labels span \[5, 14\], expected 0..9"):
        data.load_dataset("mnist", tmp_path / "short")


def test_optimizer_messages(monkeypatch):
    params = [torch.zeros(2, requires_grad=True)]
    with pytest.raises(ValueError, match="Unknown method: 'adam'"):
        methods.make_optimizer("adam", params, methods.TrainConfig(), 10)
    _no_lr_free(monkeypatch)
    with pytest.raises(RuntimeError, match="method 'prodigy' needs prodigyopt"):
        methods.make_optimizer("prodigy", params, methods.TrainConfig(), 10)


def test_text_corpus_messages(tmp_path):
    with pytest.raises(FileNotFoundError, match="text corpus folder .*nowhere does not exist"):
        text.load_text_corpus(tmp_path / "nowhere")
    (tmp_path / "one.py").write_bytes(b"x = 1\n")
    with pytest.raises(ValueError, match=r"each split needs at least 130 bytes, got train \d+, val \d+, test \d+"):
        text.load_text_corpus(tmp_path, min_bytes=130)
    with pytest.raises(ValueError, match="d_model 30 is not a multiple of n_heads 4"):
        text.TinyTransformer(d_model=30)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "mnist"], "--dataset mnist needs --data-dir"),
    (["--epochs", "0"], "argument --epochs: expected an integer >= 1, got '0'"),
    (["--batch-size", "0"], "argument --batch-size: expected an integer >= 1, got '0'"),
    (["--threads", "0"], "argument --threads: expected an integer >= 1, got '0'"),
    (["--lr", "-1"], "argument --lr: expected a finite number > 0, got '-1'"),
    (["--lr", "0"], "argument --lr: expected a finite number > 0, got '0'"),
    (["--lr", "nan"], "argument --lr: expected a finite number > 0, got 'nan'"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    (["--lr", "fast"], "argument --lr: expected a finite number > 0, got 'fast'"),
    (["--adamw-lr", "0"], "argument --adamw-lr: expected a finite number > 0, got '0'"),
    (["--window-size", "0"], "argument --window-size: expected an integer >= 1, got '0'"),
    (["--window-size", "1.5"], "argument --window-size: expected an integer >= 1, got '1.5'"),
    (["--weight-decay", "-0.5"], "argument --weight-decay: expected a finite number >= 0, got '-0.5'"),
    (["--weight-decay=-1e-4"], "argument --weight-decay: expected a finite number >= 0, got '-1e-4'"),
    (["--warmup-steps", "-1"], "argument --warmup-steps: expected an integer >= 0, got '-1'"),
    (["--warmup-steps", "1.5"], "argument --warmup-steps: expected an integer >= 0, got '1.5'"),
    (["--backend", "nope", "--device", "cpu"], "--backend nope on cpu: Invalid backend: 'nope'"),
    (["--methods", "prodigy"], "--methods prodigy: not installed"),
    (["--dataset", "stdlib-text", "--epochs", "3"], "stdlib-text runs --steps"),
    (["--steps", "3"], "--steps is for stdlib-text; --dataset digits runs --epochs"),
    (["--dataset", "stdlib-text", "--steps", "0"], "argument --steps: expected an integer >= 1, got '0'"),
    (["--lr-sweep", "0.1", "0"], "argument --lr-sweep: expected a finite number > 0, got '0'"),
    (["--window-sweep", "-5"], "argument --window-sweep: expected an integer >= 1, got '-5'"),
    (["--lr-sweep", "0.1", "--window-sweep", "10"], "argument --window-sweep: not allowed with argument --lr-sweep"),
    (["--dataset", "stdlib-text", "--data-dir", "/nonexistent-zenith"],
     "--dataset stdlib-text: text corpus folder /nonexistent-zenith does not exist"),
])
def test_command_line_messages(argv, match, monkeypatch, capsys, tmp_path):
    _no_lr_free(monkeypatch)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv", [["--lr", "-1"], ["--window-size", "0"]])
def test_invalid_optimizer_argument_is_one_line_and_status_2(argv, tmp_path):
    # As a user runs it: a new process, the default output folder under the working directory.
    proc = subprocess.run([sys.executable, "-m", "zenith_fused.train", *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith(f"python -m zenith_fused.train: error: argument {argv[0]}: ")
    assert list(tmp_path.iterdir()) == []  # no runs/ folder


@pytest.mark.parametrize("value", ["1", "0.5", "1e-3"])
def test_positive_float_accepts_numbers_above_zero(value):
    assert cli.positive_float(value) == float(value)


def test_integer_types_bounds():
    assert cli.positive_int("1") == 1 and cli.non_negative_int("0") == 0 and cli.non_negative_float("0") == 0.0
    for convert, text in ((cli.positive_int, "0"), (cli.non_negative_int, "-1"), (cli.non_negative_int, "2.0"),
                          (cli.non_negative_float, "-inf")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"got '{text}'"):
            convert(text)


class _Stop(Exception):
    pass


@pytest.mark.parametrize("argv", [
    [], ["--dataset", "stdlib-text"], ["--lr-sweep", "0.1", "1"], ["--window-sweep", "10", "100"],
    ["--dataset", "stdlib-text", "--window-sweep", "10"],
])
def test_every_mode_trains_on_one_cpu_thread_and_a_failed_run_leaves_no_folder(argv, monkeypatch, tmp_path):
    seen = []

    def failing_run_all(task, specs, **kwargs):
        seen.append(torch.get_num_threads())
        raise _Stop

    monkeypatch.setattr(cli, "run_all", failing_run_all)
    before = torch.get_num_threads()
    out = tmp_path / "runs" / "out"
    with pytest.raises(_Stop):
        main([*argv, "--quick", "--device", "cpu", "--out", str(out)])
    assert seen == [1]
    assert torch.get_num_threads() == before
    assert not (tmp_path / "runs").exists()


def test_threads_option_overrides_the_default(monkeypatch, tmp_path):
    seen = []
    monkeypatch.setattr(cli, "run_all", lambda *a, **k: seen.append(torch.get_num_threads()) or [][0])
    with pytest.raises(IndexError):
        main(["--quick", "--device", "cpu", "--threads", "2", "--out", str(tmp_path / "out")])
    assert seen == [2]


def test_a_run_that_fails_while_writing_removes_the_folders_it_made(monkeypatch, tmp_path):
    def failing_write(results, table, out, plot):
        (out / "results.json").write_text("{}")
        raise _Stop

    monkeypatch.setattr("zenith_fused.train.report.write_outputs", failing_write)
    with pytest.raises(_Stop):
        main(["--quick", "--epochs", "1", "--methods", "sgd", "--no-progress", "--out", str(tmp_path / "a" / "b")])
    assert list(tmp_path.iterdir()) == []
    kept = tmp_path / "kept"
    kept.mkdir()
    with pytest.raises(_Stop):
        main(["--quick", "--epochs", "1", "--methods", "sgd", "--no-progress", "--out", str(kept)])
    assert kept.is_dir()  # a folder that was there before is left alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_message_without_cuda(capsys):
    with pytest.raises(SystemExit):
        main(["--device", "cuda"])
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ pictures
_RESULTS = __import__("pathlib").Path(__file__).resolve().parents[1] / "bench" / "results"


def test_every_method_has_its_own_style_whatever_the_others():
    from zenith_fused.train import report

    styles = report._styles(list(methods.METHODS))
    assert len({(repr(s["linestyle"]), s["marker"]) for s in styles.values()}) == len(methods.METHODS)
    assert len({s["color"] for s in styles.values()}) == len(methods.METHODS)
    assert report._styles(["sgd-plateau", "sgd"])["sgd"] == styles["sgd"]
    assert list(report._styles(["sgd-plateau", "zenith"])) == ["zenith", "sgd-plateau"]  # fixed drawing order


def test_curves_figure_labels_its_axes_draws_seed_bands_and_keeps_the_legend_outside():
    from matplotlib.collections import PolyCollection

    from zenith_fused.train import report

    results = report.load_results(_RESULTS / "train-digits-cpu-2026-11-29.json")  # 5 seeds, the old layout
    fig = report.curves_figure(results)
    try:
        assert len(fig.axes) == 3
        for ax in fig.axes:
            assert ax.get_ylabel() and ax.get_xlabel() == "optimizer step"
            assert ax.get_legend() is None
            assert sum(isinstance(c, PolyCollection) for c in ax.collections) == len(results["runs"])
        assert len(fig.legends) == 1
        assert "band: min to max over the seeds" in fig._suptitle.get_text()
        # sgd and sgd-plateau coincide for the first epochs: their lines differ in dashes and markers.
        lines = {line.get_label(): line for line in fig.axes[2].get_lines()}
        sgd, plateau = lines["sgd"], lines["sgd-plateau"]
        assert sgd.get_marker() != plateau.get_marker() and sgd.get_color() != plateau.get_color()
        styles = report._styles(["sgd", "sgd-plateau"])
        assert styles["sgd"]["linestyle"] != styles["sgd-plateau"]["linestyle"]
    finally:
        __import__("matplotlib.pyplot").pyplot.close(fig)


@pytest.mark.parametrize("name", ["train-lr-sweep-digits-cpu-2026-12-03.json",
                                  "train-window-sweep-stdlib-text-cpu-2026-12-03.json"])
def test_sweep_figure_puts_metric_and_rate_on_separate_panels(name):
    from zenith_fused.train import report

    fig = report.sweep_figure(report.load_results(_RESULTS / name))
    try:
        assert len(fig.axes) == 2  # no twin axis
        metric, rate = fig.axes
        assert "final test" in metric.get_ylabel() and "learning rate" in rate.get_ylabel()
        assert rate.get_yscale() == "log" and metric.get_legend() is None and len(fig.legends) == 1
    finally:
        __import__("matplotlib.pyplot").pyplot.close(fig)


def test_report_module_redraws_a_saved_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "zenith_fused.train.report",
                           str(_RESULTS / "train-window-sweep-digits-cpu-2026-12-03.json"), str(tmp_path / "w.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "w.png").read_bytes()[:8] == PNG
    assert "| W | zenith | sgd (one run, any W) | sgd-cosine (one run, any W) | ZENITH final lr |" in proc.stdout


def test_sweep_figure_writes_a_diverged_bits_per_byte_at_the_top_instead_of_rescaling():
    from zenith_fused.train import report

    results = report.load_results(_RESULTS / "train-window-sweep-stdlib-text-cpu-2026-12-03.json")
    results["sweep"]["methods"]["zenith"]["points"][0]["final_test_bpb"]["mean"] = 6370.0
    fig = report.sweep_figure(results)
    try:
        metric = fig.axes[0]
        assert metric.get_ylim()[1] == report.BPB_CEILING and metric.get_ylim()[0] > 0
        assert [t.get_text() for t in metric.texts] == ["zenith ↑ 6.37e+03"]
    finally:
        __import__("matplotlib.pyplot").pyplot.close(fig)
