"""AOT compile of the train step: for a TPU topology with libtpu, for NVIDIA GPUs with the jax CUDA
plugin (no TPU or GPU here), and the CPU fallback."""

import dataclasses
import sys

import jax
import pytest

import train_fixtures
from allava_jax.errors import UserError
from allava_jax.train import compile as aot
from allava_jax.train.sharding import make_mesh


def test_tiny_step_compiles_for_two_tpu_slices_with_splash_attention(tmp_path):
    """The real Mosaic splash kernel inside the sharded step, on a hybrid (DCN x ICI) mesh of 2 x v5e:2x2."""
    cfg = train_fixtures.config(tmp_path, **{"model_overrides.attention": "splash", "data.num_shards": 8})
    found, last = aot.search(cfg, ["v5e:2x2"], num_slices=2, fit_micro=False)
    assert found is last and found.fits
    assert found.target == "2 x v5e:2x2" and found.chips == 8 and found.mesh == {"data": 8, "fsdp": 1, "tensor": 1}
    assert found.attention == "splash" and found.code > 0  # a TPU executable (XLA:CPU reports no code size)
    assert 0 < found.total < 1 << 30 and found.hbm == 16 * aot.GIB


@pytest.mark.skipif(not aot.gpu_compiler_installed(), reason="the GPU compiler is not installed: "
                    "pip install -r requirements-gpu.txt (the jax CUDA plugin and ptxas)")
def test_tiny_step_compiles_for_one_h100_with_the_flash_kernel(tmp_path, monkeypatch):
    """XLA's GPU compiler, deviceless: attention "auto" on H100 devices is the Triton flash kernel
    inside the sharded step, and the figures are the GPU compiler's, judged against JAX's default
    share of the H100's memory."""
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION", raising=False)
    compiled = []
    compile_fn = jax.stages.Lowered.compile
    monkeypatch.setattr(jax.stages.Lowered, "compile", lambda self, *a, **k: compiled.append(compile_fn(self, *a, **k))
                        or compiled[-1])
    cfg = train_fixtures.config(tmp_path, **{"model_overrides.attention": "auto", "data.num_shards": 1})
    found, last = aot.search(cfg, ["h100-1"], num_slices=1, fit_micro=False)
    assert found is last and found.fits and found.platform == "gpu" and found.attention == "flash"
    assert found.target == "h100-1" and found.chips == 1 and found.micro_batch == 8
    assert found.device_memory == 84978434048 and found.hbm == 0.75 * found.device_memory
    assert 0 < found.total < 1 << 30 and found.peak == found.total  # the GPU compiler's own peak
    text = compiled[-1].as_text()
    assert "__gpu$xla.gpu.triton" in text and "mha_forward" in text  # the flash kernel, compiled by Triton
    assert jax.default_backend() == "cpu"  # the plugin installed, the suite still runs on CPU


def test_gpu_nodes_are_named_like_slices(monkeypatch):
    """The topology table's GPU entries, the memory share JAX takes, and what to change for a GPU."""
    assert aot.slices_of("h100") == ["h100-1", "h100-2", "h100-4", "h100-8", "2xh100-8", "4xh100-8"]
    assert aot.generation("2xh100-8") == "h100" and aot.device_count("2xh100-8") == 16
    assert aot.device_count("a100-8") == 8 and aot.device_count("v5p-8") == 4
    with pytest.raises(UserError, match="not a known slice or GPU node .*a100-8, .*h200-8"):
        aot.make_target("h100-3")
    monkeypatch.setattr(aot, "gpu_compiler_installed", lambda: False)
    with pytest.raises(UserError, match="requirements-gpu.txt"):
        aot.make_target("h100-8")
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    assert aot.gpu_memory_fraction() == 0.9
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "90%")
    with pytest.raises(UserError, match="XLA_PYTHON_CLIENT_MEM_FRACTION=90%"):
        aot.gpu_memory_fraction()
    report = aot.Report(target="a100-8", chips=8, mesh={"data": 1, "fsdp": 8, "tensor": 1}, batch=256, micro_batch=64,
                        accum=4, attention="xla", argument=0, output=0, alias=0, temp=0, code=0, hbm=60 * aot.GIB,
                        lower_s=1, compile_s=1, flops_per_chip=1, peak=70 * aot.GIB, platform="gpu",
                        device_memory=80 * aot.GIB)
    assert not report.fits and "per GPU" in aot.format_report(report)
    tips = aot.advice(report)
    assert "70.00 GiB per GPU, a100-8 has 60.0 GiB (75% of the GPU's 80.0 GiB" in tips
    assert "XLA_PYTHON_CLIENT_MEM_FRACTION=0.75 now" in tips and "attention=auto" in tips
    assert "--config.micro_batch_size=32" in tips
    assert "MEM_FRACTION=" not in aot.advice(dataclasses.replace(report, hbm=report.device_memory))


def test_hybrid_mesh_puts_the_slices_on_the_dcn_axis():
    devices = aot.tpu_target("v5e:2x2", num_slices=2).devices
    mesh = make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices, {"data": -1})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    for d in range(2):  # each data index is one whole slice; fsdp stays inside a slice (ICI)
        assert {dev.slice_index for dev in mesh.devices[d].ravel()} == {d}
    with pytest.raises(UserError, match="does not divide"):
        make_mesh({"data": 1, "fsdp": -1, "tensor": 1}, devices, {"data": 1, "fsdp": 3})


def test_a_step_that_does_not_fit_exits_1_with_what_to_change(tmp_path):
    """The CPU fake-device fallback (no libtpu needed) and the non-zero exit of a step too big for a chip."""
    demo = tmp_path / "demo"  # the config names data paths; compiling reads none of them
    cmd = [sys.executable, "-m", "allava_jax.train.compile", f"--config={train_fixtures.CONFIG_FILE}:{demo}",
           "--topology=cpu:8", "--config.batch_size=65536", "--config.data.num_shards=8"]
    result = train_fixtures.run(cmd, train_fixtures.subprocess_env(devices=1), timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "cpu:8: 8 chips, mesh data=8; batch 65536 = micro-batch 65536 x 1" in result.stdout
    assert "DOES NOT FIT" in result.stdout and "Traceback" not in result.stderr
    assert "error: does not fit: the step needs" in result.stderr
    assert "--config.micro_batch_size=32768" in result.stderr


def test_candidates_and_named_slices():
    cfg = train_fixtures.config(".", batch_size=256, micro_batch_size=0)
    assert aot.micro_batches(cfg, 16) == [256, 128, 64, 32, 16]
    assert aot.micro_batches(train_fixtures.config(".", batch_size=48, micro_batch_size=24), 4) == [24, 12]
    assert aot.slices_of("v5e")[:3] == ["v5e-4", "v5e-8", "v5e-16"] and aot.slices_of("v5e", "v5e-64")[0] == "v5e-64"
    assert len(aot.tpu_target("v4-8").devices) == 4  # megacore: one device per chip
    with pytest.raises(UserError, match="not a known slice"):
        aot.tpu_target("v9-8")
    assert aot.slices_of("v4")[:2] == ["v4-8", "v4-16"]
    assert jax.default_backend() == "cpu"  # libtpu installed, the suite still runs on CPU


def test_the_tpu_compilers_out_of_memory_is_a_report_not_a_traceback(tmp_path):
    """libtpu refuses a program larger than HBM at compile time; that refusal is the verdict."""
    cfg = train_fixtures.config(tmp_path, batch_size=65536, **{"data.num_shards": 8})
    found, last = aot.search(cfg, ["v5e:2x2"], num_slices=1, fit_micro=False)
    assert found is None and not last.fits and last.oom.startswith("the TPU compiler ran out of HBM")
    assert last.total > 16 * aot.GIB and "--config.micro_batch_size=32768" in aot.advice(last)
    assert aot._hbm_oom("Ran out of memory in memory space hbm. Used 15.84G of 15.75G hbm. Exceeded") == (
        int(15.84 * 2**30), int(15.75 * 2**30))
    assert aot._hbm_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
                        "temporaries (89.41G) exceeds available HBM (15.75G).") == (int(89.41 * 2**30), int(15.75 * 2**30))
    assert aot._hbm_oom("INVALID_ARGUMENT: something else") is None


def test_native_resolution_stage_compiles_for_tpu_with_splash_in_both_towers():
    """LLaVA-OneVision-1.5 stage 1.5 on ``tiny_ov15``: the packed patch batch (124 patches + 4
    class-token slots = 128 vision tokens, 256-token rows) through the real splash kernel."""
    import runpy

    cfg = runpy.run_path(str(train_fixtures.ROOT / "configs" / "llava_ov15_stage1_5.py"))["get_config"]()
    with cfg.unlocked():
        cfg.model, cfg.batch_size, cfg.micro_batch_size, cfg.compile_cache_dir = "tiny_ov15", 4, 0, ""
        cfg.model_overrides.attention = "splash"
        cfg.model_overrides.dtype = "float32"  # the suite's "highest" matmul precision has no bf16 Mosaic matmul
        cfg.data.seq_len, cfg.data.max_patches_per_row, cfg.data.max_images_per_row = 256, 124, 4
    found, last = aot.search(cfg, ["v5e:2x2"], num_slices=1, fit_micro=False)
    assert found is last and found.fits and found.attention == "splash" and found.code > 0
    assert found.flops_per_chip > 0
