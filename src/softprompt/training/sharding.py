"""The sharding settings of an accelerate launch (FSDP2 or DeepSpeed ZeRO-3), read and checked.

Each refusal names the accelerate-config field softprompt cannot honour and why (`softprompt.training.distributed`
uses these when it shards the frozen base)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from softprompt.errors import ConfigError


@dataclass(frozen=True)
class FsdpSettings:
    """The accelerate ``fsdp_config`` settings softprompt honours when it shards the frozen base."""

    # True: free each unit's gathered weights right after its forward (least memory; FULL_SHARD).
    # False: keep them until the backward pass (fewer all-gathers, more memory; SHARD_GRAD_OP).
    reshard_after_forward: bool = True
    # fsdp_activation_checkpointing: the same as softprompt's --gradient-checkpointing (the engine checkpoints the
    # transformer blocks itself; accelerate's module wrappers are not used).
    activation_checkpointing: bool = False


@dataclass(frozen=True)
class ZeroSettings:
    """The DeepSpeed config's ``zero_optimization`` section (stage 3) softprompt partitions the base with."""

    zero_optimization: dict


def fsdp_settings(accelerator) -> FsdpSettings:
    """The FSDP settings of this launch, checked; refuses those softprompt cannot honour, naming the field."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from torch.distributed.fsdp import CPUOffloadPolicy

    # On GPUs accelerate builds the plugin; on the CPU it builds none, so read the same FSDP_* variables its
    # launcher exported from the config, the same way.
    plugin = getattr(accelerator.state, "fsdp_plugin", None) or FullyShardedDataParallelPlugin()
    if plugin.fsdp_version != 2:
        raise ConfigError(
            f"fsdp_config.fsdp_version: {plugin.fsdp_version} (accelerate config); softprompt shards the "
            f"frozen base with FSDP2 (fully_shard): set fsdp_version: 2 "
            f"(see configs/accelerate/fsdp.yaml)"
        )
    if isinstance(plugin.cpu_offload, CPUOffloadPolicy) or getattr(plugin.cpu_offload, "offload_params", False):
        raise ConfigError(
            "fsdp_config.fsdp_offload_params: true is not supported by softprompt train (the engine "
            "places inputs on the device its weights live on); set it to false"
        )
    return FsdpSettings(
        reshard_after_forward=plugin.reshard_after_forward is not False,
        activation_checkpointing=bool(plugin.activation_checkpointing),
    )


def zero_settings(accelerator) -> ZeroSettings:
    """The DeepSpeed settings of this launch, checked; refuses those softprompt cannot honour, naming the field
    (as the accelerate config names it, and as a ``deepspeed_config_file`` does)."""
    try:
        import deepspeed  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"distributed_type: DEEPSPEED (accelerate config) needs the deepspeed package, which does "
            f"not import here ({e}); install it (scripts/setup.sh --dev does) or launch with "
            f"configs/accelerate/fsdp.yaml"
        ) from None
    from accelerate.utils import DeepSpeedPlugin

    # On GPUs accelerate builds the plugin; on the CPU it builds none, so read the same ACCELERATE_DEEPSPEED_*
    # variables its launcher exported from the config (or the deepspeed_config_file they name), the same way.
    plugin = getattr(accelerator.state, "deepspeed_plugin", None) or DeepSpeedPlugin()
    config = plugin.deepspeed_config
    zero = dict(config.get("zero_optimization") or {})
    if zero.get("stage") != 3:
        raise ConfigError(
            f"deepspeed_config.zero_stage: {zero.get('stage')} (accelerate config; zero_optimization."
            f"stage in a deepspeed_config_file); softprompt partitions the frozen base with ZeRO-3: set "
            f"3 (stages 1 and 2 partition optimizer state and gradients, which only the small adapters "
            f"have: launch with configs/accelerate/ddp_multi_gpu.yaml instead)"
        )
    for part in ("param", "optimizer"):
        device = (zero.get(f"offload_{part}") or {}).get("device") or "none"
        if str(device) != "none":
            why = (
                "the engine places inputs on the device its weights live on"
                if part == "param"
                else "the adapters are trained by softprompt's own AdamW, not DeepSpeed's optimizer"
            )
            raise ConfigError(
                f"deepspeed_config.offload_{part}_device: {device} (zero_optimization.offload_{part}."
                f"device in a deepspeed_config_file) is not supported by softprompt train ({why}); "
                f"set it to none"
            )
    refused = {"gradient_accumulation_steps": (1, "--grad-accum"), "gradient_clipping": (None, "--max-grad-norm")}
    for field, (neutral, option) in refused.items():
        if config.get(field, "auto") not in ("auto", neutral):
            raise ConfigError(
                f"deepspeed_config.{field}: {config[field]} is not used by softprompt train, which "
                f"steps the adapters itself; remove it and give {option}"
            )
    for field in ("optimizer", "scheduler"):
        if field in config:
            raise ConfigError(
                f"deepspeed_config_file: its {field!r} section is not used by softprompt train (the "
                f"adapters are trained by softprompt's AdamW and schedule); remove it"
            )
    for field in ("fp16", "bf16"):
        if (config.get(field) or {}).get("enabled") not in (None, False, "auto"):
            raise ConfigError(
                f"deepspeed_config_file: {field}.enabled is not supported by softprompt train; remove "
                f"it (precision is softprompt's own --bf16)"
            )
    # "auto" (accelerate's and transformers' templates) means DeepSpeed's default here
    return ZeroSettings({k: v for k, v in zero.items() if v != "auto"})


def deepspeed_launch(accelerator) -> bool:
    """Whether this accelerate launch asked for DeepSpeed."""
    # As with FSDP: distributed_type DEEPSPEED on GPUs; with `use_cpu: true` accelerate keeps MULTI_CPU, but its
    # launcher still exports ACCELERATE_USE_DEEPSPEED=true (and the ACCELERATE_DEEPSPEED_* settings).
    return accelerator.distributed_type.name == "DEEPSPEED" or os.environ.get(
        "ACCELERATE_USE_DEEPSPEED", ""
    ).lower() in ("1", "true", "yes")


def fsdp_launch(accelerator) -> bool:
    """Whether this accelerate launch asked for FSDP."""
    # With GPUs accelerate turns an FSDP config into distributed_type FSDP. With `use_cpu: true` it keeps
    # MULTI_CPU, but its launcher still exports ACCELERATE_USE_FSDP=true (and the FSDP_* settings).
    return accelerator.distributed_type.name == "FSDP" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in (
        "1",
        "true",
        "yes",
    )


__all__ = ["FsdpSettings", "ZeroSettings", "deepspeed_launch", "fsdp_launch", "fsdp_settings", "zero_settings"]
