"""Train the tiny model with a checkpoint every 2 steps, under a fault (launched by tests/test_checkpoints.py).

argv: model_dir run_root mode [limit]. Modes: `fsize-kill` (a file grown past `limit` bytes kills the
process mid-write, SIGXFSZ's default), `fsize-full` (SIGXFSZ ignored: the write fails with EFBIG, as on a
full disk), `kill-at-4` (SIGKILL during the save of checkpoint-4, before it is marked complete), `none`.
"""

import os
import resource
import signal
import sys
from pathlib import Path

from transformers import TrainerCallback

from llamaduo.errors import UserError
from llamaduo.train import train
from tests.tiny import tiny_config, tiny_examples

model_dir, root, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]


class KillDuringSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)


callbacks = [KillDuringSave()] if mode == "kill-at-4" else []
if mode.startswith("fsize"):
    # Python starts with SIGXFSZ ignored: a write past the limit then fails with EFBIG (a full disk).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN if mode == "fsize-full" else signal.SIG_DFL)
    limit = int(sys.argv[4])
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
cfg = tiny_config(model_dir, root, method="full", max_steps=6, save_steps=2, batch_size=2)
try:
    res = train(cfg, tiny_examples(16), root / "r00" / "adapter", progress=False, callbacks=callbacks)
except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
print(f"resumed_from_step={res.resumed_from_step} steps={res.steps}")
