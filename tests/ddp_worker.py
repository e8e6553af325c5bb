"""One rank of the 2-process training test (launched by tests/test_distributed.py)."""

import hashlib
import os
import sys
from pathlib import Path

from llamaduo import models
from llamaduo.config import from_dict
from llamaduo.data import make_example
from llamaduo.demo.task import coverage_records
from llamaduo.train import train

model_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
examples = [make_example(r["prompt"], r["response"], r["category"]) for r in coverage_records(32, 1)]
cfg = from_dict({"model": {"base": str(model_dir)}, "train": {"max_steps": 4, "batch_size": 4, "max_length": 96}})
model, tokenizer = models.load_model(cfg.model, for_training=True)
res = train(cfg, examples, out / "adapter", model=model, tokenizer=tokenizer, progress=False)
# LoRA layers are injected into `model` in place: hash what this rank ended with.
h = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    if "lora_" in name:
        h.update(name.encode())
        h.update(tensor.detach().float().numpy().tobytes())
rank = os.environ.get("RANK", "0")
(out / f"rank{rank}.txt").write_text(f"{os.environ.get('WORLD_SIZE')} {res.steps} {h.hexdigest()}\n")
