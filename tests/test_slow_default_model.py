"""The slow suite: the real default model compiled, served and loaded (python -m pytest -m slow)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import torch
from conftest import REPO
from safetensors.torch import load_file
from server_handle import ServerHandle

from neuron_serve.artifact.graphs import GraphSet
from neuron_serve.backends.base import run_decode, run_prompt
from neuron_serve.backends.cpu.runners import EagerRunner
from neuron_serve.backends.registry import open_runner
from neuron_serve.compiler.compile import compile_recipe
from neuron_serve.engine.prompts import encode_prompt
from neuron_serve.model.quantization import QuantSpec
from neuron_serve.model.state import model_from_state_dict
from neuron_serve.model.step import PromptChunk, StepBatch
from neuron_serve.recipe.files import load_recipe
from neuron_serve.weights.loader import build_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_artifacts(tmp_path_factory):
    recipe = load_recipe(REPO / "compile" / "smollm2-135m-cpu.toml")
    return compile_recipe(recipe, tmp_path_factory.mktemp("default") / recipe.name).out_dir


def same_logits(compiled: torch.Tensor, eager: torch.Tensor) -> bool:
    """Within 1e-3 in fp32. In bf16 (the default recipe on a CPU with AMX or avx512_bf16), within 5 % of
    the largest logit: the graph fuses and rounds at other points than eager ops do, each rounding off
    by up to 2^-9, over 30 layers of about seven roundings each (observed: 0.4 on logits near 20)."""
    if eager.dtype == torch.float32:
        return bool((compiled - eager).abs().max() < 1e-3)
    return bool((compiled.float() - eager.float()).abs().max() < 0.05 * eager.float().abs().max())


def test_default_aot_graphs_match_eager(default_artifacts, default_loaded):
    """The compiled graph against the eager model of the same (int8-quantized) weights."""
    aot, manifest = open_runner(default_artifacts)
    shard = load_file(default_artifacts / manifest.weights[0])
    spec = QuantSpec.of(manifest.recipe.quantization)
    model = model_from_state_dict(manifest.model_config, shard, aot.graphs.max_seq_len, quantization=spec)
    eager = EagerRunner(model, aot.graphs)
    text = "The history of the Roman Empire is long and full of emperors, wars and roads. " * 120
    ids = default_loaded.tokenizer.encode(text)
    for slot, length in enumerate((10, 200, 900, 1500)):  # one step, or several continued
        assert same_logits(run_prompt(aot, ids[:length], slot), run_prompt(eager, ids[:length], slot))
    for slots, positions in (([0, 1], [10, 200]), ([0, 1, 2, 3], [10, 200, 900, 1500])):
        batch = StepBatch(slots, [ids[p] for p in positions], positions, [PromptChunk(5, 0, ids[:77])])
        assert same_logits(aot.step(batch).logits, eager.step(batch).logits)


@pytest.fixture(scope="module")
def default_server(default_artifacts):
    server = ServerHandle(default_artifacts, "--max-waiting", "64")
    yield server
    server.stop()


def test_default_model_served_answers_and_handles_32_streams(default_server):
    client = openai.OpenAI(base_url=f"{default_server.base_url}/v1", api_key="unused", max_retries=0)
    model = "smollm2-135m-cpu"
    answer = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    assert "Paris" in answer.choices[0].message.content

    def stream(i: int) -> int:
        chunks = list(
            client.completions.create(
                model=model,
                prompt=f"Story {i}: once upon a time",
                max_tokens=32,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
        )
        return chunks[-1].usage.completion_tokens

    with ThreadPoolExecutor(32) as pool:
        assert list(pool.map(stream, range(32))) == [32] * 32


def test_ping_stays_fast_through_long_prefills(default_server):
    """Three 1500-token prompts keep the engine in prefill for seconds (a 1024-token graph call alone
    takes about one); the forward process runs them, so the worker's /ping thread is never held up."""
    url = default_server.base_url
    prompt = " ".join(["history"] * 1500)

    def long_request(_) -> int:
        body = {"model": "smollm2-135m-cpu", "prompt": prompt, "max_tokens": 4}
        return requests.post(f"{url}/v1/completions", json=body, timeout=300).status_code

    latencies = []
    with ThreadPoolExecutor(3) as pool:
        statuses = pool.map(long_request, range(3))
        time.sleep(0.5)  # the first prefill has begun
        while len(latencies) < 200:
            started = time.perf_counter()
            assert requests.get(f"{url}/ping", timeout=10).status_code == 200
            latencies.append(time.perf_counter() - started)
            time.sleep(0.01)
        assert list(statuses) == [200] * 3
    assert max(latencies) < 0.1, f"slowest /ping {max(latencies) * 1000:.0f} ms"


def greedy_answer(model, tokenizer) -> str:
    runner = EagerRunner(model, GraphSet(1, 256, (64,), (256,)))
    ids = encode_prompt(tokenizer, "What is the capital of France?", chat=True)
    out = [int(run_prompt(runner, ids, 0).argmax())]
    for _ in range(11):
        out.append(int(run_decode(runner, [0], [out[-1]], [len(ids) + len(out) - 1])[0].argmax()))
    return tokenizer.decode(out)


def test_default_model_in_bf16_still_answers(default_loaded):
    """What `model.dtype = "auto"` serves on a CPU with bf16 instructions (here bf16 is emulated: slow)."""
    assert "Paris" in greedy_answer(build_model(default_loaded, 256).to(torch.bfloat16), default_loaded.tokenizer)


@pytest.mark.parametrize(
    ("method", "skip"),
    [
        ("int8-weight", ("embed_tokens",)),  # the default recipe's
        ("int8-dynamic", ("embed_tokens",)),
        ("int4-weight", ("embed_tokens", "lm_head")),  # the GGUF file's own Q4_1 codes, lm_head kept
    ],
)
def test_default_model_quantized_still_answers(default_loaded, method, skip):
    """Each CPU method, as it meets its quality goal best."""
    model = build_model(default_loaded, 256, QuantSpec(method, 32, skip))
    assert "Paris" in greedy_answer(model, default_loaded.tokenizer)
