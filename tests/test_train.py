"""The training command ``python -m zenith_fused.train``: it trains, logs and writes its outputs."""
from __future__ import annotations

import gzip
import io
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from zenith_fused.train import cli as train
from zenith_fused.train import data
from zenith_fused.optimizer import ZenithFused

CHANCE = 0.1  # ten classes


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``--quick`` run of every default method, in-process; (results.json, stdout, out dir)."""
    out = tmp_path_factory.mktemp("quick")
    capture = _Capture()
    with capture:
        train.main(["--quick", "--out", str(out), "--no-progress"])
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


def test_quick_run_trains_every_method(quick_run):
    results, _, _ = quick_run
    expected = list(train.BASE_METHODS) + train.lr_free_available()[:1]
    assert results["config"]["methods"] == expected
    assert list(results["runs"]) == expected
    for method, per_seed in results["runs"].items():
        (run,) = per_seed
        assert run["final_test_accuracy"] > 0.5, method
        assert run["best_test_accuracy"] >= run["final_test_accuracy"]
        assert 1 <= run["best_epoch"] <= results["config"]["epochs"]
        assert len(run["train_loss"]) == len(run["effective_lr"]) == run["steps"]
        assert 0 < run["optimizer_step_time_s"] < run["wall_time_s"]
    assert results["config"]["epochs"] == train.QUICK_EPOCHS
    assert results["dataset"]["test"] == data.DIGITS_TEST_SIZE


def test_quick_run_gives_every_method_the_same_start_and_batches(quick_run):
    runs = quick_run[0]["runs"]
    # The loss of step 1 is computed before any update: same weights and batch give the same number.
    first_losses = {method: per_seed[0]["train_loss"][0] for method, per_seed in runs.items()}
    assert len(set(first_losses.values())) == 1, first_losses
    # sgd-plateau is sgd until its first reduction, which patience forbids in the first epochs.
    steps = runs["sgd"][0]["steps_per_epoch"] * (train.PLATEAU["patience"] + 1)
    assert runs["sgd"][0]["train_loss"][:steps] == runs["sgd-plateau"][0]["train_loss"][:steps]


def test_quick_run_writes_table_json_and_png(quick_run):
    results, stdout, out = quick_run
    assert "| method | final test acc | best test acc | best epoch |" in stdout
    for method in results["runs"]:
        assert f"| {method} |" in stdout
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text(encoding="utf-8").startswith("| method |")
    assert results["summary"]["zenith"]["final_lr_scale"]["mean"] == results["runs"]["zenith"][0]["final_lr_scale"]


def test_quick_run_logs_zenith_lr_as_lr_times_lr_scale(quick_run):
    results, _, _ = quick_run
    lr = results["config"]["lr"]
    zenith = results["runs"]["zenith"][0]
    assert zenith["effective_lr"] == [lr * s for s in zenith["lr_scale"]]
    assert max(zenith["effective_lr"]) <= lr
    assert zenith["effective_lr"][-1] == lr * zenith["final_lr_scale"]
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
    splits = data.load_dataset("digits")
    cfg = train.TrainConfig(epochs=2, window_size=7)  # a short window: the scale moves every step
    torch.manual_seed(0)
    init = train.SmallConvNet(splits.in_channels, splits.num_classes).state_dict()
    read_back = []

    def record(opt, step):
        assert isinstance(opt, ZenithFused)
        assert step == len(read_back)
        read_back.append(opt.param_groups[0]["lr"] * opt.lr_scale.item())

    result = train.train_run("zenith", splits, cfg, init, seed=0, progress=False, step_callback=record)
    assert result["effective_lr"] == read_back
    assert max(read_back) <= cfg.lr
    assert min(read_back) < 0.9 * cfg.lr


def test_train_runs_without_the_lr_free_extra_and_says_it_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train, "lr_free_available", lambda: [])
    train.main(["--quick", "--epochs", "1", "--out", str(tmp_path), "--no-progress"])
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert list(results["runs"]) == list(train.BASE_METHODS)
    assert "pip install 'zenith-fused[train-extra]'" in results["skipped_methods"]["lr-free"]
    assert "skipped lr-free: neither prodigyopt nor dadaptation is installed" in capsys.readouterr().err


def test_several_seeds_print_mean_and_std(tmp_path, capsys):
    train.main(["--methods", "zenith", "--seeds", "0", "1", "--epochs", "1", "--out", str(tmp_path),
                "--no-progress", "--window-size", "5"])
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    accs = [r["final_test_accuracy"] for r in results["runs"]["zenith"]]
    assert [r["seed"] for r in results["runs"]["zenith"]] == [0, 1]
    assert results["summary"]["zenith"]["final_test_accuracy"]["values"] == accs
    assert results["summary"]["zenith"]["final_test_accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert " ± " in capsys.readouterr().out


def test_module_runs_as_a_script():
    proc = subprocess.run([sys.executable, "-m", "zenith_fused.train", "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--dataset {digits,mnist,cifar10}" in proc.stdout


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
        train.main(["--dataset", dataset, "--data-dir", str(tmp_path / folder), "--methods", "zenith", "sgd",
                    "--quick", "--epochs", "1", "--batch-size", "16", "--threads", "1", "--out", str(out),
                    "--no-progress"])
        results = json.loads((out / "results.json").read_text(encoding="utf-8"))
        assert results["dataset"]["name"] == dataset
        assert all(len(r[0]["train_loss"]) == 4 for r in results["runs"].values())


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
        train.make_optimizer("adam", params, train.TrainConfig(), 10)
    monkeypatch.setattr(train, "lr_free_available", lambda: [])
    with pytest.raises(RuntimeError, match="method 'prodigy' needs prodigyopt"):
        train.make_optimizer("prodigy", params, train.TrainConfig(), 10)


@pytest.mark.parametrize("argv, match", [
    (["--dataset", "mnist"], "--dataset mnist needs --data-dir"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--threads", "0"], "--threads must be at least 1, got 0"),
    (["--backend", "nope", "--device", "cpu"], "--backend nope on cpu: Invalid backend: 'nope'"),
    (["--methods", "prodigy"], "--methods prodigy: not installed"),
])
def test_command_line_messages(argv, match, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(train, "lr_free_available", lambda: [])
    with pytest.raises(SystemExit) as exit_info:
        train.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_message_without_cuda(capsys):
    with pytest.raises(SystemExit):
        train.main(["--device", "cuda"])
    assert "--device cuda: torch.cuda.is_available() is False" in capsys.readouterr().err
