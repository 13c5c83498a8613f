"""The vLLM engine process: a small server the ``vllm`` engine starts and talks to.

Run as a script by the trainer, possibly with the interpreter of another environment
(``engine.python``): it imports only the standard library, vLLM, torch and safetensors,
never rlhfkit, so vLLM's pinned stack can live apart from the trainer's. The trainer
sends the address and key of its listener on stdin; the server connects back
(``multiprocessing.connection``: HMAC-authenticated, localhost) and answers requests of
plain Python values (no tensors cross, so the two sides' torch versions may differ):

- ``{"op": "generate", "prompts", "max_tokens", "temperature", "top_k", "top_p", "seeds",
  "greedy", "eos"}`` -> ``{"tokens", "logprobs"}`` per prompt and ``cpu_s``, the CPU
  seconds the server spent (every thread);
- ``{"op": "load", "path": a safetensors file, "tied": bool}`` -> ``{"seconds"}``;
- ``{"op": "close"}``.

Every answer has ``ok``; a failed request answers ``{"ok": False, "error": traceback}``
and the server goes on. vLLM runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
so the weights can be reloaded in place; its thread, RNG and process-group settings stay
in this process.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from multiprocessing.connection import Client
from pathlib import Path

# run by path, this file's folder heads sys.path: its neighbours must not shadow vllm & co.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]


def main() -> None:
    setup = json.loads(sys.stdin.readline())
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(setup["kv_cache_gb"]))))
    if setup.get("threads_bind"):
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = setup["threads_bind"]
    if setup.get("threads"):  # before vLLM takes torch.set_num_threads over
        import torch

        os.environ["OMP_NUM_THREADS"] = str(setup["threads"])
        torch.set_num_threads(setup["threads"])
    connection = Client(tuple(setup["address"]), authkey=bytes.fromhex(setup["key"]))
    try:
        llm = start(setup)
    except BaseException:  # noqa: BLE001 - reported to the trainer, then exit
        connection.send({"ok": False, "error": traceback.format_exc()})
        return
    import vllm

    connection.send({"ok": True, "version": vllm.__version__, "pid": os.getpid()})
    while True:
        try:
            request = connection.recv()
        except EOFError:  # the trainer is gone
            return
        if request.get("op") == "close":
            connection.send({"ok": True})
            return
        try:
            answer = handle(llm, request)
        except Exception:  # noqa: BLE001 - one failed request does not end the engine
            answer = {"ok": False, "error": traceback.format_exc()}
        connection.send(answer)


def start(setup: dict) -> object:
    from vllm import LLM

    kwargs = {"model": setup["model_dir"], "dtype": setup["dtype"], "seed": setup["seed"],
              "load_format": "dummy", "runner": "generate", "max_model_len": setup["max_model_len"],
              "enforce_eager": True, "logprobs_mode": "processed_logprobs",
              "enable_prefix_caching": setup["prefix_caching"], "compilation_config": {"mode": 0}}
    if setup["device"] == "cpu":
        kwargs["kv_cache_memory_bytes"] = int(setup["kv_cache_gb"] * 2**30)
    else:
        kwargs["gpu_memory_utilization"] = setup["gpu_memory_utilization"]
    return LLM(**kwargs)


def handle(llm: object, request: dict) -> dict:
    if request["op"] == "generate":
        return generate(llm, request)
    if request["op"] == "load":
        return load(llm, request)
    raise ValueError(f"unknown request {request.get('op')!r}")


def generate(llm: object, request: dict) -> dict:
    from vllm import SamplingParams

    params = []
    for seed in request["seeds"]:
        sampling = ({"temperature": 0.0} if request["greedy"] else
                    {"temperature": request["temperature"], "top_k": request["top_k"] or 0,
                     "top_p": request["top_p"], "seed": seed})
        params.append(SamplingParams(max_tokens=request["max_tokens"], logprobs=0, detokenize=False,
                                     stop_token_ids=[request["eos"]], ignore_eos=False, **sampling))
    cpu = time.process_time()
    outputs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
    cpu = time.process_time() - cpu
    tokens, logprobs = [], []
    for output in outputs:
        sample = output.outputs[0]
        ids = list(sample.token_ids)
        tokens.append(ids)
        logprobs.append([step[token].logprob for step, token in zip(sample.logprobs, ids, strict=True)])
    return {"ok": True, "tokens": tokens, "logprobs": logprobs, "cpu_s": cpu}


def load(llm: object, request: dict) -> dict:
    """Load full weights (transformers checkpoint names) in place, then redo what vLLM
    derives from them at load time that a reload leaves alone: the prepacked LM head of a
    model whose head is tied to its input embeddings (the checkpoint has no head weight,
    so the reload never revisits the head)."""
    from safetensors.torch import load_file

    started = time.perf_counter()
    weights = load_file(request["path"])
    runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    runner.reload_weights(weights_iterator=iter(weights.items()), is_checkpoint_format=True)
    model = runner.get_model()
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if request.get("tied") and method is not None and hasattr(method, "process_weights_after_loading"):
        method.process_weights_after_loading(head)
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    return {"ok": True, "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    main()
