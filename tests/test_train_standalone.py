"""The adapter folder without sage-builder: sage_user_adapter.py (torch, diffusers, safetensors only)
gives the UNet output the package's own adapter gives; and the trainer's accuracy counts ties half."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sage_builder.adapter import STANDALONE_NAME, UserAdapter
from sage_builder.stages.train.trainer import CHANCE_LEVEL, grouped_accuracy, implicit_accuracy

BLOCK_SAGE = "import sys; sys.modules['sage_builder'] = None  # importing sage_builder now fails\n"


def test_standalone_loader_matches_the_package_without_importing_it(tmp_path, models_dir):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(models_dir / "tiny-sdxl", subfolder="unet")
    torch.manual_seed(0)
    adapter = UserAdapter.for_unet(unet, embedding_dim=16, n_tokens=4, scale=0.7, backbone="sdxl")
    with torch.no_grad():
        for branch in adapter.branches.values():  # zero-init would make both sides the base model
            branch.to_k.weight.normal_(0, 0.5)
            branch.to_v.weight.normal_(0, 0.5)
    adapter_dir = adapter.save(tmp_path / "adapter")
    assert (adapter_dir / STANDALONE_NAME).exists()

    generator = torch.Generator().manual_seed(1)
    inputs = {"sample": torch.randn(2, 4, 32, 32, generator=generator), "timestep": torch.tensor([10, 500]),
              "text": torch.randn(2, 7, unet.config.cross_attention_dim, generator=generator),
              "text_embeds": torch.randn(2, 32, generator=generator),
              "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2),
              "embedding": torch.randn(16, generator=generator)}
    torch.save(inputs, tmp_path / "inputs.pt")
    adapter.install(unet)
    with torch.no_grad():
        tokens = adapter(inputs["embedding"][None])
        expected = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["text"],
                        added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                        cross_attention_kwargs=adapter.attention_kwargs(tokens)).sample
        base = unet(inputs["sample"], inputs["timestep"], encoder_hidden_states=inputs["text"],
                    added_cond_kwargs={"text_embeds": inputs["text_embeds"], "time_ids": inputs["time_ids"]},
                    cross_attention_kwargs=adapter.reference_kwargs()).sample
    adapter.remove()

    script = BLOCK_SAGE + textwrap.dedent(f"""
        import torch
        from diffusers import UNet2DConditionModel
        sys.path.insert(0, {str(adapter_dir)!r})
        from sage_user_adapter import load_user_adapter

        unet = UNet2DConditionModel.from_pretrained({str(models_dir / "tiny-sdxl")!r}, subfolder="unet")
        adapter = load_user_adapter(unet, {str(adapter_dir)!r})
        x = torch.load({str(tmp_path / "inputs.pt")!r})
        added = {{"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}}
        with torch.no_grad():
            user = unet(x["sample"], x["timestep"], encoder_hidden_states=x["text"], added_cond_kwargs=added,
                        cross_attention_kwargs=adapter.kwargs(x["embedding"].numpy())).sample
            off = unet(x["sample"], x["timestep"], encoder_hidden_states=x["text"], added_cond_kwargs=added,
                       cross_attention_kwargs=adapter.kwargs(None)).sample
        torch.save({{"user": user, "off": off}}, {str(tmp_path / "out.pt")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = torch.load(tmp_path / "out.pt")
    assert not torch.allclose(expected, base, atol=1e-4)  # the adapter changes the output
    torch.testing.assert_close(got["user"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["off"], base, rtol=1e-5, atol=1e-5)


def test_the_standalone_file_imports_nothing_of_the_package():
    from sage_builder import adapter_standalone as standalone

    source = Path(standalone.__file__).read_text()
    assert "sage_builder" not in "\n".join(line for line in source.splitlines() if "import" in line)


def test_ties_count_half_so_an_untrained_adapter_reads_chance():
    assert implicit_accuracy(np.zeros(8)) == CHANCE_LEVEL == 0.5
    assert implicit_accuracy(np.array([1.0, -1.0, 0.0, 2.0])) == pytest.approx(0.625)
    assert implicit_accuracy(torch.tensor([0.5, 0.25])) == 1.0
    groups = grouped_accuracy([1.0, -1.0, 0.0], ["banned", "allowed", "banned"])
    assert groups["banned"] == {"records": 2, "implicit_accuracy": 0.75, "ties": 1, "reward_margin": 0.5}
    assert groups["allowed"]["implicit_accuracy"] == 0.0
