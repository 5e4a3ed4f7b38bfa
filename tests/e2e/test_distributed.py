"""Several processes on CPU through the launchers people use (torchrun, accelerate launch) with the gloo backend:
one run folder, the recipe's step split across ranks with the loss of one process, every prediction once and
equal to one process's, a dying rank ends the job and the rerun resumes, two "machines" on one host."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, cli_env, overridden, run_cli

pytestmark = pytest.mark.slow

TINY = ROOT / "recipes" / "tiny" / "xsum_tiny.yaml"
BIN = Path(sys.executable).parent
# Few steps and examples: what is compared is the arithmetic of the split, not what the model learns.
SMALL = ["training.max_steps=4", "training.logging_steps=1", "data.eval_samples=8", "data.test_samples=12",
         "training.eval_every=null"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # Two torch processes on the machine: one thread each, so they don't oversubscribe the cores.
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


def launch(launcher: list[str], *args, timeout: int = 3600) -> subprocess.CompletedProcess:
    return subprocess.run([*launcher, "-m", "runner", *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          env=_env(), timeout=timeout)


def torchrun(n: int = 2) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", str(n), "--master-port", str(_free_port())]


def run_folders(out: Path) -> list[Path]:
    root = out / "xsum_tiny"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name[0].isdigit()) if root.is_dir() else []


def ok(result):
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def predictions(path: Path) -> list[tuple[int, str]]:
    return [(r["index"], r["prediction"]) for r in map(json.loads, path.read_text().splitlines())]


def train_loss(run_dir: Path) -> float:
    return json.loads((run_dir / "env.json").read_text())["train_loss"]


@pytest.fixture(scope="module")
def one_and_two(tiny, tmp_path_factory):
    """The same recipe trained in one process and under torchrun with two."""
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    ok(run_cli("train", TINY, f"output_dir={one}", *SMALL))
    result = ok(launch(torchrun(2), "train", TINY, f"output_dir={two}", *SMALL))
    return run_folders(one), run_folders(two), result


def test_two_processes_make_one_run_with_the_loss_of_one(one_and_two):
    one, two, result = one_and_two
    assert len(one) == 1 and len(two) == 1, (one, two)  # one run folder, not one per rank
    run = two[0]
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["distributed"] == "ddp"
    assert [r["rank"] for r in env["ranks"]] == [0, 1]
    # 16 examples per step as written: 8 on each rank, no accumulation.
    assert env["speed"]["micro_batch_size"] * env["speed"]["gradient_accumulation_steps"] * 2 == 16
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    assert recipe["training"]["micro_batch_size"] == 16  # the recipe as written, not the per-rank split
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == [1, 2, 3, 4]  # one log, written once
    # Same data order, same LoRA init, gradients averaged over the ranks: the loss of one process.
    assert train_loss(run) == pytest.approx(train_loss(one[0]), rel=1e-4)
    assert result.stdout.count("run folder:") == 1  # rank 0 speaks for the job


def test_two_processes_predict_every_example_once_as_one_does(one_and_two):
    one, two, _ = one_and_two
    merged = predictions(two[0] / "predictions.jsonl")
    assert [i for i, _ in merged] == list(range(12))  # every example once, in the original order
    assert not list(two[0].glob("predictions.rank*.jsonl"))  # the ranks' parts were merged away
    assert sorted(merged) == sorted(predictions(one[0] / "predictions.jsonl"))  # greedy: identical
    assert json.loads((two[0] / "metrics.json").read_text())["examples"] == 12


def test_adapter_of_two_processes_loads_with_plain_peft(one_and_two):
    _, two, _ = one_and_two
    from peft import PeftConfig

    config = PeftConfig.from_pretrained(str(two[0] / "adapter"))
    assert config.r == 16
    assert (two[0] / "adapter" / "adapter_model.safetensors").is_file()


def test_eval_under_accelerate_launch_matches_one_process(one_and_two):
    one, _, _ = one_and_two
    run = one[0]
    out = str(run.parent.parent)
    ok(run_cli("eval", TINY, "--run", run, f"output_dir={out}", *SMALL))
    launcher = [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                "--main_process_port", str(_free_port())]
    result = ok(launch(launcher, "eval", TINY, "--run", run, f"output_dir={out}", *SMALL))
    single, double = sorted(p for p in run.iterdir() if p.name.startswith("eval-"))
    assert sorted(predictions(double / "predictions.jsonl")) == sorted(predictions(single / "predictions.jsonl"))
    assert json.loads((double / "metrics.json").read_text())["examples"] == 12
    assert result.stdout.count("done:") == 1


def test_a_step_that_cannot_be_split_is_one_line_before_loading(tiny, tmp_path):
    result = launch(torchrun(2), "train", TINY, f"output_dir={tmp_path}", "training.micro_batch_size=3",
                    "training.gradient_accumulation_steps=1", *SMALL, timeout=1800)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors and errors[0].startswith("error: training.gradient_accumulation_steps: ")
    assert "3 examples per optimizer step cannot be split evenly across 2 processes" in errors[0]
    assert "Traceback" not in "\n".join(line for line in result.stderr.splitlines() if "runner" in line)
    assert not run_folders(tmp_path)


def test_a_failing_rank_ends_the_job_with_a_line_naming_it(tiny, tmp_path):
    """A user evaluator that raises on rank 1 only: the job stops (no hang) and says which rank failed."""
    pkg = tmp_path / "rankbomb"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ev.py").write_text(
        "import os\nfrom evaluators.base import Evaluator\n\n\nclass Bomb(Evaluator):\n"
        "    def __init__(self, **kw):\n        super().__init__(**kw)\n"
        "        if os.environ.get('RANK') == '1':\n            raise RuntimeError('rank one exploded')\n\n"
        "    def evaluate(self, records, out_dir):\n        return {}\n")
    env = {**_env(), "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    start = time.time()
    result = subprocess.run([*torchrun(2), "-m", "runner", "train", str(TINY), f"output_dir={tmp_path / 'runs'}",
                             *overridden(SMALL, "training.max_steps=1"), "evaluation.evaluators=[{name: 'rankbomb.ev:Bomb'}]"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=3600)
    assert result.returncode != 0
    line = next(line for line in result.stderr.splitlines() if line.startswith("error: rank 1: "))
    assert "RuntimeError: rank one exploded" in line
    assert time.time() - start < 600
    (run,) = run_folders(tmp_path / "runs")
    assert not (run / "metrics.json").exists()  # nothing that looks finished


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int | None:
    """The pid of the worker with RANK=rank among the launcher's children (from /proc)."""
    for task in Path(f"/proc/{launcher.pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(child)
    return None


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs /proc to find the rank's process")
def test_killed_rank_ends_the_job_and_the_rerun_resumes(tiny, tmp_path):
    args = ["train", TINY, f"output_dir={tmp_path}", *overridden(SMALL, "training.max_steps=6"), "training.save_every=2",
            "training.resume=auto", "--no-eval"]
    job = subprocess.Popen([*torchrun(2), "-m", "runner", *map(str, args)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
    try:
        deadline = time.time() + 3600
        while time.time() < deadline and job.poll() is None:
            folders = run_folders(tmp_path)
            if folders and list((folders[0] / "checkpoints").glob("checkpoint-*/trainer_state.json")):
                break
            time.sleep(0.5)
        assert job.poll() is None, job.communicate()[1][-3000:]
        pid = _rank_pid(job, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        _, err = job.communicate(timeout=120)  # the launcher takes the other rank down: no hang
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0
    (run,) = run_folders(tmp_path)
    assert not (run / "adapter").exists()
    result = ok(launch(torchrun(2), *args))
    assert f"resuming the interrupted run {run}" in result.stdout
    assert run_folders(tmp_path) == [run]
    assert json.loads((run / "env.json").read_text())["global_step"] == 6
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_two_machines_on_one_host_train_one_run(tiny, tmp_path):
    """torchrun --nnodes 2: two launches (node ranks 0 and 1) meeting at a rendezvous on localhost."""
    port = _free_port()
    node = [str(BIN / "torchrun"), "--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
            "--master-port", str(port)]
    args = ["-m", "runner", "train", str(TINY), f"output_dir={tmp_path}", *overridden(SMALL, "training.max_steps=2"), "--no-eval"]
    second = subprocess.Popen([*node, "--node-rank", "1", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=_env())
    try:
        first = subprocess.run([*node, "--node-rank", "0", *args], capture_output=True, text=True, cwd=ROOT,
                               env=_env(), timeout=3600)
        _, err = second.communicate(timeout=120)
    finally:
        if second.poll() is None:
            second.kill()
    ok(first)
    assert second.returncode == 0, err[-3000:]
    (run,) = run_folders(tmp_path)
    env = json.loads((run / "env.json").read_text())
    assert env["world_size"] == 2 and env["nodes"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_checkpoints_by_the_clock_are_taken_by_every_rank_together(tiny, tmp_path):
    """training.save_every_minutes under torchrun: rank 0's clock decides for every rank (one collective per step),
    so the ranks save together (a rank saving alone would leave the others waiting); every checkpoint is complete."""
    from runner.store import checkpoints

    ok(launch(torchrun(2), "train", TINY, f"output_dir={tmp_path}", *SMALL, "training.save_every=null",
              "training.save_every_minutes=0.00001", "--no-eval"))
    (run,) = run_folders(tmp_path)
    # after steps 1, 2 and 3 (not the last: the adapter follows), the newest two kept
    assert [p.name for p in checkpoints.complete_checkpoints(run)] == ["checkpoint-2", "checkpoint-3"]
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    assert json.loads((run / "env.json").read_text())["global_step"] == 4
