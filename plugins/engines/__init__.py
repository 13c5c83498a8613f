"""Generation engines: what samples an algorithm's responses (kind ``engine``).

- ``hf``: the policy's own model with the KV cache, in the trainer's process (rlhfkit's
  in-place-cache loop, or transformers ``generate``); always in sync with the trained weights.
- ``vllm``: vLLM in a process of its own (optionally another environment's interpreter),
  with the trained weights pushed into it before every rollout that follows an update.

Both return the sampled tokens and their log-probs under the engine (see
:class:`rlhfkit.Generation`). docs/engines.md.
"""

from __future__ import annotations

import os
import shutil
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from rlhfkit import ComponentSpec, hookimpl, lazy


class HFEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    cache: Literal["in-place", "dynamic", "static"] = Field(
        "in-place", description="KV cache: in-place (rlhfkit's sampling loop over a cache written in place; "
                                "the same samples as transformers generate), or transformers generate with its "
                                "dynamic (grows by concatenation each token) or static (preallocated) cache")


class VLLMEngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    python: str | None = Field(None, description=(
        "interpreter of the environment vLLM is installed in (its own pins); default: $RLHFKIT_VLLM_PYTHON, "
        "else this interpreter. The engine process runs rlhfkit's server script with it"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="the engine's weights and activations; auto: the policy's dtype")
    kv_cache_gb: float = Field(1.0, gt=0, description="memory for the KV cache, GiB (CPU)")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="share of the GPU vLLM may take (GPU)")
    threads_bind: str = Field("auto", description=(
        "CPU cores of the engine (vLLM's VLLM_CPU_OMP_THREADS_BIND: auto, nobind, or e.g. 0-3); auto under "
        "several ranks gives each rank's engine its own share of this process's cores"))
    threads: int | None = Field(None, ge=1, description=(
        "torch/OpenMP threads of the engine process (CPU); default: vLLM's choice, which on CPU may use more "
        "cores than threads_bind names"))
    prefix_caching: bool = Field(True, description="reuse the KV of a prompt's samples (group sampling)")
    check: Literal["first", "every", "never"] = Field(
        "first", description="compare the engine's log-probs with the trainer's forward after the first weight "
                             "push (first), after every push (every) or never; a gap over check_tolerance stops")
    check_tolerance: float = Field(1e-3, gt=0, description=(
        "largest allowed mean |engine - trainer| log-prob of the checked responses (fp32: ~1e-5; bf16: ~1e-2)"))
    start_timeout_s: float = Field(600.0, gt=0, description="seconds the engine may take to start")
    request_timeout_s: float = Field(3600.0, gt=0, description="seconds one request (a rollout) may take")

    @field_validator("python")
    @classmethod
    def _executable(cls, value: str | None) -> str | None:
        """An interpreter that exists (``~`` expanded, or a name on PATH): `validate`
        refuses what `run` could not start."""
        if value is None:
            return None
        path = os.path.expanduser(value)
        found = shutil.which(path)
        if found is None:
            raise ValueError(f"no executable interpreter at {value!r}: point engine.python at the python of the "
                             f"environment vLLM is installed in (docs/engines.md#vllm)")
        return path


@hookimpl
def rlhfkit_components() -> list[ComponentSpec]:
    return [
        ComponentSpec(kind="engine", name="hf", config=HFEngineConfig, factory=lazy("rlhfkit.plugins.engines.hf:HFEngine"),
                      doc="the policy's own model with the KV cache (written in place), in the trainer's process (default)",
                      provides=frozenset({"start"})),
        ComponentSpec(kind="engine", name="vllm", config=VLLMEngineConfig,
                      factory=lazy("rlhfkit.plugins.engines.vllm_engine:VLLMEngine"),
                      doc="vLLM in its own process (optionally its own environment), weights pushed after updates",
                      provides=frozenset({"start", "sync", "close", "check"})),
    ]
