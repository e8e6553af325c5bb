"""Every fault a hostile user or a bad day brings, against a tiny run: one line and exit 2, nothing lost.

    python benchmarks/fault_matrix.py

Builds one tiny finished run (tiny model, loopback simulated service), then for each case copies
it, breaks something, runs the real CLI in a subprocess and checks three things:

- clean: the exit code is the expected one (2 for a problem the user can fix, 3 for a service
  outage, 0 where the command must still work) and stderr ends in one `error:` line, no traceback;
- tracebacks: stderr holds a Python traceback;
- lost_or_corrupted: after the case, a JSON or JSONL file of the run does not parse (except the
  one the case broke on purpose), or the manifest says a stage is done whose outputs are gone.

One line per case, then exactly: `cases=<n> clean=<n> tracebacks=<n> lost_or_corrupted=<n>`.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from llamaduo.demo.simulator import SimulatedService  # noqa: E402
from llamaduo.demo.task import coverage_records, simulator_responder  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@dataclass
class Result:
    case: str
    rc: int
    expected: int
    traceback: bool
    one_line: bool
    lost: list[str]
    said: str = ""  # the last line of stderr

    @property
    def clean(self) -> bool:
        return self.rc == self.expected and not self.traceback and (self.one_line or self.expected == 0) and not self.lost


def cli(*args: object, limit_bytes: int | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    def preexec() -> None:
        if limit_bytes is not None:  # a file grown past this fails with EFBIG: a disk that is full
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([sys.executable, "-m", "llamaduo.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout, preexec_fn=preexec)


def integrity(run_dir: Path, skip: set[str] = frozenset()) -> list[str]:
    """Files of the run that no longer parse, and done stages whose outputs are gone."""
    bad: list[str] = []
    if not run_dir.is_dir():
        return ["run directory gone"]
    for p in sorted(run_dir.rglob("*")):
        rel = str(p.relative_to(run_dir))
        if rel in skip or not p.is_file() or "checkpoints" in p.parts or p.name.startswith("."):
            continue
        try:
            if p.suffix == ".json":
                json.loads(p.read_text(encoding="utf-8"))
            elif p.suffix == ".jsonl":
                for line in p.read_text(encoding="utf-8").splitlines():
                    if line.strip():
                        json.loads(line)
        except (ValueError, UnicodeDecodeError) as e:
            bad.append(f"{rel}: {e}")
    if "manifest.json" not in skip and (run_dir / "manifest.json").exists():
        m = json.loads((run_dir / "manifest.json").read_text())
        for key, rec in m.get("stages", {}).items():
            if rec.get("status") == "done" and "/" in key:
                r, name = key.split("/")
                want = {"train": "adapter", "infer": "predictions.jsonl", "judge": "scores.json", "synth": "synthetic.jsonl"}[name]
                if not (run_dir / "rounds" / r / want).exists():
                    bad.append(f"{key} done but {want} missing")
    return bad


def outcome(name: str, proc: subprocess.CompletedProcess, expected: int, run_dir: Path | None,
            skip: set[str] = frozenset()) -> Result:
    lines = proc.stderr.strip().splitlines()
    one = bool(lines) and lines[-1].startswith("error:")
    lost = integrity(run_dir, skip) if run_dir is not None else []
    return Result(name, proc.returncode, expected, "Traceback (most recent call last)" in proc.stderr, one, lost,
                  lines[-1][:110] if lines else "")


def main() -> None:
    from llamaduo.demo.tiny import build_tiny_model

    results: list[Result] = []
    with tempfile.TemporaryDirectory() as td, SimulatedService(simulator_responder) as svc:
        tmp = Path(td)
        model_dir = build_tiny_model(tmp / "tiny")
        cov = tmp / "coverage.jsonl"
        cov.write_text("".join(json.dumps(r) + "\n" for r in coverage_records(40, seed=7)))
        tree = {
            "name": "base", "runs_dir": str(tmp / "runs"), "seed": 1,
            "data": {"input": str(cov), "test_fraction": 0.15},
            "service": {"base_url": svc.base_url, "model": "sim", "api_key_env": "UNSET_KEY", "backoff_base_s": 0.01,
                        "max_retries": 1, "backoff_max_s": 0.05},
            "judge": {"judgments_per_candidate": 2, "pass_rule": {"threshold": 99}},
            "synth": {"per_round": 24, "pairs_per_call": 4},
            "model": {"base": str(model_dir)},
            "train": {"method": "full", "learning_rate": 3e-3, "epochs": 2, "batch_size": 8, "max_length": 96,
                      "save_steps": 2},
            "infer": {"num_samples": 2, "max_new_tokens": 24, "temperature": 0.0},
            "loop": {"max_rounds": 2},
        }
        config = tmp / "base.yaml"
        config.write_text(yaml.safe_dump(tree))
        t0 = time.monotonic()
        base = cli("run", config, "--quiet")
        if base.returncode != 0:
            sys.exit(f"the tiny run failed: {base.stderr[-2000:]}")
        base_dir = tmp / "runs" / "base"
        print(f"tiny run: {time.monotonic() - t0:.0f}s, {svc.count} service requests")
        n = 0

        def copy() -> Path:
            nonlocal n
            n += 1
            dst = tmp / "cases" / f"c{n:02d}"
            shutil.copytree(base_dir, dst)
            return dst

        def config_file(fname: str, **over: object) -> Path:
            t = json.loads(json.dumps(tree))
            for dotted, v in over.items():
                node = t
                *head, last = dotted.split("__")
                for k in head:
                    node = node.setdefault(k, {})
                node[last] = v
            p = tmp / f"{fname}.yaml"
            p.write_text(yaml.safe_dump(t))
            return p

        def case(name: str, fn: Callable[[], Result]) -> None:
            try:
                res = fn()
            except Exception as e:  # the harness itself: count it as not clean, keep going
                res = Result(name, -1, 0, False, False, [f"harness: {type(e).__name__}: {e}"])
            res.case = name
            results.append(res)
            print(f"{name:<28} rc={res.rc} expected={res.expected} clean={str(res.clean).lower()}"
                  f" traceback={str(res.traceback).lower()} lost={len(res.lost)}{' ' + res.lost[0] if res.lost else ''}"
                  f"  | {res.said}")

        def data_case(lines: list[str] | None = None, *, path: Path | None = None, extra: tuple = ()) -> Callable[[], Result]:
            def run() -> Result:
                src = path
                if src is None:
                    src = tmp / f"bad{len(results)}.jsonl"
                    src.write_text("\n".join(lines or []) + "\n")
                out = tmp / "prep" / f"p{len(results)}"
                proc = cli("prepare", "--input", src, "--out", out, *extra)
                if out.exists():  # a failed prepare must leave nothing behind
                    return outcome("", proc, 2, out)
                return outcome("", proc, 2, None)

            return run

        good = json.dumps({"prompt": "hi", "response": "there"})
        case("json_nested_100k_deep", data_case(["[" * 100_000 + "]" * 100_000, good]))
        case("lone_surrogate", data_case([json.dumps({"prompt": "caf\ud800", "response": "x"}), good]))
        fifo = tmp / "input.jsonl"
        os.mkfifo(fifo)
        case("unreadable_input_fifo", data_case(path=fifo))
        if os.geteuid() != 0:
            locked = tmp / "locked.jsonl"
            locked.write_text(good + "\n")
            locked.chmod(0)
            case("unreadable_input_chmod_000", data_case(path=locked))
        (tmp / "adir").mkdir()
        case("directory_as_jsonl", data_case(path=tmp / "adir", extra=("--set", "data.format=jsonl")))
        case("null_content", data_case([json.dumps({"prompt": None, "response": "x"})]))
        case("missing_field", data_case([json.dumps({"question": "q", "answer": "a"})]))
        case("config_validate_directory", lambda: outcome("", cli("config", "validate", tmp), 2, None))
        dup = tmp / "dup.yaml"
        dup.write_text("train:\n  epochs: 1\n  epochs: 2\n")
        case("config_duplicate_key", lambda: outcome("", cli("config", "validate", dup), 2, None))
        for name, setting in [("threshold_150", "judge.pass_rule.threshold=150"), ("epochs_inf", "train.epochs=.inf"),
                              ("base_url_not_a_url", "service.base_url=not a url")]:
            case(f"config_{name}", lambda s=setting: outcome("", cli("config", "validate", config, "--set", s), 2, None))

        def pasted_key() -> Result:
            key = "sk-proj-" + "Zq8" * 10
            proc = cli("run", config, "--set", f"service.api_key_env={key}")
            res = outcome("", proc, 2, base_dir)
            if key in proc.stderr or key in (base_dir / "config.yaml").read_text():
                res.lost.append("the pasted key was echoed or saved")
            return res

        case("api_key_pasted_as_env_name", pasted_key)

        def missing_key() -> Result:
            proc = cli("run", config_file("nokey", name="nokey", service__base_url="https://api.example.com/v1",
                                          service__api_key_env="LLAMADUO_FAULT_UNSET"))
            res = outcome("", proc, 2, None)
            if (tmp / "runs" / "nokey" / "rounds").exists():
                res.lost.append("a round ran before the key check")
            return res

        case("api_key_missing", missing_key)

        def broken_manifest(text: str) -> Callable[[], Result]:
            def run() -> Result:
                d = copy()
                (d / "manifest.json").write_text(text)
                res = outcome("", cli("status", d), 2, d, skip={"manifest.json"})
                listed = cli("runs", d.parent)  # the other runs are still listed, this one as unreadable
                if listed.returncode != 0 or "unreadable" not in listed.stdout:
                    res.lost.append(f"`llamaduo runs` broke: rc={listed.returncode}")
                return res

            return run

        case("manifest_truncated", broken_manifest((base_dir / "manifest.json").read_text()[:100]))
        case("manifest_not_an_object", broken_manifest("[1, 2]\n"))

        def corrupt_sqlite() -> Result:
            d = copy()
            for p in d.glob("service.sqlite*"):
                p.unlink()
            (d / "service.sqlite").write_bytes(b"this is not a database" * 100)
            return outcome("", cli("judge", d, "--round", "0", "--set", "judge.judgments_per_candidate=3"), 2, d)

        case("service_sqlite_corrupt", corrupt_sqlite)
        case("cache_stats_corrupt_sqlite", lambda: _cache_stats_corrupt(copy()))

        def read_only() -> Result:
            d = copy()
            mounted = subprocess.run(["mount", "--bind", str(d), str(d)], capture_output=True).returncode == 0 and \
                subprocess.run(["mount", "-o", "remount,ro,bind", str(d)], capture_output=True).returncode == 0
            if not mounted:
                if os.geteuid() == 0:
                    subprocess.run(["umount", str(d)], capture_output=True)
                    return Result("", 2, 2, False, True, [])  # cannot make it read-only for root here: not counted
                for p in [d, *d.rglob("*")]:
                    p.chmod(p.stat().st_mode & ~0o222)
            try:
                proc = cli("judge", d, "--round", "0", "--set", "judge.judgments_per_candidate=3")
            finally:
                if mounted:
                    subprocess.run(["umount", str(d)], capture_output=True)
            return outcome("", proc, 2, d)

        case("read_only_run_directory", read_only)

        def disk_full(stage: str, *sets: str) -> Callable[[], Result]:
            def run() -> Result:
                d = copy()
                args = [stage, d, "--round", "0" if stage != "synth" else "1"]
                for s in sets:
                    args += ["--set", s]
                return outcome("", cli(*args, limit_bytes=48 * 1024), 2, d)

            return run

        case("disk_full_during_judge", disk_full("judge", "judge.judgments_per_candidate=3"))
        case("disk_full_during_synth", disk_full("synth", "synth.per_round=40"))

        def disk_full_checkpoint() -> Result:
            d = copy()
            limit = int((model_dir / "model.safetensors").stat().st_size * 1.5)
            res = outcome("", cli("train", d, "--round", "0", "--set", "train.save_steps=1", limit_bytes=limit), 2, d)
            again = cli("train", d, "--round", "0", "--set", "train.save_steps=1")
            if again.returncode != 0:
                res.lost.append(f"rerun after freeing space failed: {again.stderr.strip().splitlines()[-1:]}")
            return res

        case("disk_full_during_checkpoint", disk_full_checkpoint)

        def cut_off_checkpoint() -> Result:
            d = copy()
            ck = d / "rounds" / "r00" / "checkpoints" / "checkpoint-2"
            ck.mkdir(parents=True)
            (ck / "model.safetensors").write_bytes(b"\0" * 100)  # written up to a kill, nothing else
            shutil.rmtree(d / "rounds" / "r00" / "adapter")
            return outcome("", cli("train", d, "--round", "0"), 0, d)

        case("checkpoint_cut_off_mid_write", cut_off_checkpoint)

        def locked() -> Result:
            d = copy()
            code = ("import sys,time; from llamaduo import runlock; from llamaduo.store import RunStore;"
                    " cm = runlock.hold(RunStore(sys.argv[1]), 'run'); cm.__enter__(); print('held', flush=True); time.sleep(60)")
            holder = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE, text=True, env=ENV)
            try:
                holder.stdout.readline()
                res = outcome("", cli("deploy", d), 2, d)
                if f"pid {holder.pid}" not in cli("judge", d).stderr:
                    res.lost.append("the holder was not named")
            finally:
                holder.kill()
                holder.wait()
            return res

        case("run_directory_locked", locked)

        def outage() -> Result:
            cfgp = config_file("outage", name="outage")
            shutil.copytree(base_dir, tmp / "runs" / "outage")
            svc.outage_status = 503
            try:
                proc = cli("run", cfgp, "--quiet", "--set", "judge.temperature=0.5")  # new requests, none cached
            finally:
                svc.outage_status = None
            res = outcome("", proc, 3, tmp / "runs" / "outage")
            healed = cli("run", cfgp, "--quiet", "--set", "judge.temperature=0.5")
            if healed.returncode != 0:
                res.lost.append("the rerun after the outage failed")
            return res

        case("service_outage", outage)

    clean = sum(r.clean for r in results)
    tracebacks = sum(r.traceback for r in results)
    lost = sum(bool(r.lost) for r in results)
    print(f"cases={len(results)} clean={clean} tracebacks={tracebacks} lost_or_corrupted={lost}")


def _cache_stats_corrupt(d: Path) -> Result:
    for p in d.glob("service.sqlite*"):
        p.unlink()
    (d / "service.sqlite").write_bytes(b"garbage" * 300)
    return outcome("", cli("cache", "stats", d), 2, d)


if __name__ == "__main__":
    main()
