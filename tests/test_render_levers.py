"""Render speed levers on the tiny SDXL (CPU): each keeps the images within float rounding of the eager path.

Fused QKV and the SDPA kernels run for real. ``torch.compile`` runs through dynamo with the
``aot_eager`` backend for the UNet (traced, functionalized, same pixels) and dynamo alone for the
VAE decode (aot_eager of it fails on CPU, see below); inductor's C++ code generation for the tiny
UNet takes minutes on this shared 2-core machine (386 s once, BENCHMARKS.md), so inductor itself
is left to the GPU bench.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np
import pytest

from sage_builder.config import config_from_dict, hashable_dump

pytestmark = pytest.mark.slow

PROMPTS = ["a knife fight in an alley", "two friends cooking", "riot police at night"]


def _jobs():
    from sage_builder.diffusion import ImageJob, pair_seed

    return [ImageJob(f"k{i}", p, pair_seed(7, f"pair{i // 2}")) for i, p in enumerate(PROMPTS)]


JOBS = _jobs()


def render_config(models_dir: Path, **levers):
    section = {"model": str(models_dir / "tiny-sdxl"), "steps": 2, "guidance": 5.0, "height": 64, "width": 64,
               "batch_size": 4, "device": "cpu", "workers": 1, "threads": 1, **levers}
    return config_from_dict({"name": "t", "seed": 7, "llm": {"model": "unused/model"}, "render": section})


def worker(models_dir: Path, **levers):
    """(a worker's pipeline with ``levers``, render(pipe, jobs) -> uint8 as the worker renders a batch)."""
    from sage_builder.diffusion import RenderSettings, generate_batch
    from sage_builder.stages.render.workers import load_worker_pipeline

    config = render_config(models_dir, **levers).render
    settings = RenderSettings.from_config(config, "cpu")

    def run(pipe, jobs):
        return generate_batch(pipe, jobs, settings, pad_to=config.batch_size if config.compile else 0,
                              sdpa_backend=config.sdpa_backend)

    return load_worker_pipeline(config, "cpu"), run


def render(models_dir: Path, **levers) -> np.ndarray:
    pipe, run = worker(models_dir, **levers)
    return run(pipe, JOBS)


@pytest.fixture(scope="module")
def eager(models_dir) -> np.ndarray:
    import torch

    torch.set_num_threads(1)
    return render(models_dir)


def assert_close(images: np.ndarray, reference: np.ndarray) -> None:
    diff = np.abs(images.astype(int) - reference.astype(int))
    assert images.shape == reference.shape
    # float32 on CPU: a reordered sum moves a pixel by at most one level after rounding to uint8.
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())


@pytest.mark.parametrize("levers", [{"fuse_qkv": True}, {"sdpa_backend": "math"}, {"sdpa_backend": "flash"}],
                         ids=["fuse_qkv", "sdpa-math", "sdpa-flash"])
def test_eager_levers_keep_the_images(models_dir, eager, levers):
    assert_close(render(models_dir, **levers), eager)


def test_compiled_unet_and_vae_decode_keep_the_images(models_dir, eager, monkeypatch):
    import torch

    from sage_builder.stages.render.levers import INDUCTOR_FLAGS

    for name in INDUCTOR_FLAGS:  # process-wide: put them back after the test
        monkeypatch.setattr(torch._inductor.config, name, getattr(torch._inductor.config, name))

    calls: list[dict] = []
    real = torch.compile

    def compile_aot_eager(model, **options):
        calls.append(options)
        options = {k: v for k, v in options.items() if k != "mode"}  # modes are inductor's
        # aot_eager of the VAE decode fails on CPU in torch 2.13 ("Expected X.is_contiguous(memory_format)"),
        # so the decode is only traced by dynamo here; the GPU bench compiles it with inductor.
        return real(model, backend="eager" if inspect.ismethod(model) else "aot_eager", **options)

    monkeypatch.setattr(torch, "compile", compile_aot_eager)
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters["stats"]
    pipe, run = worker(models_dir, compile=True, compile_vae=True, fuse_qkv=True, inductor_flags=True,
                       compile_mode="max-autotune")
    assert_close(run(pipe, JOBS), eager)
    # A worker compiles once per shape: a shorter last batch is padded to render.batch_size and
    # reuses the graphs instead of compiling new ones.
    graphs = counters["unique_graphs"]
    run(pipe, JOBS[:2])
    assert counters["unique_graphs"] == graphs > 0
    # The UNet and the VAE decode, each with one static shape.
    assert [c["mode"] for c in calls] == ["max-autotune", "max-autotune"] and all(not c["dynamic"] for c in calls)
    assert torch._inductor.config.conv_1x1_as_mm and not torch._inductor.config.epilogue_fusion
    torch._dynamo.reset()


@pytest.mark.parametrize("levers,message", [
    ({"sdpa_backend": "efficient"}, r"render.sdpa_backend: 'efficient' needs CUDA, the device is cpu"),
    ({"sdpa_backend": "cudnn"}, r"render.sdpa_backend: 'cudnn' needs CUDA"),
    ({"compile": True, "compile_mode": "reduce-overhead"}, r"render.compile_mode: 'reduce-overhead' is CUDA graphs"),
])
def test_a_lever_the_device_lacks_is_a_one_line_error_before_loading(models_dir, levers, message):
    from sage_builder.errors import StageInputError

    with pytest.raises(StageInputError, match=message) as err:
        render(models_dir, **levers)
    assert "\n" not in str(err.value)


def test_levers_are_execution_only(models_dir):
    from sage_builder.diffusion import RenderSettings, image_key

    plain = render_config(models_dir)
    fast = render_config(models_dir, compile=True, compile_mode="reduce-overhead", compile_vae=True,
                         inductor_flags=True, fuse_qkv=True, sdpa_backend="flash")
    assert hashable_dump(plain) == hashable_dump(fast)
    assert image_key("p", 1, RenderSettings.from_config(plain.render, "cpu")) == \
        image_key("p", 1, RenderSettings.from_config(fast.render, "cpu"))
