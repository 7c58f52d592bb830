"""Lean FSDP/ZeRO-3 loading (`softprompt.training.lean_load`): each process reads only its part of the frozen weights."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from softprompt.training.lean_load import lean_plan, read_rows, safetensors_index, to_meta

from tiny import VOCAB, tiny_base, tiny_tokenizer
from toy_data import toy_rows, write_csv

ROOT = Path(__file__).resolve().parents[2]
GLOO_FSDP = ROOT / "configs" / "accelerate" / "cpu_gloo_fsdp_2proc.yaml"
GLOO_ZERO3 = ROOT / "configs" / "accelerate" / "cpu_gloo_deepspeed_2proc.yaml"


def test_rows_are_read_from_the_file_in_any_dtype(tmp_path):
    weights = {"a": torch.arange(35, dtype=torch.float32).reshape(7, 5), "b": torch.randn(4, 2, 3).bfloat16()}
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    stored = safetensors_index(tmp_path)
    assert set(stored) == {"a", "b"} and stored["b"].dtype == torch.bfloat16 and stored["b"].shape == (4, 2, 3)
    out = torch.empty(3, 5)
    read_rows(stored["a"], 4, out)
    assert torch.equal(out, weights["a"][4:])
    converted = torch.empty(2, 2, 3)  # float32 from the stored bfloat16
    read_rows(stored["b"], 1, converted)
    assert torch.equal(converted, weights["b"][1:3].float())


def test_a_plan_needs_every_parameter_in_the_checkpoint_and_meta_keeps_ties(tmp_path):
    base = tiny_base("llama")
    base.save_pretrained(tmp_path / "llama")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "llama")
    plan = lean_plan(loaded)
    assert plan is not None and set(plan) == {n for n, _ in loaded.named_parameters()}
    assert lean_plan(tiny_base("llama")) is None  # built in code: nothing to read from
    with torch.no_grad():
        loaded.model.norm.weight[0] += 1  # changed after loading: no longer the stored weights
    assert lean_plan(loaded) is None
    with torch.no_grad():
        loaded.model.norm.weight[0] -= 1
    loaded.config.tie_word_embeddings = True
    loaded.tie_weights()
    to_meta(loaded)
    assert all(p.is_meta for p in loaded.parameters())
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert not any(b.is_meta for b in loaded.buffers())


MEASURE = """
def status(field):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(field + ":"))

def reset_peak():  # VmHWM restarts from the current resident memory
    open("/proc/self/clear_refs", "w").write("5")
    return status("VmRSS")
"""

# One process holding the whole base (in the dtype asked for): how far its resident memory rises from before
# loading to its peak once every weight has been read.
WHOLE = (
    MEASURE
    + """
import sys
import softprompt
start = reset_peak()
model = softprompt.load(sys.argv[1], dtype=sys.argv[2] if len(sys.argv) > 2 else None)
for param in model.base.parameters():
    param.sum()  # read: its pages become resident
print("WHOLE peak=%d" % (status("VmHWM") - start))
"""
)

# The same under FSDP or ZeRO-3, per process: from before loading to its peak by the end of the lean fill, with the
# bytes of its shards and of the whole base, and whether every weight, gathered, is the checkpoint's in the dtype
# asked for; then it leaves (no training needed).
PROBE = (
    MEASURE
    + """
import glob, os, sys
import deepspeed  # imported before the baseline (ZeRO-3 imports it while sharding): not the weights' memory
import torch
from safetensors.torch import load_file
from softprompt import cli
from softprompt.training import distributed, lean_load, loop

start, original_load = {}, loop.load

def load(*args, **kwargs):
    start["rss"] = reset_peak()
    return original_load(*args, **kwargs)

def measured(fill):  # the peak by the end of the lean fill (FSDP's first forward, after it, gathers units)
    def fill_and_measure(*args):
        fill(*args)
        start["peak"] = status("VmHWM") - start["rss"]
    return fill_and_measure

def shard_base(self, model, dtype=None):
    original_shard_base(self, model, dtype)
    peak = start["peak"]
    params = dict(model.base.named_parameters())
    zero = any(hasattr(p, "ds_id") for p in params.values())
    local = sum((p.ds_tensor.numel() if zero else p.to_local().numel()) * p.element_size() for p in params.values())
    whole = sum((p.ds_numel if zero else p.numel()) * p.element_size() for p in params.values())
    stored = {}
    for path in glob.glob(os.path.join(model.name_or_path, "*.safetensors")):
        stored.update(load_file(path))
    context = deepspeed.zero.GatheredParameters(list(params.values())) if zero else None
    with context or torch.no_grad():
        same = all(torch.equal(p.data if zero else p.full_tensor(), stored[n].to(p.dtype)) for n, p in params.items())
    dtypes = ",".join(sorted({str(p.dtype) for p in params.values()}))
    sys.stdout.write("LEAN rank=%d peak=%d local=%d whole=%d same=%d dtype=%s%s"
                     % (self.rank, peak, local, whole, same, dtypes, chr(10)))
    sys.stdout.flush()
    self.barrier()
    os._exit(0)

loop.load = load
lean_load.fill_shards, lean_load.fill_each = measured(lean_load.fill_shards), measured(lean_load.fill_each)
original_shard_base, distributed.Distributed.shard_base = distributed.Distributed.shard_base, shard_base
sys.exit(cli.main(sys.argv[1:]))
"""
)


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc/self/status (Linux)")
@pytest.mark.parametrize(
    ("config", "stored", "dtype"),
    [(GLOO_ZERO3, "float32", "bfloat16"), (GLOO_FSDP, "bfloat16", "float32")],
    ids=["zero3-float32-as-bfloat16", "fsdp-bfloat16-as-float32"],
)
def test_each_sharding_process_holds_about_half_of_the_weights_at_its_peak(tmp_path, config, stored, dtype):
    """FSDP and ZeRO-3, in the checkpoint's dtype or another (--dtype): each process reads only its part of the
    weights, converted as they are read, and every weight ends up the checkpoint's in the dtype asked for."""
    torch.manual_seed(0)
    config_ = LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=24,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    # ~95 MB of float32 weights (48 MB as bfloat16), 24 small units
    LlamaForCausalLM(config_).to(getattr(torch, stored)).save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    data = write_csv(tmp_path / "rows.csv", toy_rows(8))
    (tmp_path / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")} | {
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        # every tensor its own mapping, returned on free: the peak is that of live memory (see research/scale.py)
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    args = ["--model", tmp_path / "model", "--data", data, "--text-column", "text", "--label-column", "label"]
    args += ["--num-virtual-tokens", "2", "--batch-size", "2", "--output", tmp_path / "out"]
    args += ["--dtype", dtype] if dtype else []
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, tmp_path / "probe.py"]
    done = subprocess.run(
        [str(a) for a in [*launch, "train", *args]], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-4000:]
    whole_args = [str(tmp_path / "model"), *([dtype] if dtype else [])]
    alone = subprocess.run(
        [sys.executable, "-c", WHOLE, *whole_args], env=env, capture_output=True, text=True, timeout=120
    )
    assert alone.returncode == 0, alone.stderr[-4000:]
    whole_peak = int(alone.stdout.split("WHOLE peak=")[1].split()[0])
    found = [dict(item.split("=") for item in line.split()[1:]) for line in done.stdout.splitlines() if "LEAN " in line]
    assert sorted(int(f["rank"]) for f in found) == [0, 1], done.stdout[-2000:]
    assert whole_peak >= int(found[0]["whole"])
    for f in found:
        peak, local, whole = int(f["peak"]), int(f["local"]), int(f["whole"])
        assert f["same"] == "1" and f["dtype"] == f"torch.{dtype or stored}", f
        assert abs(local - whole / 2) <= 0.01 * whole  # its shards: half of the base
        # About half of one process holding the base (FSDP, float32 checkpoint and weights, measured 0.54 and 0.59:
        # each process also holds ~15 MB of tokenizer and loading bookkeeping); without lean loading each rose by
        # over the whole base, and loaded in another dtype than the checkpoint's each held a converted whole base.
        print(f"rank {f['rank']}: peak {peak / 2**20:.1f} MiB, {peak / whole_peak:.2f}x one whole process")
        assert peak < 0.7 * whole_peak, (f, whole_peak)
