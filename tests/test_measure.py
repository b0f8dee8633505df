"""Measurement on CPU, asserted on deterministic counters (bytes, FLOPs) and on a fake clock, never
on real time. The tracker against the allocator is in test_memory_reference.py."""
import types

import pytest
import torch

from bench.config.train_config import build_train_config
from bench.parts import clock as clock_module
from bench.training import measure
from bench.training import train as train_module
from bench.training.measure import RunRecorder, datasheet_key
from bench.training.train import flop_step, memory_step, prepare_run, train

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def measured_run(batch_size=128, image_size=32, **tricks):
    """Memory and FLOPs of tiny_cnn (activations dominate it), each from a step of its own."""
    config = build_train_config({"model": "tiny_cnn", "dataset": "synthetic", "num_samples": batch_size,
                                 "image_size": image_size, "batch_size": batch_size, "steps": 10, **tricks}, "test")
    run = prepare_run(config, seed=0, device=CPU)
    batch = tuple(t.clone() for t in run.splits.train.tensors)  # as collated: tensors of their own
    run.step(batch)  # momentum buffers exist from here on
    _, memory = memory_step(run, batch)
    _, flops = flop_step(run, batch)
    return memory, flops, run


@pytest.fixture(scope="module")
def baseline():
    return measured_run()


def test_parameter_and_momentum_bytes_are_numel_times_element_size(baseline):
    memory, _, run = baseline
    expected = sum(p.numel() * p.element_size() for p in run.model.parameters())
    assert memory["memory_breakdown"]["parameters"] == expected
    assert memory["memory_breakdown"]["optimizer_state"] == expected  # SGD momentum: one buffer each
    assert sum(memory["memory_breakdown"].values()) == memory["peak_memory_bytes"]


def test_activations_are_counted(baseline):
    memory, _, _ = baseline
    # tiny_cnn keeps its 16-channel 32x32 maps for backward: 0.5 MiB per conv/BN/ReLU per 8 samples.
    assert memory["memory_breakdown"]["activations"] > 32 * 2**20


def test_checkpointing_lowers_the_peak_and_counts_the_recomputed_forward(baseline):
    memory, flops, _ = measured_run(checkpointing=True)
    assert memory["memory_breakdown"]["activations"] <= 0.7 * baseline[0]["memory_breakdown"]["activations"]
    assert memory["peak_memory_bytes"] < baseline[0]["peak_memory_bytes"]
    assert flops > baseline[1]


def test_bf16_lowers_activation_bytes(baseline):
    memory, _, _ = measured_run(precision="bf16")
    assert memory["memory_breakdown"]["activations"] < 0.9 * baseline[0]["memory_breakdown"]["activations"]


def test_accumulation_lowers_activations_and_keeps_the_flops(baseline):
    memory, flops, _ = measured_run(accumulation=4)
    assert memory["memory_breakdown"]["activations"] < 0.5 * baseline[0]["memory_breakdown"]["activations"]
    assert flops == pytest.approx(baseline[1], rel=0.01)


def test_sam_counts_twice_the_flops(baseline):
    _, flops, _ = measured_run(sam=0.05)
    assert flops == pytest.approx(2 * baseline[1], rel=0.01)


# ---- the recorder ----
class FakeTime:
    """A perf_counter that moves only when told to (plus a nanosecond per reading)."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        self.now += 1e-9
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def fake_time(monkeypatch):
    clock = FakeTime()
    fake = types.SimpleNamespace(perf_counter=clock.perf_counter)
    monkeypatch.setattr(measure, "time", fake)
    monkeypatch.setattr(clock_module, "time", fake)  # the step clock lives in bench.parts.clock
    return clock


def test_the_last_curve_point_is_its_own_epoch_only():
    """4 steps per epoch, 6 steps: the last point is the mean of the 2 steps of the partial epoch
    (taking the last 4 losses, as before, mixed in 2 of the first epoch)."""
    recorder = RunRecorder(CPU)
    recorder.start_training()
    for loss in (1.0, 1.0, 1.0, 1.0):
        recorder.add_loss(torch.tensor(loss))
    recorder.end_epoch(0, evaluate=None)
    for loss in (5.0, 7.0):
        recorder.add_loss(torch.tensor(loss))
    recorder.end_epoch(1, evaluate=None)
    assert [p["train_loss"] for p in recorder.curve] == [1.0, 6.0]
    assert [p["step"] for p in recorder.curve] == [4, 6]


def test_training_clock_counts_training_steps_only(fake_time):
    recorder = RunRecorder(CPU)
    fake_time.advance(1000)  # building the dataset and model: before the first step
    recorder.start_training()
    with recorder.warmup_step():
        fake_time.advance(1)
    with recorder.untimed():  # the memory step
        fake_time.advance(100)
    for _ in range(2):
        with recorder.fetching(timed=True):
            fake_time.advance(0.5)  # waiting for data is training time
        with recorder.timed_step():
            fake_time.advance(1)
        recorder.add_loss(torch.tensor(1.0))
    recorder.end_epoch(0, evaluate=lambda: fake_time.advance(10_000) or {"accuracy_top1": 1.0})
    assert recorder.curve[0]["train_time_s"] == pytest.approx(1 + 2 * 1.5, abs=1e-6)
    assert recorder.time_to_target_s(0.5) == recorder.curve[0]["train_time_s"]
    assert recorder.clock.durations_s == pytest.approx([1, 1], abs=1e-6)


def test_time_to_target_excludes_setup_measurement_steps_and_evaluation(fake_time, monkeypatch):
    """train() on a fake clock that moves only in the parts the training clock must not see."""
    def slowed(fn, seconds):
        def wrapper(*args, **kwargs):
            fake_time.advance(seconds)
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(train_module, "build_dataset", slowed(train_module.build_dataset, 1000))
    monkeypatch.setattr(train_module, "memory_step", slowed(train_module.memory_step, 100))
    monkeypatch.setattr(train_module, "flop_step", slowed(train_module.flop_step, 100))
    monkeypatch.setattr(train_module, "evaluate", slowed(train_module.evaluate, 10_000))
    monkeypatch.setattr(train_module, "peak_tflops", lambda device, precision: (1.0, "test"))
    config = build_train_config({"model": "tiny_cnn", "dataset": "digits", "image_size": 8, "batch_size": 512,
                                 "epochs": 2, "warmup_steps": 0, "target_accuracy": 0.0}, "test")
    metrics = train(config, seed=0, device=CPU)
    assert metrics["wall_time_s"] > 1000 + 200 + 2 * 10_000  # the fake clock did run
    assert all(p["train_time_s"] < 1 for p in metrics["curve"])
    assert metrics["time_to_target_s"] == metrics["curve"][0]["train_time_s"]


# ---- peak FLOP/s ----
@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100-PCIE-40GB", "A100"),
    ("NVIDIA L4", "L4"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L40", None),  # not L4, not L40S
    ("NVIDIA A10", "A10"),
    ("NVIDIA A10G", None),  # not an A10
    ("NVIDIA A100X", None),
    ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ("NVIDIA GeForce RTX 4090 D", None),
    ("Tesla V100-SXM2-16GB", "V100 SXM2"),
])
def test_device_names_match_the_datasheet_table_exactly(name, key):
    assert datasheet_key(name) == key


def test_a_known_gpu_uses_its_datasheet(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    assert measure.peak_tflops(torch.device("cuda"), "bf16") == (362.0, "datasheet L40S bf16")


def test_an_unknown_gpu_is_measured_and_said_to_be_unknown(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA B300")
    monkeypatch.setattr(measure, "measured_matmul_tflops", lambda device, dtype, size: 100.0)
    peak, source = measure.peak_tflops(torch.device("cuda"), "fp32")
    assert peak == 100.0
    assert source == "measured 1024^2 matmul fp32 (device 'NVIDIA B300' not in the datasheet table)"


def test_measured_peak_never_uses_an_emulated_dtype_slower_than_fp32(monkeypatch):
    fake = {torch.float32: 1.0, torch.bfloat16: 0.1}  # a CPU that emulates bf16
    monkeypatch.setattr(measure, "measured_matmul_tflops", lambda device, dtype, size: fake[dtype])
    assert measure.peak_tflops(CPU, "bf16") == (1.0, "measured 256^2 matmul fp32")
    fake[torch.bfloat16] = 3.0  # native bf16 units: the bf16 peak is the reference
    assert measure.peak_tflops(CPU, "bf16") == (3.0, "measured 256^2 matmul bf16")
