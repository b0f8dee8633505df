"""Attention kernels change memory and speed, never the numbers: the same outputs and gradients as
nn.MultiheadAttention, less activation memory with query chunks, and the SDPA backend the
profiler saw."""
from __future__ import annotations

import copy
import csv
import math
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile
from torch.testing import assert_close
from torchvision.models.vision_transformer import VisionTransformer

from bench.base.errors import ConfigError
from bench.config.matrix import load_matrix
from bench.config.train_config import build_train_config
from bench.parts.distributed import unwrap
from bench.parts.models import build_model
from bench.training.train import build_tricks, run_step, train
from bench.tricks.attention import Attention, KernelAttention, chunked_attention, math_attention, replace_attention
from bench.tricks.spec import RunContext
from tests.test_memory_reference import configured, measure

KERNELS = {"math": ("math", None), "sdpa": ("sdpa", None), "chunked": ("chunked", 16)}
TOKENS, WIDTH, HEADS = 65, 32, 4  # 8x8 patches + the class token: not a multiple of the chunk


def attention_pair(kernel: str, q_chunk: int | None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    block = nn.Sequential()  # replace_attention swaps children, so the MHA needs a parent
    block.attn = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    nn.init.normal_(block.attn.in_proj_bias)  # nonzero biases: a mix-up of q/k/v biases would show
    replaced = copy.deepcopy(block)
    assert len(replace_attention(replaced, kernel, q_chunk)) == 1
    return block, replaced


@pytest.mark.parametrize("name", list(KERNELS))
def test_same_outputs_and_gradients_as_multihead_attention(name):
    original, replaced = attention_pair(*KERNELS[name])
    assert isinstance(replaced.attn, KernelAttention) and replaced.attn.kernel == name
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, TOKENS, WIDTH, generator=g)
    upstream = torch.randn(3, TOKENS, WIDTH, generator=g)  # a loss that weighs every output differently
    results = []
    for model in (original, replaced):
        inputs = x.clone().requires_grad_()
        out, _ = model.attn(inputs, inputs, inputs, need_weights=False)
        (out * upstream).sum().backward()
        results.append((out, inputs.grad, {n: p.grad for n, p in model.named_parameters()}))
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = results
    assert_close(out_b, out_a, rtol=1e-5, atol=1e-5)
    assert_close(dx_b, dx_a, rtol=1e-4, atol=1e-5)
    assert grads_a.keys() == grads_b.keys()  # the same parameters under the same names
    for key in grads_a:
        assert_close(grads_b[key], grads_a[key], rtol=1e-4, atol=1e-4)


def test_parameters_are_shared_not_copied():
    model = build_model("vit_tiny", 10, image_size=16)
    before = {n: p for n, p in model.named_parameters()}
    replace_attention(model, "math")
    assert {n: p for n, p in model.named_parameters()} == before  # same objects under the same keys


def test_chunked_recomputes_each_chunk_in_backward(monkeypatch):
    import bench.tricks.attention as attention

    calls = []
    real = attention.math_attention
    monkeypatch.setattr(attention, "math_attention", lambda q, *a: calls.append(q.shape[-2]) or real(q, *a))
    _, replaced = attention_pair("chunked", 16)
    x = torch.randn(2, TOKENS, WIDTH, requires_grad=True)
    out, _ = replaced.attn(x, x, x, need_weights=False)
    assert calls == [16, 16, 16, 16, 1]  # ceil(65 / 16) chunks in forward
    out.sum().backward()
    assert sorted(calls[5:]) == [1, 16, 16, 16, 16]  # and each again in backward (last chunk first)


SDPA_OPS = {"flash_attention": "aten::_scaled_dot_product_flash_attention",
            "efficient_attention": "aten::_scaled_dot_product_efficient_attention",
            "cudnn_attention": "aten::_scaled_dot_product_cudnn_attention",
            "math": "aten::_scaled_dot_product_attention_math"}


@pytest.mark.parametrize("forced", [None, SDPBackend.MATH])
def test_recorded_sdpa_backend_is_the_one_the_profiler_sees(forced):
    _, replaced = attention_pair("sdpa", None)
    x = torch.randn(2, TOKENS, WIDTH)
    with profile(activities=[ProfilerActivity.CPU]) as prof, sdpa_kernel(forced) if forced else nullcontext():
        replaced.attn(x, x, x, need_weights=False)
    ran = {e.key for e in prof.key_averages() if e.key.startswith("aten::_scaled_dot_product")}
    backend = replaced.attn.backend
    assert backend is not None and any(op.startswith(SDPA_OPS[backend]) for op in ran), (backend, ran)
    if forced:
        assert backend == "math"


def test_chunking_lowers_activation_memory_by_the_attention_matrices():
    """vit_tiny at 64x64 (257 tokens): math keeps each layer's probabilities, B x heads x L^2
    floats, for backward; chunks of 16 queries keep none. At math's peak (softmax backward of the
    last layer) all of them are live plus that layer's gradient of the scores, so the peak falls by
    more than ``layers`` matrices; the activations live at the peak by at least ``layers - 1``
    (the last layer's own other activations are freed by then). Measured with the ledger, and
    the peak also against the CPU allocator's own high-water mark."""
    batch, tokens, layers, heads = 4, 257, 4, 4
    one_layer = batch * heads * tokens * tokens * 4

    def measured(value):
        return measure(configured("vit_tiny", batch, attention=value, image_size=64))

    math_run, chunked_run = measured("math"), measured({"chunked": 16})
    assert math_run.ledger_peak - chunked_run.ledger_peak > layers * one_layer
    assert math_run.reference_bytes - chunked_run.reference_bytes > layers * one_layer
    saved = (math_run.row["memory_breakdown"]["activations"]
             - chunked_run.row["memory_breakdown"]["activations"])
    assert saved > 0.95 * (layers - 1) * one_layer, saved / one_layer


def test_parse_and_check():
    assert Attention.parse("sdpa") == "sdpa" and Attention.parse({"chunked": 32}) == {"chunked": 32}
    for bad in ("flash", {"chunked": 0}, {"chunked": True}, {"chunk": 8}, "chunked"):
        with pytest.raises(ValueError, match="not one of null, math, sdpa"):
            Attention.parse(bad)
    Attention.check("math", build_train_config({"model": "vit_tiny", "dataset": "digits", "epochs": 1}, "t"))
    with pytest.raises(ValueError, match="'tiny_cnn' has no batch-first nn.MultiheadAttention"):
        Attention.check("math", build_train_config({"model": "tiny_cnn", "dataset": "digits", "epochs": 1}, "t"))


def test_matrix_with_attention_on_a_cnn_is_refused(write_matrix):
    path = write_matrix("name: m\nbase: {model: tiny_cnn, dataset: digits, epochs: 1}\n"
                        "axes: {attention: [null, {chunked: 8}]}")
    with pytest.raises(ConfigError, match="no batch-first nn.MultiheadAttention"):
        load_matrix(path)


def test_vit_tiny_learns_digits():
    config = build_train_config({"model": "vit_tiny", "dataset": "digits", "image_size": 16, "batch_size": 64,
                                 "steps": 40, "warmup_steps": 1, "optimizer": {"name": "adamw", "lr": 2e-3},
                                 "attention": {"chunked": 8}}, "t")
    metrics = train(config, seed=0, device=torch.device("cpu"))
    assert metrics["attention_layers"] == 4 and metrics["attention_q_chunk"] == 8
    assert metrics["final_train_loss"] < 0.85 * math.log(10)  # below chance after 40 steps
    assert metrics["accuracy_top1"] > 0.3  # chance: 0.1


@pytest.mark.parametrize("tricks", [{"precision": "bf16"}, {"precision": "fp16"}, {"accumulation": 2}])
@pytest.mark.parametrize("value", ["math", "sdpa", {"chunked": 8}])
def test_combines_with_precision_and_accumulation(tricks, value):
    config = build_train_config({"model": "vit_tiny", "dataset": "synthetic", "num_samples": 32, "image_size": 16,
                                 "batch_size": 8, "steps": 5, "warmup_steps": 1, "attention": value, **tricks}, "t")
    metrics = train(config, seed=0, device=torch.device("cpu"))
    assert metrics["final_train_loss"] == pytest.approx(metrics["final_train_loss"])  # finite, not NaN
    if value == "sdpa":
        assert metrics["attention_sdpa_backend"]


# --- world_size 2: DDP wraps the model before the kernels are swapped in ------------------------

def tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(image_size=8, patch_size=4, num_layers=1, num_heads=2, hidden_dim=8, mlp_dim=16,
                             num_classes=5).double()


def ddp_params(world_size: int, rank: int = 0) -> list[torch.Tensor]:
    config = build_train_config({"model": "vit_tiny", "dataset": "synthetic", "steps": 10, "batch_size": 8,
                                 "world_size": world_size, "attention": {"chunked": 2}}, "t")
    tricks = build_tricks(config)
    model = tiny_vit()
    for trick in tricks:
        model = trick.prepare_model(model)
    assert any(isinstance(m, KernelAttention) for m in model.modules())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for trick in tricks:
        trick.setup(RunContext(torch.device("cpu"), model, optimizer, config))
    g = torch.Generator().manual_seed(1)
    share = 8 // world_size
    for _ in range(3):
        x, y = torch.randn(8, 3, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 5, (8,), generator=g)
        run_step(model, optimizer, tricks, (x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]))
    return [p.detach().clone() for p in unwrap(model).parameters()]


def ddp_worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.save(ddp_params(2, rank), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_with_chunked_attention_equal_one_process(tmp_path):
    mp.spawn(ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    single = ddp_params(1)
    for rank in range(2):
        for p, q in zip(torch.load(tmp_path / f"rank{rank}.pt"), single, strict=True):
            assert_close(p, q)


def test_attention_memory_command_writes_the_figure_and_table(tmp_path):
    from matplotlib.image import imread

    from bench.cli.main import main

    out = tmp_path / "attention"
    assert main(["attention-memory", "--out", str(out), "--batch-size", "4", "--image-sizes", "8", "32"]) == 0
    rows = list(csv.DictReader((out / "attention_memory.csv").open()))
    assert [(r["kernel"], r["tokens"]) for r in rows[:2]] == [("nn.MultiheadAttention", "5"),
                                                               ("nn.MultiheadAttention", "65")]
    by_kernel = {r["kernel"]: int(r["peak_memory_bytes"]) for r in rows if r["tokens"] == "65"}
    assert by_kernel["math"] > by_kernel["chunked(16)"]  # math keeps the probabilities
    assert np.asarray(imread(out / "attention_memory.png")).std() > 0.01  # not blank
    assert "| math | 32 | 65 |" in (out / "attention_memory.md").read_text()


def test_attention_memory_refuses_sizes_the_patches_do_not_tile(tmp_path, capsys):
    from bench.cli.main import main

    assert main(["attention-memory", "--out", str(tmp_path / "a"), "--image-sizes", "30"]) == 2
    assert "30 is not a multiple of the patch size 4" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_flops_of_each_kernel_in_matrix_products():
    """In units of one (L x L x d) product, 2·B·heads·L²·d FLOPs: math = 2 forward + 4 backward;
    flash attention (SDPA's CPU kernel) recomputes QKᵀ in backward, 7; chunked recomputes QKᵀ
    too (non-reentrant checkpoint stops recomputing once the tensors backward needs exist), 7.
    Torch has no formula for the CPU flash kernel: bench.parts.flop_formulas adds it (else SDPA = 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    import bench.training.train  # noqa: F401 - registers the formulas, as every run does

    unit = 2 * 2 * 4 * TOKENS * TOKENS * 8
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 2, 4, TOKENS, 8).unbind(0))
    kernels = {"math": math_attention, "sdpa": F.scaled_dot_product_attention,
               "chunked": lambda q, k, v: chunked_attention(q, k, v, 16)}
    counted = {}
    for name, fn in kernels.items():
        with FlopCounterMode(display=False) as counter:
            fn(q, k, v).sum().backward()
        counted[name] = counter.get_total_flops() / unit
    assert counted == {"math": 6, "sdpa": 7, "chunked": 7}


def test_chunks_inside_checkpointed_blocks_give_the_same_gradients():
    """Nested non-reentrant checkpoints: the checkpointing trick wraps each encoder block, whose
    attention then checkpoints each query chunk again."""
    from bench.tricks.checkpointing import Checkpointed, apply_checkpointing

    torch.manual_seed(0)
    plain = build_model("vit_tiny", 10, image_size=16)
    nested = Attention({"chunked": 4}).prepare_model(apply_checkpointing(copy.deepcopy(plain)))
    assert sum(isinstance(m, Checkpointed) for m in nested.modules()) == 4
    assert sum(isinstance(m, KernelAttention) for m in nested.modules()) == 4
    x, y = torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 2])
    for model in (plain, nested):
        F.cross_entropy(model(x), y).backward()
    for (name, p), q in zip(plain.named_parameters(), nested.parameters(), strict=True):
        assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
