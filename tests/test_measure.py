"""Measurement physics on CPU, asserted on deterministic counters (bytes, FLOPs), never on time."""
import pytest
import torch

from bench.measure import measure_step_memory, tensor_bytes
from bench.models import build_model
from bench.spec import RunContext
from bench.train import run_step
from bench.tricks.accumulation import Accumulation
from bench.tricks.checkpointing import Checkpointing
from bench.tricks.precision import Precision
from bench.tricks.sam import SAM


def measure(model_name="resnet18_cifar", tricks=(), batch=16, size=32):
    """Memory report of one training step (after one untracked warm-up step)."""
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10)
    for trick in tricks:
        model = trick.prepare_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    for trick in tricks:
        trick.setup(RunContext(torch.device("cpu"), model, optimizer, None))
    data = (torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,)))
    run_step(model, optimizer, list(tricks), data)  # momentum buffers exist from here on
    with measure_step_memory(model, optimizer) as report:
        run_step(model, optimizer, list(tricks), data)
    return report, model, optimizer


@pytest.fixture(scope="module")
def baseline():
    return measure()


def test_parameter_bytes_are_numel_times_element_size(baseline):
    report, model, optimizer = baseline
    expected = sum(p.numel() * p.element_size() for p in model.parameters())
    assert report.breakdown["parameters"] == expected
    # SGD with momentum keeps one buffer per parameter.
    assert report.breakdown["optimizer_state"] == expected
    assert report.peak_memory_bytes == sum(report.breakdown.values())


def test_activations_are_counted(baseline):
    report, _, _ = baseline
    # ResNet-18 at 32x32 keeps well over 1 MiB per sample for backward; zero means the pass is blind.
    assert report.breakdown["activations"] > 8 * 2**20
    assert report.breakdown["gradients"] >= 0


def test_checkpointing_cuts_activation_bytes_by_at_least_30_percent(baseline):
    report, _, _ = measure(tricks=[Checkpointing(True)])
    assert report.breakdown["activations"] <= 0.7 * baseline[0].breakdown["activations"]


def test_checkpointing_counts_more_forward_flops(baseline):
    report, _, _ = measure(tricks=[Checkpointing(True)])
    assert report.flops_per_step > baseline[0].flops_per_step  # the recomputed forward


def test_bf16_lowers_activation_bytes(baseline):
    report, _, _ = measure(tricks=[Precision("bf16")])
    # Not halved: autocast's bf16 copies of the weights (22 MiB for ResNet-18) are alive at the
    # end of the forward, and on CPU BatchNorm runs in fp32. Hence a batch large enough for
    # activations to dominate.
    assert report.breakdown["activations"] < 0.9 * baseline[0].breakdown["activations"]


def test_accumulation_lowers_peak_activation_bytes(baseline):
    report, _, _ = measure(tricks=[Accumulation(4)])
    assert report.breakdown["activations"] < 0.5 * baseline[0].breakdown["activations"]
    assert report.flops_per_step == pytest.approx(baseline[0].flops_per_step, rel=0.01)


def test_sam_counts_twice_the_flops(baseline):
    report, _, _ = measure(tricks=[SAM(0.05)])
    assert report.flops_per_step == pytest.approx(2 * baseline[0].flops_per_step, rel=0.01)


def test_tensor_bytes_of_mixed_dtypes():
    tensors = [torch.zeros(3, dtype=torch.float32), torch.zeros(5, dtype=torch.bfloat16)]
    assert tensor_bytes(iter(tensors)) == 3 * 4 + 5 * 2


def test_measured_peak_never_uses_an_emulated_dtype_slower_than_fp32(monkeypatch):
    from bench import measure

    fake = {torch.float32: 1.0, torch.bfloat16: 0.1}  # a CPU that emulates bf16
    monkeypatch.setattr(measure, "measured_matmul_tflops", lambda device, dtype, size: fake[dtype])
    assert measure.peak_tflops(torch.device("cpu"), "bf16") == (1.0, "measured 256^2 matmul fp32")
    fake[torch.bfloat16] = 3.0  # native bf16 units: the bf16 peak is the reference
    assert measure.peak_tflops(torch.device("cpu"), "bf16") == (3.0, "measured 256^2 matmul bf16")
