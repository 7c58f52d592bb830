"""`softprompt train` under `accelerate launch`: two real CPU processes (gloo) against one process.

Every run is a subprocess of the unchanged CLI (the `softprompt` console script, started by accelerate's
launcher with ``--no_python``), on a tiny random GPT-2 checkpoint and a small CSV in ``tmp_path``. The
FSDP and DeepSpeed ZeRO-3 runs (``cpu_gloo_fsdp_2proc.yaml``, ``cpu_gloo_deepspeed_2proc.yaml``; tiny Llama
checkpoints) start the CLI through a small script that also reports how the base was sharded in each process.
DeepSpeed is a dev dependency: its tests fail (they do not skip) where it does not import. Every launch has a timeout (`run`).
"""

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from softprompt.training.distributed import Distributed

from tiny import save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
GLOO = CONFIGS / "cpu_gloo_2proc.yaml"
GLOO_FSDP = CONFIGS / "cpu_gloo_fsdp_2proc.yaml"
GLOO_ZERO3 = CONFIGS / "cpu_gloo_deepspeed_2proc.yaml"
SOFTPROMPT = Path(sys.executable).parent / "softprompt"  # the console script of this environment
TOLERANCE = 1e-5

if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
    pytest.skip("torch.distributed with the gloo backend is not available in this build", allow_module_level=True)


# ------------------------------------------------------------------------------------------- helpers


def toy_rows(n: int, seed: int, labels=("A", "B")) -> list[dict]:
    rng = random.Random(seed)
    return [
        {
            "text": "".join(rng.choice("xyz" if i % 2 == 0 else "abc") for _ in range(rng.randint(4, 8))),
            "label": labels[i % 2],
        }
        for i in range(n)
    ]


def write_csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def clean_env(**extra) -> dict:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        and not k.startswith("ACCELERATE_")
    }
    return {
        **env,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


def python_path(*folders) -> str:
    """``folders`` before the caller's PYTHONPATH (which may put a source tree before the installed package)."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])


def run(cmd: list[str], *, env: dict | None = None, ok: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(c) for c in cmd], cwd=ROOT, env=env or clean_env(), capture_output=True, text=True, timeout=240
    )
    if ok and done.returncode != 0:
        raise AssertionError(f"{cmd} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    return done


def one_process(args: list[str], **kw) -> subprocess.CompletedProcess:
    return run([SOFTPROMPT, "train", *args], **kw)


def two_processes(
    args: list[str], *, script: list | None = None, config: Path = GLOO, **kw
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file configs/accelerate/cpu_gloo_2proc.yaml`` of the CLI (or of ``script``)."""
    program = script or ["--no_python", SOFTPROMPT, "train"]
    return run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, *program, *args], **kw)


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

AUDIT_HOOK = """
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
"""


@pytest.fixture(scope="module")
def single_and_pair(tmp_path_factory, model_dir):
    """The same job in 1 process and in 2 (each rank's file writes under the output recorded by an audit hook)."""
    tmp = tmp_path_factory.mktemp("pair")
    data = write_csv(tmp / "toy.csv", toy_rows(30, seed=0))
    args = [
        "--model",
        model_dir,
        "--data",
        data,
        "--label-column",
        "label",
        "--method",
        "prefix_tuning",
        "--num-virtual-tokens",
        "4",
        "--epochs",
        "2",
        "--batch-size",
        "5",
        "--lr",
        "0.02",
        "--val-fraction",
        "0.2",
        "--eval-every",
        "1",
        "--log-every",
        "1",
        "--seed",
        "0",
    ]
    one_process([*args, "--output", tmp / "one"])
    hooks, audit = tmp / "hooks", tmp / "audit"
    hooks.mkdir()
    audit.mkdir()
    (hooks / "sitecustomize.py").write_text(AUDIT_HOOK)
    env = clean_env(
        PYTHONPATH=python_path(hooks), SOFTPROMPT_AUDIT_DIR=str(audit), SOFTPROMPT_AUDIT_WATCH=str(tmp / "two")
    )
    # the two processes also checkpoint the blocks: data parallel and --gradient-checkpointing change no result
    done = two_processes([*args, "--output", tmp / "two", "--gradient-checkpointing"], env=env)
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
    assert (
        max_diff(
            {k: v for k, v in last_a.items() if k.startswith(("adapter.", "optimizer."))},
            {k: v for k, v in last_b.items() if k.startswith(("adapter.", "optimizer."))},
        )
        < TOLERANCE
    )
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
    assert done.stdout.count("best step") == 1  # the summary table's header


# ------------------------------------------------------------------------------------------- resume

CRASH = """
import os, sys
import softprompt.training.loop as train_module
from softprompt import cli
from softprompt.cli import train as cli_train

original, crash_at = train_module.train, int(os.environ["SOFTPROMPT_TEST_CRASH_AT"])

def train(config, model=None, *, on_step=None, progress=True):
    def stop(info):  # every process stops at the same optimizer step, as if the job were killed there
        if info.step == crash_at:
            sys.stdout.write("crashing at step %d on rank %s" % (info.step, os.environ.get("RANK")) + chr(10))
            sys.stdout.flush()
            os._exit(17)
    return original(config, model, on_step=stop, progress=progress)

train_module.train = cli_train.train = train  # cli.train imported it at the top: patch its name too
sys.exit(cli.main(sys.argv[1:]))
"""


def test_interrupted_two_process_run_resumes_to_the_uninterrupted_result(tmp_path, model_dir):
    a = write_csv(tmp_path / "a.csv", toy_rows(22, seed=1))
    b = write_csv(tmp_path / "b.csv", toy_rows(15, seed=2, labels=("yes", "no")))
    config = {  # P-tuning with LSTM dropout: the random state must survive the interruption on both ranks
        "model": model_dir,
        "data": a,
        "label_column": "label",
        "method": "p_tuning",
        "encoder_type": "lstm",
        "encoder_num_layers": 2,
        "encoder_dropout": 0.3,
        "encoder_hidden_size": 8,
        "num_virtual_tokens": 3,
        "epochs": 2,
        "batch_size": 5,
        "grad_accum": 2,
        "lr": 0.05,
        "warmup_ratio": 0.2,
        "lr_schedule": "cosine",
        "val_fraction": 0.2,
        "log_every": 1,
        "save_every": 2,
        "seed": 3,
        "adapters": [{"name": "ptune"}, {"name": "pt", "data": b, "method": "prompt_tuning", "lr": 0.1}],
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config))
    two_processes([path, "--output", tmp_path / "full"])
    crash = tmp_path / "crash.py"
    crash.write_text(CRASH)
    cut = tmp_path / "cut"
    done = two_processes(
        [path, "--output", cut], script=[crash, "train"], ok=False, env=clean_env(SOFTPROMPT_TEST_CRASH_AT="5")
    )
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
        assert (tmp_path / "full" / name / "adapter_model.safetensors").read_bytes() == (
            cut / name / "adapter_model.safetensors"
        ).read_bytes(), name
        full_state = load_file(tmp_path / "full" / name / "checkpoints" / "last" / "training_state.safetensors")
        cut_state = load_file(cut / name / "checkpoints" / "last" / "training_state.safetensors")
        assert full_state.keys() == cut_state.keys()
        assert all(torch.equal(full_state[k], cut_state[k]) for k in full_state), name
    assert train_losses(cut) == train_losses(tmp_path / "full")


# ------------------------------------------------------------------------------------ multi-adapter


def test_multi_adapter_job_in_two_processes_equals_one_process(tmp_path, model_dir):
    a = write_csv(tmp_path / "a.csv", toy_rows(19, seed=4))
    b = write_csv(tmp_path / "b.csv", toy_rows(14, seed=5, labels=("yes", "no")))
    config = {
        "model": model_dir,
        "label_column": "label",
        "epochs": 2,
        "batch_size": 7,
        "grad_accum": 2,
        "lr_schedule": "linear",
        "warmup_ratio": 0.1,
        "val_fraction": 0.2,
        "log_every": 1,
        "seed": 1,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "adapters": [
            {"name": "pt", "data": a, "method": "prompt_tuning", "num_virtual_tokens": 3, "lr": 0.03},
            {"name": "prefix", "data": b, "method": "prefix_tuning", "num_virtual_tokens": 2, "lr": 0.01},
        ],
    }
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


def test_cpt_in_two_processes_equals_one_process(tmp_path, model_dir):
    """CPT's loss also averages its context's label tokens, per row: the processes' token counts must include
    them, or the 2-process gradient is not the 1-process one (labels of different lengths make the shares differ)."""
    data = write_csv(tmp_path / "a.csv", toy_rows(19, seed=4, labels=("A", "BBBBBB")))
    args = [data, "--model", model_dir, "--label-column", "label", "--method", "cpt", "--cpt-examples", "2"]
    args += ["--epochs", "2", "--batch-size", "7", "--val-fraction", "0", "--log-every", "1", "--seed", "1"]
    args += ["--lr", "0.01", "--opt-projection-epsilon", "10", "--opt-projection-format-epsilon", "10"]
    one_process(["--data", *args, "--output", tmp_path / "one"])
    two_processes(["--data", *args, "--output", tmp_path / "two"])
    diff = max_diff(tensors(tmp_path / "one" / "default"), tensors(tmp_path / "two" / "default"))
    assert diff < TOLERANCE, diff
    one, two = train_losses(tmp_path / "one"), train_losses(tmp_path / "two")
    assert len(one) == len(two) > 0 and max(abs(x - y) for x, y in zip(one, two)) < TOLERANCE


EXIT_SCRIPT = """
import sys, time
import torch
from softprompt.training import distributed

dist = distributed.current()
torch.distributed.all_reduce(torch.ones(1))
if dist.rank == 1:
    raise SystemExit("rank 1 gives up")
time.sleep(1.0)  # rank 0 is still working when rank 1 leaves
print("rank 0 done", flush=True)
"""


def test_processes_leave_together_and_a_failing_one_is_reported_not_waited_for(tmp_path):
    """At exit each process meets the others at a gloo barrier before the process group is torn down (torn
    down alone, gloo aborted 3 of 20 successful runs). One process leaving on an error must not hang the other."""
    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    done = two_processes([], script=[script], ok=False)
    assert done.returncode != 0
    assert "rank 0 done" in done.stdout and "rank 1 gives up" in done.stderr
    assert "terminate called" not in done.stderr


# ---------------------------------------------------------------------------------------- configs


def test_shipped_accelerate_configs_parse_and_say_what_they_are():
    shipped = {p.name: yaml.safe_load(p.read_text()) for p in CONFIGS.glob("*.yaml")}
    assert set(shipped) == {
        "ddp_multi_gpu.yaml",
        "fsdp.yaml",
        "deepspeed_zero3.yaml",
        "cpu_gloo_2proc.yaml",
        "cpu_gloo_fsdp_2proc.yaml",
        "cpu_gloo_deepspeed_2proc.yaml",
    }
    for name, config in shipped.items():
        assert config["compute_environment"] == "LOCAL_MACHINE", name
        assert config["num_machines"] >= 1 and config["machine_rank"] == 0, name
        # precision is softprompt's own --bf16 (accelerate forbids the field next to a deepspeed_config_file)
        assert config.get("mixed_precision", "no") == "no", name
    gloo = shipped["cpu_gloo_2proc.yaml"]
    assert gloo["num_processes"] == 2 and gloo["use_cpu"] is True and gloo["distributed_type"] == "MULTI_GPU"
    ddp = shipped["ddp_multi_gpu.yaml"]
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["use_cpu"] is False and ddp["num_processes"] >= 2
    for name in ("fsdp.yaml", "cpu_gloo_fsdp_2proc.yaml"):
        fsdp = shipped[name]
        assert fsdp["distributed_type"] == "FSDP", name
        assert fsdp["fsdp_config"]["fsdp_version"] == 2 and fsdp["fsdp_config"]["fsdp_reshard_after_forward"] is True
        assert fsdp["fsdp_config"]["fsdp_offload_params"] is False  # softprompt refuses offloading
    assert shipped["fsdp.yaml"]["use_cpu"] is False and shipped["cpu_gloo_fsdp_2proc.yaml"]["use_cpu"] is True
    zero3 = shipped["deepspeed_zero3.yaml"]
    assert zero3["distributed_type"] == "DEEPSPEED" and zero3["deepspeed_config"]["zero_stage"] == 3
    assert zero3["deepspeed_config"]["offload_param_device"] == "none" and zero3["use_cpu"] is False
    twin = shipped["cpu_gloo_deepspeed_2proc.yaml"]
    assert twin["distributed_type"] == "DEEPSPEED" and twin["use_cpu"] is True and twin["num_processes"] == 2
    ds_file = json.loads((ROOT / twin["deepspeed_config"]["deepspeed_config_file"]).read_text())
    assert ds_file["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 0}
    # accelerate itself reads them
    from accelerate.commands.config.config_args import load_config_from_file

    for name in shipped:
        assert load_config_from_file(str(CONFIGS / name)).distributed_type.name == shipped[name]["distributed_type"]


class FakeAccelerator:  # what accelerate builds in each process of a GPU launch (needs GPUs to build for real)
    kind = "FSDP"
    plugin = None
    ds_plugin = None

    def __init__(self, **kwargs):
        import accelerate

        self.distributed_type = accelerate.DistributedType[self.kind]
        self.num_processes, self.process_index = 2, 0
        self.state = SimpleNamespace(fsdp_plugin=self.plugin, deepspeed_plugin=self.ds_plugin)

    def end_training(self) -> None:  # registered to run at exit; no process group to tear down here
        pass


def fsdp_plugin(**changes) -> SimpleNamespace:
    """The fields of accelerate's FullyShardedDataParallelPlugin that softprompt reads, as fsdp.yaml sets them."""
    return SimpleNamespace(
        **{
            "fsdp_version": 2,
            "reshard_after_forward": True,
            "cpu_offload": None,
            "activation_checkpointing": False,
            **changes,
        }
    )


@pytest.fixture
def launched(monkeypatch):
    """`distributed.current()` as in a 2-process launch built by ``FakeAccelerator`` (set its class fields)."""
    import accelerate

    from softprompt.training import distributed

    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    monkeypatch.setattr(FakeAccelerator, "plugin", fsdp_plugin())
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    distributed.current.cache_clear()
    yield distributed.current
    distributed.current.cache_clear()


def ds_plugin(**changes) -> SimpleNamespace:
    """What softprompt reads of accelerate's DeepSpeedPlugin (its DeepSpeed config) for deepspeed_zero3.yaml."""
    config = {
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "zero_optimization": {
            "stage": 3,
            "offload_param": {"device": "none"},
            "offload_optimizer": {"device": "none"},
            "stage3_prefetch_bucket_size": "auto",
        },
    }
    for key, value in changes.items():
        (config["zero_optimization"] if key in config["zero_optimization"] else config)[key] = value
    return SimpleNamespace(deepspeed_config=config)


def test_a_deepspeed_launch_partitions_the_base_with_the_configs_zero_section(launched, monkeypatch):
    monkeypatch.setattr(FakeAccelerator, "kind", "DEEPSPEED")
    monkeypatch.setattr(FakeAccelerator, "ds_plugin", ds_plugin())
    dist = launched()
    assert dist.shards_base and dist.fsdp is None
    assert dist.zero.zero_optimization["stage"] == 3  # "auto" entries dropped: DeepSpeed's defaults apply
    assert "stage3_prefetch_bucket_size" not in dist.zero.zero_optimization
    # use_cpu: accelerate reports MULTI_CPU; its launcher's ACCELERATE_DEEPSPEED_* variables decide
    monkeypatch.setattr(FakeAccelerator, "kind", "MULTI_CPU")
    monkeypatch.setattr(FakeAccelerator, "ds_plugin", None)
    launched.cache_clear()
    assert not launched().shards_base
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    launched.cache_clear()
    assert launched().shards_base and launched().zero.zero_optimization["stage"] == 3
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: no accelerator at all
    launched.cache_clear()
    assert launched().world_size == 1 and launched().accelerator is None and not launched().shards_base


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"stage": 2}, r"deepspeed_config\.zero_stage: 2 .*set 3.*ddp_multi_gpu\.yaml"),
        ({"offload_param": {"device": "cpu"}}, r"deepspeed_config\.offload_param_device: cpu .*set it to none"),
        ({"offload_optimizer": {"device": "nvme"}}, r"deepspeed_config\.offload_optimizer_device: nvme"),
        ({"gradient_accumulation_steps": 4}, r"deepspeed_config\.gradient_accumulation_steps: 4 .*--grad-accum"),
        ({"gradient_clipping": 1.0}, r"deepspeed_config\.gradient_clipping: 1\.0 .*--max-grad-norm"),
        ({"optimizer": {"type": "AdamW"}}, r"deepspeed_config_file: its 'optimizer' section"),
        ({"bf16": {"enabled": True}}, r"deepspeed_config_file: bf16\.enabled .*--bf16"),
    ],
)
def test_deepspeed_settings_softprompt_cannot_honour_are_refused_naming_the_field(
    launched, monkeypatch, changes, message
):
    from softprompt.errors import ConfigError

    monkeypatch.setattr(FakeAccelerator, "kind", "DEEPSPEED")
    monkeypatch.setattr(FakeAccelerator, "ds_plugin", ds_plugin(**changes))
    with pytest.raises(ConfigError, match=message):
        launched()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"fsdp_version": 1}, r"fsdp_config\.fsdp_version: 1 .*fsdp_version: 2"),
        ({"cpu_offload": SimpleNamespace(offload_params=True)}, r"fsdp_config\.fsdp_offload_params: true"),
    ],
)
def test_fsdp_settings_softprompt_cannot_honour_are_refused_naming_the_field(launched, monkeypatch, changes, message):
    from softprompt.errors import ConfigError

    monkeypatch.setattr(FakeAccelerator, "plugin", fsdp_plugin(**changes))
    with pytest.raises(ConfigError, match=message):
        launched()


def test_an_fsdp_launch_shards_the_base_with_the_configs_reshard_setting(launched, monkeypatch):
    assert launched().shards_base and launched().fsdp.reshard_after_forward is True
    assert not launched().activation_checkpointing
    # fsdp_activation_checkpointing: honoured as --gradient-checkpointing
    monkeypatch.setattr(FakeAccelerator, "plugin", fsdp_plugin(activation_checkpointing=True))
    launched.cache_clear()
    assert launched().activation_checkpointing
    monkeypatch.setattr(FakeAccelerator, "plugin", fsdp_plugin(reshard_after_forward=False))
    launched.cache_clear()
    assert launched().shards_base and launched().fsdp.reshard_after_forward is False
    # use_cpu: accelerate reports MULTI_CPU and builds no plugin; its launcher's FSDP_* variables decide
    monkeypatch.setattr(FakeAccelerator, "kind", "MULTI_CPU")
    monkeypatch.setattr(FakeAccelerator, "plugin", None)
    launched.cache_clear()
    assert not launched().shards_base  # a plain CPU launch: data parallel
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    launched.cache_clear()
    assert launched().shards_base and launched().fsdp.reshard_after_forward is False


# ------------------------------------------------------------------------------ FSDP: the units


def test_fsdp_units_are_the_blocks_the_called_modules_and_one_unit_per_embedding_matrix():
    from softprompt.training.distributed import fsdp_units

    from tiny import tiny_model

    llama = tiny_model("llama")  # untied: embedding and head are separate units
    units = fsdp_units(llama)
    base = llama.base
    assert units[:2] == list(base.model.layers)
    assert units[2] == [base.model.embed_tokens] and units[3] is base.lm_head and units[4] is base.model
    assert len(units) == 5
    gpt2 = tiny_model("gpt2")  # tied head: one unit holds the embedding and the head
    units = fsdp_units(gpt2)
    assert units[:2] == list(gpt2.base.transformer.h)
    assert units[2] == [gpt2.base.transformer.wte, gpt2.base.lm_head] and units[3] is gpt2.base.transformer
    t5 = tiny_model("t5")  # shared matrix: shared, both stacks' embed_tokens and the head, in one unit
    units = fsdp_units(t5)
    assert units[:4] == [*t5.base.encoder.block, *t5.base.decoder.block]
    assert {id(m) for m in units[4]} == {
        id(m) for m in (t5.base.shared, t5.base.encoder.embed_tokens, t5.base.decoder.embed_tokens, t5.base.lm_head)
    }
    # the encoder is called alone when decoding, and both stacks one after the other in the training forward
    assert units[5:] == [t5.base.encoder, t5.base.decoder]


def test_a_family_without_known_blocks_cannot_be_sharded_and_says_so():
    from softprompt.engine.families import FamilyQuirks
    from softprompt.errors import ConfigError
    from softprompt.training.distributed import fsdp_units

    from tiny import tiny_model

    model = tiny_model("llama")
    model.quirks = FamilyQuirks()  # what an unknown family gets
    with pytest.raises(ConfigError, match=r"model type 'llama' cannot be sharded with FSDP.*FAMILY_QUIRKS"):
        fsdp_units(model)
    model.quirks = FamilyQuirks(blocks=("model.blocks",))  # a row that does not match the model
    with pytest.raises(ConfigError, match=r"no module 'model.blocks'.*ddp_multi_gpu\.yaml"):
        fsdp_units(model)


# ------------------------------------------------------------------------------ FSDP: real launches

# Starts the unchanged CLI after wrapping `Distributed.shard_base`, to print what each process holds of the
# base once it is sharded (FSDP: DTensors; ZeRO-3: DeepSpeed's flat partition `ds_tensor` of an emptied weight) (and, with SOFTPROMPT_TEST_CRASH_AT, kills every process at that step, as CRASH).
FSDP_PROBE = """
import os, sys
from torch.distributed.tensor import DTensor
import softprompt.training.loop as train_module
from softprompt import cli
from softprompt.cli import train as cli_train
from softprompt.training import distributed

original_shard_base, crash_at = distributed.Distributed.shard_base, int(os.environ.get("SOFTPROMPT_TEST_CRASH_AT", 0))

def local(p):
    return p.to_local().numel() if isinstance(p, DTensor) else p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel()

def whole(p):
    return p.ds_numel if hasattr(p, "ds_id") else p.numel()

def sharded(p):  # a ZeRO-3 weight holds no data of its own outside its module's forward
    return isinstance(p, DTensor) or (hasattr(p, "ds_id") and p.numel() == 0)

def shard_base(self, model, dtype=None):
    original_shard_base(self, model, dtype)
    params = list(model.base.parameters())  # a tied matrix is one parameter
    block = max(model.base.get_submodule(model.quirks.blocks[0])[0].parameters(), key=lambda p: p.numel())
    tied = model.base.get_output_embeddings().weight is model.base.get_input_embeddings().weight
    # one write per line: the two processes share the pipe (print writes the newline separately)
    sys.stdout.write("SHARDS rank=%s local=%d total=%d block_local=%d block_total=%d dtensors=%d params=%d tied=%d "
                     "adapters_dtensors=%d%s" % (self.rank, sum(map(local, params)), sum(map(whole, params)),
                     local(block), whole(block), sum(map(sharded, params)), len(params), tied,
                     sum(sharded(p) or hasattr(p, "ds_id") for p in model.adapters.parameters()), chr(10)))
    sys.stdout.flush()

distributed.Distributed.shard_base = shard_base
original_train = train_module.train

def train(config, model=None, *, on_step=None, progress=True):
    def stop(info):
        if info.step == crash_at:
            sys.stdout.write("crashing at step %d on rank %s%s" % (info.step, os.environ.get("RANK"), chr(10)))
            sys.stdout.flush()
            os._exit(17)
    return original_train(config, model, on_step=stop if crash_at else None, progress=progress)

train_module.train = cli_train.train = train  # cli.train imported it at the top: patch its name too
sys.exit(cli.main(sys.argv[1:]))
"""


def shards(done: subprocess.CompletedProcess) -> dict[int, dict[str, int]]:
    """Each rank's SHARDS line of an FSDP_PROBE run."""
    found = {}
    for line in done.stdout.splitlines():
        if line.startswith("SHARDS "):
            fields = dict(item.split("=") for item in line.split()[1:])
            found[int(fields.pop("rank"))] = {k: int(v) for k, v in fields.items()}
    return found


def assert_half_of_the_base_per_process(done: subprocess.CompletedProcess, tied: bool) -> None:
    """FSDP or ZeRO-3: every base weight and about half of the base in each process; no adapter sharded."""
    found = shards(done)
    assert set(found) == {0, 1}, done.stdout[-2000:]
    for rank, s in found.items():
        assert s["dtensors"] == s["params"] > 0 and s["adapters_dtensors"] == 0  # every base weight sharded, no adapter
        assert 2 * s["block_local"] == s["block_total"]  # a decoder block's largest weight: half in each process
        assert abs(s["local"] - s["total"] / 2) <= 0.01 * s["total"], (rank, s)  # about half of the whole base
        assert s["tied"] == tied, (rank, s)  # a tied head still is the embedding matrix after sharding
    # FSDP splits exactly; ZeRO-3 pads a weight of odd size by one element to split it
    padding = found[0]["local"] + found[1]["local"] - found[0]["total"]
    assert 0 <= padding < found[0]["params"], found


def tied_llama_checkpoint(path: Path) -> str:
    from transformers import LlamaForCausalLM

    from tiny import tiny_base, tiny_tokenizer

    config = tiny_base("llama").config
    config.tie_word_embeddings = True
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return str(path)


FSDP_JOB = {  # text-initialised prompt tuning (reads the embedding table) + prefix tuning, mixed batches
    "label_column": "label",
    "epochs": 2,
    "batch_size": 5,
    "grad_accum": 1,
    "lr_schedule": "linear",
    "val_fraction": 0.2,
    "log_every": 1,
    "save_every": 2,
    "seed": 2,
    "eval_every": 1,
    "adapters": [
        {
            "name": "pt",
            "method": "prompt_tuning",
            "num_virtual_tokens": 3,
            "init": "text",
            "init_text": "classify this",
            "lr": 0.05,
        },
        {"name": "prefix", "method": "prefix_tuning", "num_virtual_tokens": 2, "lr": 0.02},
    ],
}


def fsdp_pair(
    tmp: Path, model: str, rows: int = 16, config: Path = GLOO_FSDP, checkpointing: bool = False
) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """One FSDP (or ZeRO-3: ``config``) job (`FSDP_JOB` on ``model``, with ``gradient_checkpointing``) in 1 process
    and sharded over 2 (through FSDP_PROBE)."""
    a = write_csv(tmp / "a.csv", toy_rows(rows, seed=6))
    b = write_csv(tmp / "b.csv", toy_rows(14, seed=7, labels=("yes", "no")))
    job = json.loads(json.dumps(FSDP_JOB))
    job["model"], job["adapters"][0]["data"], job["adapters"][1]["data"] = model, a, b
    job["gradient_checkpointing"] = checkpointing
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    one_process([path, "--output", tmp / "one"])
    probe = tmp / "probe.py"
    probe.write_text(FSDP_PROBE)
    done = two_processes([path, "--output", tmp / "fsdp"], script=[probe, "train"], config=config)
    return path, tmp / "one", tmp / "fsdp", done


def eval_records(output: Path) -> list[dict]:
    return [r for r in map(json.loads, (output / "metrics.jsonl").read_text().splitlines()) if r["type"] == "eval"]


def assert_same_training(one: Path, two: Path) -> None:
    assert checkpoint_meta(two, "pt")["state"]["world_size"] == 2
    for name in ("pt", "prefix"):
        diff = max_diff(tensors(one / name), tensors(two / name))
        assert diff < TOLERANCE, (name, diff)
    losses_one, losses_two = train_losses(one), train_losses(two)
    assert len(losses_one) == len(losses_two) == checkpoint_meta(two, "pt")["state"]["step"] > 0
    assert max(abs(x - y) for x, y in zip(losses_one, losses_two)) < TOLERANCE
    # validation ran over the sharded base too (zero-shot and every epoch), with the one-process numbers
    evals_one, evals_two = eval_records(one), eval_records(two)
    assert [(r["model"], r["adapter"], r["step"]) for r in evals_one] == [
        (r["model"], r["adapter"], r["step"]) for r in evals_two
    ]
    assert sum(r["model"] == "base" for r in evals_two) == 2 and len(evals_two) == 6
    for x, y in zip(evals_one, evals_two):
        assert abs(x["val_loss"] - y["val_loss"]) < TOLERANCE and x["accuracy"] == y["accuracy"], (x, y)
    assert files(two) == files(one)  # rank 0 alone wrote, the same files as one process


def assert_training_moved_the_prompt(one, two) -> None:
    """The trained prompt is far from its initial weights: agreement within TOLERANCE means something."""
    from softprompt import load

    fresh = load(str(one.parent / "tiny-llama"), device="cpu")
    fresh.add_adapter(
        "pt", method="prompt_tuning", num_virtual_tokens=3, init="text", init_text="classify this", seed=2
    )
    moved = (tensors(two / "pt")["prompt_embeddings"] - fresh.adapters["pt"].materialized().detach()).abs().max()
    assert moved > 100 * TOLERANCE  # training moved the prompt far more than the tolerance


def assert_interrupted_run_resumes_bit_identically(pair, config) -> None:
    """A 2-process run killed at step 5 and resumed ends as the uninterrupted 2-process run of ``pair``."""
    path, _, full, _ = pair
    cut = full.parent / "cut"
    probe = full.parent / "probe.py"
    done = two_processes(
        [path, "--output", cut],
        script=[probe, "train"],
        config=config,
        ok=False,
        env=clean_env(SOFTPROMPT_TEST_CRASH_AT="5"),
    )
    assert done.returncode != 0 and "crashing at step 5 on rank 1" in done.stdout, done.stderr[-4000:]
    assert checkpoint_meta(cut, "pt")["state"]["step"] == 4  # saved at step 4; step 5 is lost and redone
    two_processes([path, "--output", cut, "--resume"], script=[probe, "train"], config=config)
    assert checkpoint_meta(cut, "pt")["state"]["step"] == checkpoint_meta(full, "pt")["state"]["step"]
    for name in ("pt", "prefix"):  # the same number of processes: bit-identical
        assert (full / name / "adapter_model.safetensors").read_bytes() == (
            cut / name / "adapter_model.safetensors"
        ).read_bytes(), name
    assert train_losses(cut) == train_losses(full)


@pytest.fixture(scope="module")
def fsdp_untied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")  # checkpointed blocks (the tied run below: not checkpointed)
    return fsdp_pair(tmp, save_tiny_checkpoint("llama", tmp / "tiny-llama"), checkpointing=True)


def test_fsdp_two_processes_give_the_one_process_adapters(fsdp_untied):
    _, one, two, _ = fsdp_untied
    assert_same_training(one, two)
    assert_training_moved_the_prompt(one, two)


def test_fsdp_shards_the_frozen_base_in_each_process(fsdp_untied):
    assert_half_of_the_base_per_process(fsdp_untied[3], tied=False)


def test_interrupted_fsdp_run_resumes_to_the_uninterrupted_result(fsdp_untied):
    assert_interrupted_run_resumes_bit_identically(fsdp_untied, GLOO_FSDP)


def test_fsdp_with_tied_embeddings_gives_the_one_process_adapters(tmp_path):
    _, one, two, done = fsdp_pair(tmp_path, tied_llama_checkpoint(tmp_path / "tiny-llama-tied"), rows=13)
    assert_half_of_the_base_per_process(done, tied=True)
    assert_same_training(one, two)
    # 10 + 11 training rows in global batches of 5: each epoch ends with a batch of one row, so rank 0's
    # slice is empty there and it runs only the loss-free rows (the all-gathers must still match rank 1's)
    trained = sum(
        len(load_file(two / name / "training_state.safetensors")["data.train_fingerprints"])
        for name in ("pt", "prefix")
    )
    assert trained == 21 and checkpoint_meta(two, "pt")["state"]["step"] == 2 * 5


FAMILY_SCRIPT = """
import sys
import torch
from tiny import FAMILIES, tiny_model
from softprompt.training import distributed

dist = distributed.current()
assert dist.shards_base, dist

def run(model, sharded, checkpointed=False):
    model.add_adapter("pt", "prompt_tuning", seed=0, num_virtual_tokens=3, init="text", init_text="hi there")
    model.add_adapter("px", "prefix_tuning", seed=0, num_virtual_tokens=2)
    model.gradient_checkpointing = checkpointed
    if sharded:
        dist.shard_base(model)
    model.train()
    torch.manual_seed(1)
    ids = torch.randint(3, 200, (4, 7))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, adapters=["pt", "px", None, "pt"], labels=labels)
    out.loss.backward()
    model.eval()
    with torch.no_grad():
        state = model.prefill(ids, torch.ones_like(ids), ["pt", "px", None, "pt"])
        logits = model.advance(state, ids[:, :2])
        text = model.generate(["abc", "xyz"], adapters="px", max_new_tokens=4)
    return [out.loss.detach(), *[p.grad for p in model.adapters.parameters()], state.logits, logits], text

for family in FAMILIES:
    whole, text = run(tiny_model(family), False)
    for checkpointed in (False, True):
        sharded, sharded_text = run(tiny_model(family), True, checkpointed)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(whole, sharded))
        sys.stdout.write("FAMILY %s rank=%d checkpointed=%d diff=%.3g same_text=%d%s"
                         % (family, dist.rank, checkpointed, diff, text == sharded_text, chr(10)))
        sys.stdout.flush()
"""


@pytest.mark.parametrize("config", [GLOO_FSDP, GLOO_ZERO3], ids=["fsdp", "zero3"])
def test_fsdp_shards_every_family_of_the_table_without_changing_any_result(tmp_path, config):
    """Training forward/backward, prefill, decoding and generation, sharded (with and without gradient
    checkpointing) and not, for every tiny family (FSDP, and DeepSpeed ZeRO-3: GPT-2's tied head, T5's shared
    matrix and its encoder called alone)."""
    script = tmp_path / "families.py"
    script.write_text(FAMILY_SCRIPT)
    done = two_processes([], script=[script], config=config, env=clean_env(PYTHONPATH=python_path(ROOT / "tests")))
    from tiny import FAMILIES

    lines = [line.split() for line in done.stdout.splitlines() if line.startswith("FAMILY ")]
    assert sorted((f, r, c) for _, f, r, c, *_ in lines) == sorted(
        (f, f"rank={r}", f"checkpointed={c}") for f in FAMILIES for r in (0, 1) for c in (0, 1)
    )
    for _, family, rank, checkpointed, diff, same_text in lines:
        assert float(diff.split("=")[1]) < 1e-6 and same_text == "same_text=1", (family, rank, checkpointed, diff)


# --------------------------------------------------------------------------- DeepSpeed ZeRO-3: real launches


@pytest.fixture(scope="module")
def zero3_untied(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero3")
    return fsdp_pair(tmp, save_tiny_checkpoint("llama", tmp / "tiny-llama"), config=GLOO_ZERO3)


def test_zero3_two_processes_give_the_one_process_adapters(zero3_untied):
    _, one, two, done = zero3_untied
    assert_same_training(one, two)
    first = json.loads((one / "metrics.jsonl").read_text().splitlines()[0])
    assert first["type"] == "eval" and first["model"] == "base"  # the zero-shot pass: the base whole, untrained
    assert_training_moved_the_prompt(one, two)


def test_zero3_partitions_the_frozen_base_in_each_process(zero3_untied):
    assert_half_of_the_base_per_process(zero3_untied[3], tied=False)


def test_interrupted_zero3_run_resumes_to_the_uninterrupted_result(zero3_untied):
    assert_interrupted_run_resumes_bit_identically(zero3_untied, GLOO_ZERO3)
