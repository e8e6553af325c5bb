"""Training under a distributed launcher: 2 CPU processes (gloo), as `accelerate launch` runs it on GPUs."""

import hashlib
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_two_cpu_ranks_agree_and_the_adapter_is_written_once(tmp_path):
    from llamaduo.demo.tiny import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "round"
    with socket.socket() as s:  # a free loopback port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(port),
         str(HERE / "ddp_worker.py"), str(model_dir), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0] == "2"  # really two processes
    assert ranks[0][2] == ranks[1][2]  # gradients were all-reduced: identical LoRA weights
    assert (out / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "rank0.txt", "rank1.txt"]  # no temp copies


def test_an_fsdp_launch_gathers_the_adapter_on_every_rank_and_writes_it_once(tmp_path):
    """`accelerate launch` with the shipped FSDP config, run on 2 CPU processes.

    On CPU accelerate runs an FSDP config's ranks as DDP, so this proves llamaduo's FSDP save path
    (every rank joins `save_model`, the main one writes) and the launch itself, not the sharding.
    """
    import yaml
    from safetensors.torch import load_file

    from llamaduo.demo.tiny import build_tiny_model

    cfg = yaml.safe_load((HERE.parent / "examples" / "accelerate" / "fsdp.yaml").read_text())
    cfg.update(num_processes=2, use_cpu=True, mixed_precision="no")
    cfg["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] = False
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(cfg))
    model_dir = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "round"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp_cpu.yaml"),
         "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         str(HERE / "ddp_worker.py"), str(model_dir), str(out)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0] == "2" and ranks[0][2] == ranks[1][2]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "rank0.txt", "rank1.txt"]
    assert not (out / "adapter" / "training_args.bin").exists()
    # What was written is what the ranks trained (the worker hashes the LoRA layers of the model it
    # passed in, whose names lack the PEFT wrapper's prefix and carry the adapter's name).
    written = load_file(out / "adapter" / "adapter_model.safetensors")
    saved = {k.removeprefix("base_model.model.").replace(".weight", ".default.weight"): v for k, v in written.items()}
    h = hashlib.sha256()
    for name, tensor in sorted(saved.items()):
        h.update(name.encode())
        h.update(tensor.float().numpy().tobytes())
    assert h.hexdigest() == ranks[0][2]


def test_two_machines_each_with_its_own_process_agree_and_write_the_adapter_once(tmp_path):
    """The shipped multi-node config, run as two "machines" (machine ranks 0 and 1, each its own
    `accelerate launch`) on one host over gloo: the rendezvous, rank assignment and the single save
    are the multi-node path; only the transport differs from GPUs on two hosts."""
    import yaml

    from llamaduo.demo.tiny import build_tiny_model

    cfg = yaml.safe_load((HERE.parent / "examples" / "accelerate" / "multinode.yaml").read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg.update(num_processes=2, use_cpu=True, mixed_precision="no", main_process_ip="127.0.0.1", main_process_port=port)
    (tmp_path / "two_machines.yaml").write_text(yaml.safe_dump(cfg))
    model_dir = build_tiny_model(tmp_path / "tiny")
    out = tmp_path / "round"
    machines = [
        subprocess.Popen(
            [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "two_machines.yaml"),
             "--machine_rank", str(rank), "--num_cpu_threads_per_process", "1",
             str(HERE / "ddp_worker.py"), str(model_dir), str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for rank in (0, 1)
    ]
    logs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], "\n".join(log[-2000:] for log in logs)
    ranks = [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]
    assert ranks[0][0] == ranks[1][0] == "2"  # one world of two processes, one per machine
    assert ranks[0][2] == ranks[1][2]  # gradients all-reduced across the machines
    assert (out / "adapter" / "adapter_config.json").exists()
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "rank0.txt", "rank1.txt"]
