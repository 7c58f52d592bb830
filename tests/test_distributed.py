"""`softprompt train` under `accelerate launch`: two real CPU processes (gloo) against one process.

Every run is a subprocess of the unchanged CLI (the `softprompt` console script, started by accelerate's
launcher with ``--no_python``), on a tiny random GPT-2 checkpoint and a small CSV in ``tmp_path``.
"""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from softprompt.distributed import Distributed
from tiny import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
GLOO = CONFIGS / "cpu_gloo_2proc.yaml"
SOFTPROMPT = Path(sys.executable).parent / "softprompt"  # the console script of this environment
TOLERANCE = 1e-5

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this build", allow_module_level=True)


# ------------------------------------------------------------------------------------------- helpers


def toy_rows(n: int, seed: int, labels=("A", "B")) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": "".join(rng.choice("xyz" if i % 2 == 0 else "abc") for _ in range(rng.randint(4, 8))),
             "label": labels[i % 2]} for i in range(n)]


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
           and not k.startswith("ACCELERATE_")}
    return {**env, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", **extra}


def run(cmd: list[str], *, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([str(c) for c in cmd], cwd=ROOT, env=env or clean_env(), capture_output=True, text=True,
                          timeout=240)
    if ok and done.returncode != 0:
        raise AssertionError(f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def one_process(args: list[str], **kw) -> subprocess.CompletedProcess:
    return run([SOFTPROMPT, "train", *args], **kw)


def two_processes(args: list[str], *, script: list | None = None, **kw) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/cpu_gloo_2proc.yaml`` of the CLI (or of ``script``)."""
    program = script or ["--no_python", SOFTPROMPT, "train"]
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", GLOO, *program, *args], **kw)


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def train_losses(output: Path) -> list[float]:
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if r["type"] == "train"]


def checkpoint_meta(output: Path, name: str) -> dict:
    return json.loads((output / name / "checkpoints" / "last" / "training_state.json").read_text())


def files(output: Path) -> set[str]:
    return {str(p.relative_to(output)) for p in output.rglob("*")}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> str:
    return save_tiny_checkpoint("gpt2", tmp_path_factory.mktemp("model") / "tiny-gpt2")


# ------------------------------------------------------------------------- unit: sharding a batch


def test_shards_are_disjoint_contiguous_and_cover_the_batch():
    class Fake:  # just what Distributed reads from an Accelerator
        def __init__(self, rank, world):
            self.process_index, self.num_processes = rank, world

    for world in (2, 3, 4):
        for n in (1, 2, 5, 7, 8):
            batch = list(range(n))
            shards = [Distributed(Fake(rank, world)).shard(batch) for rank in range(world)]
            assert [x for s in shards for x in s] == batch  # in order, no row twice, none lost
            assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert Distributed().shard([1, 2, 3]) == [1, 2, 3] and Distributed().world_size == 1


# ------------------------------------------------------- 1 process vs 2 processes (+ who writes files)

AUDIT_HOOK = '''
import os, sys
if os.environ.get("RANK") is not None and os.environ.get("SOFTPROMPT_AUDIT_DIR"):
    _watch = os.path.realpath(os.environ["SOFTPROMPT_AUDIT_WATCH"])
    _log = open(os.path.join(os.environ["SOFTPROMPT_AUDIT_DIR"], "rank%s.log" % os.environ["RANK"]), "a")
    _writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _writing)
            if not writes:
                return
        elif event in ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "shutil.move",
                       "os.symlink", "os.truncate", "os.chmod", "os.utime"):
            path = args[0]
        else:
            return
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(_watch):
            _log.write(event + " " + os.fsdecode(path) + "\\n")
            _log.flush()
    sys.addaudithook(_hook)
'''


@pytest.fixture(scope="module")
def single_and_pair(tmp_path_factory, model_dir):
    """The same job in 1 process and in 2 (each rank's file writes under the output recorded by an audit hook)."""
    tmp = tmp_path_factory.mktemp("pair")
    data = write_csv(tmp / "toy.csv", toy_rows(30, seed=0))
    args = ["--model", model_dir, "--data", data, "--label-column", "label", "--method", "prefix_tuning",
            "--num-virtual-tokens", "4", "--epochs", "2", "--batch-size", "5", "--lr", "0.02", "--val-fraction", "0.2",
            "--eval-every", "1", "--log-every", "1", "--seed", "0"]
    one_process([*args, "--output", tmp / "one"])
    hooks, audit = tmp / "hooks", tmp / "audit"
    hooks.mkdir()
    audit.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = clean_env(PYTHONPATH=str(hooks), SOFTPROMPT_AUDIT_DIR=str(audit), SOFTPROMPT_AUDIT_WATCH=str(tmp / "two"))
    done = two_processes([*args, "--output", tmp / "two"], env=env)
    return tmp / "one", tmp / "two", audit, done


def test_two_processes_give_the_one_process_adapter(single_and_pair):
    one, two, _, _ = single_and_pair
    assert checkpoint_meta(two, "default")["state"]["world_size"] == 2  # really ran as 2 processes
    assert checkpoint_meta(one, "default")["state"]["world_size"] == 1
    a, b = tensors(one / "default"), tensors(two / "default")
    assert max_diff(a, b) < TOLERANCE
    assert max_diff(a, tensors_of_init(one)) > 100 * TOLERANCE  # while training moved the adapter far more
    last_a = load_file(one / "default" / "checkpoints" / "last" / "training_state.safetensors")
    last_b = load_file(two / "default" / "checkpoints" / "last" / "training_state.safetensors")
    assert max_diff({k: v for k, v in last_a.items() if k.startswith(("adapter.", "optimizer."))},
                    {k: v for k, v in last_b.items() if k.startswith(("adapter.", "optimizer."))}) < TOLERANCE
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert len(losses_one) == len(losses_two) == 10  # 24 training rows, global batches of 5: 5 steps an epoch
    assert max(abs(x - y) for x, y in zip(losses_one, losses_two)) < TOLERANCE


def tensors_of_init(output: Path) -> dict:
    """The adapter before training: a fresh `prefix_tuning` adapter with the run's seed, materialised."""
    from softprompt import load

    model = load(json.loads((output / "default" / "training_state.json").read_text())["base_model"], device="cpu")
    model.add_adapter("x", method="prefix_tuning", num_virtual_tokens=4, seed=0)
    return {"prompt_embeddings": model.adapters["x"].materialized().detach()}


def test_only_rank_0_writes_files(single_and_pair):
    one, two, audit, done = single_and_pair
    rank0, rank1 = (audit / "rank0.log").read_text(), (audit / "rank1.log")
    # the hook works: rank 0 was seen writing the metrics log, the adapter directories and checkpoints
    assert "metrics.jsonl" in rank0 and "os.mkdir" in rank0 and "os.rename" in rank0
    assert not rank1.exists() or rank1.read_text() == ""  # rank 1 never opened, made or renamed anything there
    assert files(two) == files(one)  # the same files as one process: no duplicates, no temporary leftovers
    # one log line per record (rank 1 appended nothing), one result line printed (rank 0's)
    lines = lambda output: len((output / "metrics.jsonl").read_text().splitlines())  # noqa: E731
    assert lines(two) == lines(one)
    assert done.stdout.count("default: best") == 1


# ------------------------------------------------------------------------------------------- resume

CRASH = '''
import os, sys
import softprompt.train as train_module
from softprompt import cli

original, crash_at = train_module.train, int(os.environ["SOFTPROMPT_TEST_CRASH_AT"])

def train(config, model=None, *, on_step=None, progress=True):
    def stop(info):  # every process stops at the same optimizer step, as if the job were killed there
        if info.step == crash_at:
            sys.stdout.write("crashing at step %d on rank %s" % (info.step, os.environ.get("RANK")) + chr(10))
            sys.stdout.flush()
            os._exit(17)
    return original(config, model, on_step=stop, progress=progress)

train_module.train = train
sys.exit(cli.main(sys.argv[1:]))
'''


def test_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, model_dir):
    a = write_csv(tmp_path / "a.csv", toy_rows(22, seed=1))
    b = write_csv(tmp_path / "b.csv", toy_rows(15, seed=2, labels=("yes", "no")))
    config = {  # P-tuning with LSTM dropout: the random state must survive the interruption on both ranks
        "model": model_dir, "data": a, "label_column": "label", "method": "p_tuning", "encoder_type": "lstm",
        "encoder_num_layers": 2, "encoder_dropout": 0.3, "encoder_hidden_size": 8, "num_virtual_tokens": 3,
        "epochs": 2, "batch_size": 5, "grad_accum": 2, "lr": 0.05, "warmup_ratio": 0.2, "lr_schedule": "cosine",
        "val_fraction": 0.2, "log_every": 1, "save_every": 2, "seed": 3,
        "adapters": [{"name": "ptune"}, {"name": "pt", "data": b, "method": "prompt_tuning", "lr": 0.1}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    two_processes([path, "--output", tmp_path / "full"])
    crash = tmp_path / "crash.py"
    crash.write_text(CRASH)
    cut = tmp_path / "cut"
    done = two_processes([path, "--output", cut], script=[crash, "train"], ok=False,
                         env=clean_env(SOFTPROMPT_TEST_CRASH_AT="5"))
    assert done.returncode != 0, done.stderr[-4000:]
    assert "crashing at step 5 on rank 0" in done.stdout and "crashing at step 5 on rank 1" in done.stdout
    assert checkpoint_meta(cut, "pt")["state"]["step"] == 4  # saved at step 4; step 5 is lost and redone
    # resuming with another number of processes is refused, naming the flag and the count expected
    wrong = one_process([path, "--output", cut, "--resume"], ok=False)
    assert wrong.returncode != 0
    assert "--resume" in wrong.stderr and "2 process" in wrong.stderr and "--num_processes 2" in wrong.stderr
    two_processes([path, "--output", cut, "--resume"])
    full_steps = checkpoint_meta(tmp_path / "full", "pt")["state"]["step"]
    assert checkpoint_meta(cut, "pt")["state"]["step"] == full_steps == 2 * 3  # 3 optimizer steps an epoch
    for name in ("ptune", "pt"):  # same number of processes: bit-identical, as resume is in one process
        assert (tmp_path / "full" / name / "adapter_model.safetensors").read_bytes() == \
            (cut / name / "adapter_model.safetensors").read_bytes(), name
        full_state = load_file(tmp_path / "full" / name / "checkpoints" / "last" / "training_state.safetensors")
        cut_state = load_file(cut / name / "checkpoints" / "last" / "training_state.safetensors")
        assert full_state.keys() == cut_state.keys()
        assert all(torch.equal(full_state[k], cut_state[k]) for k in full_state), name
    assert train_losses(cut) == train_losses(tmp_path / "full")


# ------------------------------------------------------------------------------------ multi-adapter


def test_multi_adapter_job_in_two_processes_equals_one_process(tmp_path, model_dir):
    a = write_csv(tmp_path / "a.csv", toy_rows(19, seed=4))
    b = write_csv(tmp_path / "b.csv", toy_rows(14, seed=5, labels=("yes", "no")))
    config = {"model": model_dir, "label_column": "label", "epochs": 2, "batch_size": 7, "grad_accum": 2,
              "lr_schedule": "linear", "warmup_ratio": 0.1, "val_fraction": 0.2, "log_every": 1, "seed": 1,
              "weight_decay": 0.01, "max_grad_norm": 1.0,
              "adapters": [{"name": "pt", "data": a, "method": "prompt_tuning", "num_virtual_tokens": 3, "lr": 0.03},
                           {"name": "prefix", "data": b, "method": "prefix_tuning", "num_virtual_tokens": 2,
                            "lr": 0.01}]}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    one_process([path, "--output", tmp_path / "one"])
    two_processes([path, "--output", tmp_path / "two"])
    assert checkpoint_meta(tmp_path / "two", "pt")["state"]["world_size"] == 2
    for name in ("pt", "prefix"):
        diff = max_diff(tensors(tmp_path / "one" / name), tensors(tmp_path / "two" / name))
        assert diff < TOLERANCE, (name, diff)
    assert max(abs(x - y) for x, y in zip(train_losses(tmp_path / "one"), train_losses(tmp_path / "two"))) < TOLERANCE
    assert len(train_losses(tmp_path / "two")) == checkpoint_meta(tmp_path / "two", "pt")["state"]["step"] > 0


# ---------------------------------------------------------------------------------------- configs


def test_shipped_accelerate_configs_parse_and_say_what_they_are():
    shipped = {p.name: yaml.safe_load(p.read_text()) for p in CONFIGS.glob("*.yaml")}
    assert set(shipped) == {"ddp_multi_gpu.yaml", "fsdp.yaml", "deepspeed_zero3.yaml", "cpu_gloo_2proc.yaml"}
    for name, config in shipped.items():
        assert config["compute_environment"] == "LOCAL_MACHINE", name
        assert config["num_machines"] >= 1 and config["machine_rank"] == 0, name
        assert config["mixed_precision"] == "no", name  # precision is softprompt's own --bf16
    gloo = shipped["cpu_gloo_2proc.yaml"]
    assert gloo["num_processes"] == 2 and gloo["use_cpu"] is True and gloo["distributed_type"] == "MULTI_GPU"
    ddp = shipped["ddp_multi_gpu.yaml"]
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["use_cpu"] is False and ddp["num_processes"] >= 2
    fsdp = shipped["fsdp.yaml"]
    assert fsdp["distributed_type"] == "FSDP"
    assert fsdp["fsdp_config"]["fsdp_sharding_strategy"] == "FULL_SHARD"
    zero3 = shipped["deepspeed_zero3.yaml"]
    assert zero3["distributed_type"] == "DEEPSPEED" and zero3["deepspeed_config"]["zero_stage"] == 3
    # accelerate itself reads them
    from accelerate.commands.config.config_args import load_config_from_file

    for name in shipped:
        assert load_config_from_file(str(CONFIGS / name)).distributed_type.name == shipped[name]["distributed_type"]


def test_a_sharding_accelerate_config_is_refused_with_one_clear_error(monkeypatch):
    import accelerate

    from softprompt import distributed
    from softprompt.errors import ConfigError

    class FakeAccelerator:  # what accelerate builds in each process of an FSDP launch (needs GPUs to build for real)
        def __init__(self, **kwargs):
            self.distributed_type = accelerate.DistributedType.FSDP
            self.num_processes, self.process_index = 2, 0

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.current.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"distributed_type: FSDP .*ddp_multi_gpu\.yaml"):
            distributed.current()
        monkeypatch.setenv("WORLD_SIZE", "1")
        distributed.current.cache_clear()
        assert distributed.current().world_size == 1 and distributed.current().accelerator is None
    finally:
        distributed.current.cache_clear()
