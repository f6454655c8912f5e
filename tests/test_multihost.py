"""runtime.distributed: two local CPU processes joined by JAX's distributed runtime (localhost
coordinator, gloo collectives) train the tiny preset under mesh data and follow the
single-process loss curve on the same global batch; only process 0 writes the run dir, and both
write the orbax checkpoint together."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kerasft.cli import main

ROOT = Path(__file__).resolve().parent.parent

# Each process records the files it creates or writes under the test folder (Python's audit
# hook sees every open/mkdir/rename the process makes through Python), then runs the CLI.
SCRIPT = """
import json, os, sys
root = os.path.realpath(sys.argv[1])
written = set()

def audit(event, args):
    if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        mode, flags = args[1], args[2] or 0
        if (mode and any(c in mode for c in "wax+")) or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            written.add(os.path.realpath(os.fsdecode(args[0])))
    elif event in ("os.mkdir", "os.rename", "os.remove", "shutil.rmtree") and isinstance(args[0], (str, os.PathLike)):
        if event != "os.mkdir" or not os.path.exists(args[0]):  # mkdir(exist_ok=True) of a folder there is no write
            written.add(os.path.realpath(os.fsdecode(args[0])))

sys.addaudithook(audit)
from kerasft.cli import main
code = main(sys.argv[2:])
mine = sorted(os.path.relpath(p, root) for p in written if p.startswith(root + os.sep))
print("RESULT", json.dumps({"code": code, "written": mine}), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _argv(tiny_preset, tmp_path, name, mesh):
    return ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}/runs",
            f"name={name}", f"data.train={tmp_path}/short.jsonl", "data.sequence_length=64", "train.max_steps=3",
            "train.batch_size=8", "train.epochs=2", "train.learning_rate=1e-2", "train.warmup_ratio=0",
            "train.checkpoint_every=2", "lora.targets=[query,value,ffw_linear]", f"runtime.mesh={mesh}"]


def _restore(directory: Path, step: int, like=None):
    import jax
    import orbax.checkpoint as ocp

    target = None
    if like is not None:  # onto this process's one device, whatever mesh wrote it
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), like)
    return ocp.StandardCheckpointer().restore((directory / str(step) / "state").resolve(), target)


def test_two_processes_follow_the_single_process_loss_curve(tiny_preset, tmp_path):
    lines = [json.dumps({"prompt": f"Pregunta {i}", "response": f"Respuesta número {i}."}) for i in range(16)]
    (tmp_path / "short.jsonl").write_text("\n".join(lines) + "\n")
    port = _free_port()
    procs = []
    for index in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index),
                   KERASFT_CACHE=str(tmp_path / "cache"))  # one cache, both writing the same token set
        procs.append(subprocess.Popen([sys.executable, "-c", SCRIPT, str(tmp_path),
                                       *_argv(tiny_preset, tmp_path, "multi", "data")],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    # Meanwhile the same global batches on one device, in this process.
    assert main(_argv(tiny_preset, tmp_path, "single", "none")) == 0
    outputs = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        assert results and results[0]["code"] == 0, out[-2000:] + err[-3000:]
        outputs.append((out, results[0]["written"]))

    assert "distributed: process 0 of 2, 2 local of 4 devices" in outputs[0][0]
    assert "distributed: process 1 of 2, 2 local of 4 devices" in outputs[1][0]
    runs = tmp_path / "runs"
    single = [json.loads(line)["loss"] for line in (runs / "single/metrics.jsonl").read_text().splitlines()]
    multi = [json.loads(line)["loss"] for line in (runs / "multi/metrics.jsonl").read_text().splitlines()]
    assert len(single) == 3 and single[-1] < single[0]
    np.testing.assert_allclose(multi, single, rtol=2e-4)

    # Process 0 wrote the run's files; process 1 wrote nothing outside the shared checkpoints.
    written0, written1 = outputs[0][1], outputs[1][1]
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "data/train.jsonl"):
        assert f"runs/multi/{name}" in written0, written0
    assert (runs / "multi/adapter/adapter.safetensors").is_file()  # written by safetensors' Rust, unseen by the hook
    stray = [p for p in written1 if not p.startswith("runs/multi/checkpoints") and p.split("/")[0] != "cache"]
    assert not stray, stray
    assert not list((tmp_path / "cache" / "tokens").glob("*.tmp"))  # the process that lost the race cleaned up

    # The checkpoint the two processes wrote together holds the single-process run's state.
    checkpoints = sorted(p.name for p in (runs / "multi/checkpoints").iterdir() if p.name.isdigit())
    assert checkpoints == ["2", "3"]
    import jax

    reference = _restore(runs / "single/checkpoints", 3)
    ours = _restore(runs / "multi/checkpoints", 3, like=reference)
    assert jax.tree.structure(ours) == jax.tree.structure(reference)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(reference)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("override, message", [
    ("runtime.distributed=maybe", "runtime.distributed: 'maybe' is not one of auto, on, off"),
    ("runtime.coordinator_address=localhost", "runtime.coordinator_address: 'localhost' must be host:port"),
    ("runtime.process_id=2", "runtime.process_id: 2 must be -1 (from the environment) or 0..1"),
])
def test_bad_distributed_settings_are_named(override, message, tmp_path, capsys):
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"output_dir={tmp_path}", "runtime.num_processes=2", override]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_auto_starts_only_for_a_multi_process_environment(monkeypatch):
    from kerasft.config import RuntimeConfig
    from kerasft.runtime import multi_process_environment

    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "SLURM_NTASKS", "SLURM_JOB_ID",
                 "OMPI_MCA_orte_hnp_uri", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES"):
        monkeypatch.delenv(name, raising=False)
    assert not multi_process_environment(RuntimeConfig())
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")  # a single-host TPU VM (v3-8)
    assert not multi_process_environment(RuntimeConfig())
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t1v-n-0,t1v-n-1")  # a pod slice of two hosts
    assert multi_process_environment(RuntimeConfig())
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    assert multi_process_environment(RuntimeConfig(coordinator_address="10.0.0.2:1234"))
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    assert multi_process_environment(RuntimeConfig())
    monkeypatch.setenv("JAX_NUM_PROCESSES", "many")
    with pytest.raises(Exception, match="JAX_NUM_PROCESSES='many': expected a whole number"):
        multi_process_environment(RuntimeConfig())


def test_mesh_none_is_refused_in_a_multi_process_job(monkeypatch):
    import kerasft.runtime as runtime
    from kerasft.config import RuntimeConfig
    from kerasft.errors import KerasftError

    monkeypatch.setattr(runtime, "init_distributed", lambda cfg: True)
    monkeypatch.setattr(runtime, "process_count", lambda: 2)
    with pytest.raises(KerasftError, match="runtime.mesh: none in a job of 2 processes would train the whole batch"):
        runtime.set_distribution(RuntimeConfig(mesh="none"))
