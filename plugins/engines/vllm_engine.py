"""The ``vllm`` engine's trainer side: starts the engine process, pushes weights, samples.

The engine always runs in a process of its own (``vllm_server.py``), with this
interpreter or ``engine.python`` (another environment, so vLLM's pins never touch the
trainer's). In that process vLLM takes over the thread count, reseeds global RNGs and
adopts the default process group; apart, none of that reaches the trainer. Under DDP
every rank starts its own engine (each samples its own share of the prompts, the way
the ``hf`` engine does; with ``threads_bind: auto`` each gets its share of the cores):
no rank waits on another's rollout and a weight push never crosses ranks.

Weights travel as a safetensors file in ``<stage>/engine/`` (written, memory-mapped by
the engine, removed), in the transformers checkpoint's names (LoRA merged into a copy),
cast to the engine's dtype; requests and answers go over the authenticated local
connection. Nothing is written outside the stage directory (the engine's config, log and
vLLM's caches live in ``<stage>/engine/``).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Sequence
from multiprocessing.connection import Listener
from pathlib import Path
from typing import Any

import torch

from rlhfkit import EngineError, Generation, SamplingSettings
from rlhfkit.plugins.engines import VLLMEngineConfig

SERVER = Path(__file__).with_name("vllm_server.py")
DOCS = "docs/engines.md"


def rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def cores_of(rank: int, world: int) -> str:
    """This rank's contiguous share of the cores the process may use (``"0-3"``)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // world)
    mine = cores[rank * share:(rank + 1) * share] or cores[-1:]
    return ",".join(str(c) for c in mine)


class VLLMEngine:
    """Samples with vLLM; ``sync`` pushes the policy's weights, ``check`` compares the
    engine's log-probs with the trainer's."""

    seeds_per_row = True  # every request carries its own seed

    def __init__(self, config: VLLMEngineConfig, context: Any = None):
        self.config = config
        self.directory = Path(getattr(context, "stage_dir", Path.cwd())) / "engine"
        self.seed = getattr(context, "seed", 0)
        self.process: subprocess.Popen | None = None
        self.connection: Any = None
        self.version = ""
        self.checked = False
        self.tied = False
        self.engine_cpu_s = 0.0  # CPU seconds the engine process spent generating

    # ------------------------------------------------------------------ lifecycle
    def start(self, policy: Any) -> None:
        """Start the engine process for ``policy``'s architecture and push its weights."""
        if self.process is not None:
            return
        rank, world = rank_and_world()
        self.directory = self.directory / f"rank{rank}" if world > 1 else self.directory
        model_dir = self.directory / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        plain = _base_model(policy.model)
        config = plain.config.to_dict()
        config["architectures"] = [type(plain).__name__]  # what vLLM picks its implementation by
        (model_dir / "config.json").write_text(json.dumps(config, indent=2))
        policy.tokenizer.save_pretrained(str(model_dir))  # vLLM reads it at start; tokens travel as ids
        self.tied = bool(getattr(plain.config, "tie_word_embeddings", False))
        self.eos, self.pad = policy.tokenizer.eos_token_id, policy.tokenizer.pad_token_id
        dtype = self.config.dtype if self.config.dtype != "auto" else str(plain.dtype).removeprefix("torch.")
        self.dtype = getattr(torch, dtype)
        bind = self.config.threads_bind
        if bind == "auto" and world > 1 and policy.device.type == "cpu":
            bind = cores_of(rank, world)
        python = self.config.python or os.environ.get("RLHFKIT_VLLM_PYTHON") or sys.executable
        key = secrets.token_bytes(32)
        listener = Listener(("127.0.0.1", 0), authkey=key)
        setup = {"address": list(listener.address), "key": key.hex(), "model_dir": str(model_dir),
                 "dtype": dtype, "seed": self.seed, "max_model_len": _max_positions(plain.config),
                 "prefix_caching": self.config.prefix_caching, "device": policy.device.type,
                 "kv_cache_gb": self.config.kv_cache_gb, "gpu_memory_utilization": self.config.gpu_memory_utilization,
                 "threads_bind": bind, "threads": self.config.threads}
        env = dict(os.environ, VLLM_CACHE_ROOT=str(self.directory / "cache"), TMPDIR=str(self.directory / "tmp"),
                   VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", PYTHONUNBUFFERED="1")
        (self.directory / "tmp").mkdir(exist_ok=True)
        self.log_path = self.directory / "engine.log"
        try:
            log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes it for its whole life
            self.process = subprocess.Popen([python, str(SERVER)], stdin=subprocess.PIPE, stdout=log,
                                            stderr=subprocess.STDOUT, env=env, cwd=str(self.directory))
        except OSError as exc:
            listener.close()
            raise EngineError(f"the vllm engine could not start {python!r}: {exc}. Set engine.python (or "
                              f"RLHFKIT_VLLM_PYTHON) to the interpreter of the environment vLLM is installed in "
                              f"({DOCS}#vllm).") from None
        finally:
            if "log" in locals():
                log.close()
        self.process.stdin.write((json.dumps(setup) + "\n").encode())
        self.process.stdin.close()
        self.connection = self._accept(listener)
        ready = self._receive(self.config.start_timeout_s, "starting")
        self.version = ready.get("version", "")
        self.sync(policy)

    def _accept(self, listener: Listener) -> Any:
        """The engine's connection; fails fast when the process dies first."""
        import threading

        accepted: list[Any] = []
        thread = threading.Thread(target=lambda: accepted.append(_accept_or_none(listener)), daemon=True)
        thread.start()
        deadline = time.monotonic() + self.config.start_timeout_s
        while thread.is_alive():
            thread.join(0.2)
            if self.process.poll() is not None:
                listener.close()
                self._died("starting")
            if time.monotonic() > deadline:
                listener.close()
                self._timed_out(self.config.start_timeout_s, "starting")
        listener.close()
        if not accepted or accepted[0] is None:
            self._died("starting")
        return accepted[0]

    def close(self) -> None:
        """Stop the engine process (also when it hangs); safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        try:
            if process.poll() is None and self.connection is not None:
                self.connection.send({"op": "close"})
                if self.connection.poll(10):
                    self.connection.recv()
        except (OSError, EOFError):
            pass
        finally:
            if self.connection is not None:
                self.connection.close()
                self.connection = None
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def __del__(self) -> None:  # a run that fails before close() must not leave an engine behind
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            process.kill()

    # ------------------------------------------------------------------ requests
    def _call(self, request: dict[str, Any], what: str, timeout: float | None = None) -> dict[str, Any]:
        if self.process is None:
            raise EngineError(f"the vllm engine is not running ({what}); it was closed or never started")
        try:
            self.connection.send(request)
        except (OSError, EOFError, ValueError):
            self._died(what)
        return self._receive(timeout or self.config.request_timeout_s, what)

    def _receive(self, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.connection.poll(0.2):
                    answer = self.connection.recv()
                    break
            except (OSError, EOFError):
                self._died(what)
            if self.process.poll() is not None:
                self._died(what)
            if time.monotonic() > deadline:
                self._timed_out(timeout, what)
        if not answer.get("ok"):
            error = answer.get("error", "").strip().splitlines()
            raise EngineError(f"the vllm engine failed while {what}: {error[-1] if error else 'no message'}. "
                              f"Full traceback in {self.log_path}.\n" + "\n".join(error[-12:]))
        return answer

    def _drop(self, grace: float = 5.0) -> int | None:
        """Drop the connection and the process (killed if it has not exited within
        ``grace`` seconds); its exit code."""
        process, self.process = self.process, None
        if self.connection is not None:
            self.connection.close()
            self.connection = None
        if process is None:
            return None
        try:
            return process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()

    def _timed_out(self, timeout: float, what: str) -> None:
        self._drop(grace=0)
        raise EngineError(f"the vllm engine did not answer within {timeout:.0f} s ({what}); it was stopped. Its "
                          f"log: {self.log_path}. Raise engine.request_timeout_s or engine.start_timeout_s if it "
                          f"is only slow.")

    def _died(self, what: str) -> None:
        code = self._drop()
        tail = _tail(self.log_path)
        raise EngineError(
            f"the vllm engine process died while {what} (exit code {code}). The end of its log "
            f"({self.log_path}):\n{tail}\nIs vLLM installed for {self.config.python or 'this interpreter'}? "
            f"See {DOCS}#vllm.")

    def sync(self, policy: Any) -> None:
        """Push the policy's current weights (LoRA merged) into the engine: written as one
        safetensors file in ``<stage>/engine/`` (the page cache, in practice), read by the
        engine with a memory map, then removed."""
        from safetensors.torch import save_file

        plain = policy.plain_model()
        state = {}
        for name, tensor in plain.state_dict().items():
            if self.tied and name == "lm_head.weight":
                continue  # the engine's head is its embedding: pushed once, as the checkpoint has it
            state[name] = tensor.detach().to(device="cpu", dtype=self.dtype if tensor.is_floating_point()
                                             else tensor.dtype).contiguous()
        path = self.directory / "weights.safetensors"
        partial = path.with_name("weights.safetensors.partial")
        try:
            save_file(state, str(partial))
            os.replace(partial, path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise EngineError(f"could not write the weights for the vllm engine to {path}: {exc}. Free space "
                              f"there (it holds one copy of the model while it is pushed).") from None
        del state
        try:
            self._call({"op": "load", "path": str(path), "tied": self.tied}, "loading weights")
        finally:
            path.unlink(missing_ok=True)
        self.checked = self.checked and self.config.check != "every"

    def check(self, gap: float, where: str) -> None:
        """Stop when the engine's log-probs of a just-synced rollout are further from the
        trainer's than ``check_tolerance`` (mean absolute difference per token)."""
        if self.config.check == "never" or self.checked:
            return
        self.checked = True
        if gap > self.config.check_tolerance:
            raise EngineError(
                f"the vllm engine's log-probs differ from the trainer's by {gap:.3g} per token on average ({where}), "
                f"over engine.check_tolerance {self.config.check_tolerance:g}: its weights are not the policy's "
                f"(a failed weight push) or its numerics differ (dtype {self.dtype}). See {DOCS}#weight-sync.")

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor, sampling: SamplingSettings, *,
                 seeds: Sequence[int], greedy: bool = False) -> Generation:
        prompts = [row[mask.bool()].tolist() for row, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)]
        answer = self._call({"op": "generate", "prompts": prompts, "max_tokens": sampling.max_new_tokens,
                             "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p,
                             "seeds": [int(s) % 2**63 for s in seeds], "greedy": greedy, "eos": self.eos},
                            "generating")
        self.engine_cpu_s += answer.get("cpu_s", 0.0)
        width = max(1, max(len(t) for t in answer["tokens"]))
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        logprobs = torch.zeros(len(prompts), width)
        mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for i, (tokens, values) in enumerate(zip(answer["tokens"], answer["logprobs"], strict=True)):
            ids[i, :len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            logprobs[i, :len(values)] = torch.tensor(values)
            mask[i, :len(tokens)] = 1
        device = prompt_ids.device
        return Generation(ids.to(device), mask.to(device), logprobs.to(device))


def _accept_or_none(listener: Listener) -> Any:
    try:
        return listener.accept()
    except (OSError, EOFError):
        return None


def _base_model(model: torch.nn.Module) -> Any:
    """The transformers model under a peft wrapper (its config and dtype)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _max_positions(config: Any) -> int:
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    useful = [line for line in text if " INFO " not in line] or text
    return "\n".join(useful[-lines:])
