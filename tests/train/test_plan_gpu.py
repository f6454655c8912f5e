"""GPU plans: --target parsing and the CPU-compiler fallback (default suite), and, with the gpu-plan
extra (-m gpu_plan), XLA's CUDA compiler on abstract GPUs described by kerasft/gpu_targets/: every
shipped description compiles, bfloat16 products stay bfloat16 where the card has bfloat16 tensor
cores, and several GPUs compile a sharded step. Tiny models: each compile takes under a second."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

from kerasft.cli import main
from kerasft.runtime import TARGETS, cuda_compiler_installed, gpu_target_config, resolve_target

ROOT = Path(__file__).resolve().parents[2]
GPU_KEYS = [key for key, target in TARGETS.items() if target.kind == "gpu"]
needs_cuda_plugin = pytest.mark.skipif(not cuda_compiler_installed(),
                                       reason="needs jax's CUDA plugin: pip install -e '.[gpu-plan]'")


def test_target_names_and_device_counts():
    assert resolve_target("h100") == ("h100", TARGETS["h100"])
    key, target = resolve_target("4xa100-80g")
    assert key == "a100-80g" and target.devices == 4 and target.name == "4 x A100 80 GB"
    assert resolve_target("a100-80g", devices=4)[1] == target
    assert resolve_target("4090")[1].devices == 1  # a key that starts with a digit is still a key


@pytest.mark.parametrize("argv, message", [
    (["--target", "h1000"], "--target: 'h1000' is not one of 4090, t4, l4"),
    (["--target", "2xtpu-v3-8"], "--devices: only GPU targets take a device count; tpu-v3-8 has 8"),
    (["--target", "2xh100", "--devices", "4"], "--target 2xh100 --devices 4: the two device counts differ"),
    (["--target", "h100", "--devices", "-1"], "--devices -1: give a device count of 1 or more"),
])
def test_plan_refuses_a_bad_target_in_one_line(argv, message, capsys):
    assert main(["plan", str(ROOT / "configs/quickstart.yaml"), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_every_gpu_target_ships_a_description_naming_its_sources():
    for key in GPU_KEYS:
        text = gpu_target_config(TARGETS[key])
        assert 'platform_name: "CUDA"' in text and "cuda_compute_capability" in text, key
        assert re.search(r"^# Source|^# - NVIDIA", text, re.M), f"{key}: no source named"


def test_without_the_cuda_plugin_a_gpu_plan_falls_back_to_the_cpu_compiler(tiny_preset, capsys, monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("jax_cuda") else real_find_spec(name, *a))
    argv = ["plan", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "--target", "l4",
            "data.sequence_length=64", "train.batch_size=2", "--no-search", "--json"]
    assert main(argv) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["compiler"] == "cpu" and plan["target_key"] == "l4"
    assert any("compiled with the cpu compiler, not gpu's" in note for note in plan["notes"])
    assert any("pip install 'kerasft[gpu-plan]'" in note for note in plan["notes"])
    assert plan["margin"] == int(plan["usable"] / 0.9) - plan["usable"] and "CUDA context" in plan["margin_covers"]


@pytest.mark.gpu_plan
@needs_cuda_plugin
@pytest.mark.parametrize("key", GPU_KEYS)
def test_each_gpu_description_compiles_with_the_cuda_compiler(key):
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    from kerasft.train.plan import gpu_topology_devices

    devices = gpu_topology_devices(TARGETS[key])
    name = re.search(r'device_description_str: "([^"]+)"', gpu_target_config(TARGETS[key])).group(1)
    assert len(devices) == 1 and devices[0].device_kind == name
    sharding = jax.sharding.NamedSharding(topologies.make_mesh(_topology(key), (1,), ("x",)), jax.sharding.PartitionSpec())
    x = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16, sharding=sharding)
    assert jax.jit(lambda a: a @ a).lower(x).compile().memory_analysis().output_size_in_bytes == 64 * 64 * 2


def _topology(key, count=1):
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                        target_config=gpu_target_config(TARGETS[key]))


def _mlp_step_peak(mesh) -> int:
    """Peak bytes of a bfloat16 MLP training step (two 4096 x 4096 weights, batch 8 x 512 rows) as
    compiled for the devices of `mesh` (the size of issue 19's measurement)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    spec = NamedSharding(mesh, PartitionSpec())
    w = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16, sharding=spec)
    x = jax.ShapeDtypeStruct((8 * 512, 4096), jnp.bfloat16, sharding=spec)

    def step(w1, w2, x):
        grads = jax.grad(lambda ws: jnp.sum(jnp.tanh(x @ ws[0]) @ ws[1]).astype(jnp.float32))((w1, w2))
        return w1 - grads[0], w2 - grads[1]

    m = jax.jit(step, donate_argnums=(0, 1)).lower(w, w, x).compile().memory_analysis()
    return m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes


@pytest.mark.gpu_plan
@needs_cuda_plugin
def test_bfloat16_products_stay_bfloat16_on_cards_with_bfloat16_tensor_cores():
    import jax
    from jax.experimental import topologies

    cpu = _mlp_step_peak(jax.sharding.Mesh(jax.devices("cpu")[:1], ("x",)))
    peaks = {key: _mlp_step_peak(topologies.make_mesh(_topology(key), (1,), ("x",))) for key in ("4090", "h100", "t4")}
    # The CPU compiler upcasts bfloat16 products to float32 (448 MiB here); sm_75 (T4) converts them
    # too, as the card must (480 MiB); sm_89 and sm_90 keep them in bfloat16 (192 MiB).
    assert peaks["4090"] == peaks["h100"] < cpu / 2 and peaks["4090"] < peaks["t4"] / 2, (peaks, cpu)


@pytest.mark.gpu_plan
@needs_cuda_plugin
def test_plan_command_compiles_for_abstract_gpus(tiny_preset, capsys):
    base = ["plan", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "data.sequence_length=64",
            "train.batch_size=4", "--no-search"]
    assert main([*base, "--target", "4090"]) == 0
    out = capsys.readouterr().out
    assert "compiled for cuda on 1 device(s), mesh none auto (NVIDIA GeForce RTX 4090)" in out
    assert "compiled with XLA's CUDA compiler for 1 abstract NVIDIA GeForce RTX 4090 (compute capability 8.9" in out
    assert "the 2.40 GiB held back covers the CUDA context" in out
    # Four GPUs, weights sharded over the model axis: the step compiles with its collectives.
    assert main([*base, "--target", "4xa100-80g", "runtime.mesh=model", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert plan["compiler"] == "cuda" and plan["devices"] == 4 and plan["compiled_for"] == "NVIDIA A100-SXM4-80GB"
    assert plan["target"]["devices"] == 4 and plan["target_key"] == "a100-80g" and plan["mesh"] == "model auto"
    # (--devices 4 resolves to the same target: test_target_names_and_device_counts.)
    import keras

    assert keras.distribution.distribution() is None  # put back: later models land on this machine's devices
