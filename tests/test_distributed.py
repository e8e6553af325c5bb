"""Training under a distributed launcher: 2 CPU processes (gloo), as `accelerate launch` runs it on GPUs."""

import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_two_cpu_ranks_agree_and_the_adapter_is_written_once(tmp_path):
    from llamaduo.models import build_tiny_model

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
