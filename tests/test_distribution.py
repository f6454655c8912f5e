"""runtime.mesh: the tiny model trains under data and model parallel layouts on 8 simulated CPU
devices and follows the single-device loss curve."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent

# jax fixes the device count at import, so the 8 devices need a fresh process. The step is
# wrapped to record where its inputs live on the first call.
SCRIPT = """
import json, sys
import kerasft.train.loop as loop
from kerasft.cli import main

seen = {}
make_train_step = loop.make_train_step

def recording_make_train_step(*args, **kwargs):
    step = make_train_step(*args, **kwargs)
    def wrapped(trainable, opt_state, non_trainable, batch):
        if not seen:
            sharding = getattr(batch["token_ids"], "sharding", None)  # numpy without a distribution
            seen["devices"] = len(sharding.device_set) if sharding else 1
            seen["batch_spec"] = list(sharding.spec) if sharding else None
            seen["weight_specs"] = sorted({json.dumps(list(getattr(x.sharding, "spec", ()))) for x in non_trainable})
        return step(trainable, opt_state, non_trainable, batch)
    return wrapped

loop.make_train_step = recording_make_train_step
out = sys.argv[1]
for layout in sys.argv[2:]:
    mesh, shape = layout.split(":")
    seen.clear()
    code = main([*ARGV, f"name={mesh}-{shape}", f"runtime.mesh={mesh}", f"runtime.mesh_shape={shape}"])
    log = [json.loads(line) for line in open(f"{out}/{mesh}-{shape}/metrics.jsonl")]
    print("RESULT", json.dumps({"layout": layout, "code": code, "losses": [r["loss"] for r in log], **seen}), flush=True)
"""

def _train_layouts(tiny_preset, tmp_path, layouts):
    lines = [json.dumps({"prompt": f"Pregunta {i}", "response": f"Respuesta número {i}."}) for i in range(16)]
    (tmp_path / "short.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            f"data.train={tmp_path}/short.jsonl", "data.sequence_length=64", "train.max_steps=3",
            "train.batch_size=8", "train.epochs=2", "train.learning_rate=1e-2", "train.warmup_ratio=0",
            "train.checkpoint_every=0", "lora.targets=[query,value,ffw_linear]"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    done = subprocess.run([sys.executable, "-c", f"ARGV = {argv!r}\n" + SCRIPT, str(tmp_path), *layouts],
                          capture_output=True, text=True, timeout=600, env=env)
    results = {r["layout"]: r for r in (json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT "))}
    assert set(results) == set(layouts), done.stdout[-2000:] + done.stderr[-3000:]
    assert all(r["code"] == 0 for r in results.values())
    single = results.pop("none:auto")
    assert single["devices"] == 1 and len(single["losses"]) == 3
    assert single["losses"][-1] < single["losses"][0]
    for layout, result in results.items():
        assert result["devices"] == 8, result
        np.testing.assert_allclose(result["losses"], single["losses"], rtol=2e-4, err_msg=layout)
    return results


def test_model_parallel_follows_the_single_device_loss_curve(tiny_preset, tmp_path):
    result = _train_layouts(tiny_preset, tmp_path, ["none:auto", "model:2x4"])["model:2x4"]
    assert result["batch_spec"] == ["batch", None]
    specs = [json.loads(spec) for spec in result["weight_specs"]]
    assert ["batch", "model"] in specs  # feed-forward gating kernels (hidden, width)
    assert ["model", "batch", None] in specs  # 4 query heads over the 4-way model axis
    # The one key/value head is replicated instead of raising IndivisibleError.
    assert [None, "batch", None] in specs


@pytest.mark.slow
def test_every_layout_follows_the_single_device_loss_curve(tiny_preset, tmp_path):
    results = _train_layouts(tiny_preset, tmp_path, ["none:auto", "data:auto", "model:1x8", "model:2x4"])
    assert results["data:auto"]["batch_spec"] == ["batch", None]
    assert all(set(json.loads(spec)) <= {None} for spec in results["data:auto"]["weight_specs"])  # replicated
    specs = [json.loads(spec) for spec in results["model:1x8"]["weight_specs"]]
    # 4 query heads cannot split 8 ways: replicated on the head axis like the key/value head.
    assert ["batch", "model"] in specs and ["model", "batch", None] not in specs and [None, "batch", None] in specs


def test_mesh_shape_must_match_the_devices(tiny_preset, tmp_path, capsys):
    from kerasft.cli import main

    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            f"data.train={ROOT}/data/qa_es/heldout.json", "train.max_steps=1", "runtime.mesh=model",
            "runtime.mesh_shape=3x2"]
    assert main(argv) == 2
    assert "runtime.mesh_shape: 3x2 needs 6 devices, this machine has 1" in capsys.readouterr().err
    assert not (tmp_path / "quickstart").exists()
