"""A pre-emption at scale on CPU: SIGTERM to DeepSpeed's per-node launcher, then the 30 s.

DeepSpeed's per-node ``deepspeed.launcher.launch`` forwards a SIGTERM to its ranks and SIGKILLs
them 30 s later (what a scheduler's pre-emption does through SLURM). This starts the recipe at the
TinyLlama width with ``--layers`` layers (8: 483M parameters) on 2 CPU ranks through the real
launcher, waits for ``--after-steps`` steps, sends SIGTERM to the launch process, and prints (JSON
to ``--out``): seconds from the signal to the ranks' exit, whether they exited by themselves
(3) or were killed, whether the stop's checkpoint is complete (``latest`` names it, its
``trainer_state.json`` is there), seconds from the signal to that (``seconds_signal_to_checkpoint``:
the ranks save the last completed step at the signal, beside the step in flight), and the ranks'
own lines on the save. Not a test; run once:

    python benchmarks/bench_preemption.py --data runs/demo/data --layers 8 --out preempt.json

``--data`` is a folder with ``text_document`` and ``tokenizer.model`` (what ``tinyllama-demo``
writes under ``runs/demo/data``).
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _recipe(work: Path, data: Path, layers: int, seq: int) -> Path:
    import yaml

    tree = {
        "model": {"preset": "tinyllama-1.1b", "num_layers": layers, "seq_length": seq},
        "parallel": {"tensor_parallel_size": 1, "zero_stage": 3, "expected_world_size": 2},
        "data": {"blend": f"1.0 {data / 'text_document'}", "tokenizer_model": str(data / "tokenizer.model")},
        "optimizer": {"lr": 1e-4, "min_lr": 1e-5, "warmup_tokens": 2 * seq},
        "train": {"train_tokens": 1000 * 2 * seq, "global_batch_tokens": 2 * seq, "micro_batch_size": 1,
                  "precision": "fp32"},
        "checkpoint": {"save_dir": str(work / "run"), "save_interval_steps": 100000},
        "logging": {"log_interval_steps": 1},
    }
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _steps(save_dir: Path) -> int:
    metrics = save_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum(1 for line in metrics.read_text().splitlines() if '"train_loss"' in line)


def main(argv=None) -> int:
    import psutil

    from megatron_tinyllama.launch import deepspeed_command, free_port, launcher_env, write_local_hostfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--after-steps", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=64,
                        help="short sequences keep a CPU step (the rest of which the stop waits for) "
                             "well inside the 30 s; the save does not depend on it")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the steps")
    parser.add_argument("--out", default="preemption.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        recipe = _recipe(work, args.data.resolve(), args.layers, args.seq_length)
        hostfile = write_local_hostfile(work / "hostfile", 1, 2)
        log_path = work / "launch.log"
        with open(log_path, "w") as log:
            runner = subprocess.Popen(deepspeed_command(hostfile, 0, free_port(), recipe), env=launcher_env(),
                                      stdout=log, stderr=subprocess.STDOUT)
            began = time.monotonic()
            while _steps(work / "run") < args.after_steps and runner.poll() is None:
                if time.monotonic() - began > args.timeout:
                    runner.kill()
                    raise SystemExit(f"no {args.after_steps} steps within {args.timeout} s")
                time.sleep(0.5)
            launch = next(p for p in psutil.Process(runner.pid).children(recursive=True)
                          if "deepspeed.launcher.launch" in " ".join(p.cmdline()))
            ranks = [p for p in launch.children() if "megatron_tinyllama.train.pretrain" in " ".join(p.cmdline())]
            steps_before = _steps(work / "run")
            step_seconds = (time.monotonic() - began) / max(1, steps_before)  # build included: an upper bound
            signalled = time.monotonic()
            launch.send_signal(signal.SIGTERM)
            latest_file, to_checkpoint = work / "run" / "latest", None
            while time.monotonic() - signalled < 60:
                if to_checkpoint is None and latest_file.is_file():
                    tag = latest_file.read_text().strip()
                    if (work / "run" / tag / "trainer_state.json").is_file():
                        to_checkpoint = time.monotonic() - signalled
                if not any(rank.is_running() and rank.status() != psutil.STATUS_ZOMBIE for rank in ranks):
                    break
                time.sleep(0.1)
            _, alive = psutil.wait_procs(ranks, timeout=1)
            ended = time.monotonic() - signalled
            codes = []
            for rank in ranks:
                try:
                    codes.append(rank.wait(0))
                except psutil.NoSuchProcess:
                    codes.append(None)
            runner.wait(timeout=60)
        text = log_path.read_text(errors="replace")
        Path(args.out).with_suffix(".launch.log").write_text(text)  # every line, timestamps included
        save_dir = work / "run"
        latest = (save_dir / "latest").read_text().strip() if (save_dir / "latest").is_file() else None
        result = {
            "layers": args.layers, "steps_before_signal": steps_before,
            "seconds_per_step_upper_bound": round(step_seconds, 1),
            "seconds_signal_to_exit": round(ended, 2), "rank_exit_codes": codes,
            "seconds_signal_to_checkpoint": to_checkpoint and round(to_checkpoint, 2),
            "ranks_alive_after_60_s": len(alive), "latest": latest,
            "checkpoint_complete": bool(latest and (save_dir / latest / "trainer_state.json").is_file()),
            "save_lines": re.findall(r"(?:checkpoint \S+: (?:staged|saving).*|saved checkpoint.*)", text)[-4:],
            "stop_lines": re.findall(r".*stopping after this step.*|.*stopped at step.*", text)[-4:],
            "seq_length": args.seq_length,
        }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
