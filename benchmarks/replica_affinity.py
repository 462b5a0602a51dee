"""Cache-aware replicas (issue 29): turn 6's time to first token with affinity against
least-request balancing, over two real llama-servers of the shipped SmolLM2, in one run.

One mesh (`capibara up`, ports 72xx) launches two llama-servers (7290, 7291) and serves them as
two logical models: `affinity` (backend.balance: affinity, the inference service's choice) and
`least` (the same two servers, backend.balance: least_requests, through Envoy's models listener).
Each round runs, per mode, several conversations through the edge's /v1/chat/completions, each
resending its whole history, 6 turns of long user messages and short answers, so that turn 6's
prompt is about 2,000 tokens. Turns 1-5 of all conversations run at once (least-request
balancing then spreads a conversation's turns over both servers, as in a busy fleet); turn 6 runs
one conversation at a time, so that its time to first token is its own prompt processing. Every round and mode gets new text
(nothing cached from another), and the modes' order alternates between rounds.

    .venv/bin/python benchmarks/replica_affinity.py [--rounds 3] [--conversations 4] [--no-host-cache]   # ~3 min

`measure(directory)` returns the figures (benchmarks/peers.py calls it); `report()` prints them
with the goal: turn 6 starts at least 2x sooner with affinity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import statistics
import sys
import tempfile
import time
import urllib.request

import aiohttp

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from tests.support.mesh import launched_model, mesh_config, start_mesh, stop_mesh

BASE = 7200  # edge 7201-7203, services 7250-7255 (MCP 7260), metrics 7270-7275, admin 7299
SERVERS = (7290, 7291)
TURNS = 6
WORDS_PER_MESSAGE = 230  # about 330 tokens of SmolLM2's tokenizer: turn 6's prompt ~2,000 tokens
MAX_TOKENS = 12
GOAL = "turn 6 starts at least 2× sooner with affinity"
SYSTEM = "You are a careful reader. Answer each message with one short sentence."
VOCABULARY = (
    "river mountain capybara forest village market winter summer bridge garden library window "
    "teacher student engine harbor island desert valley orchard lantern meadow castle tunnel "
    "violin compass ladder pencil blanket kettle mirror basket candle feather marble saddle "
    "quiet bright heavy gentle ancient narrow hollow golden silent rapid distant careful "
    "walks carries builds follows watches gathers repairs describes remembers paints counts "
    "under beside across through before after because while although therefore besides"
).split()


def config(directory: pathlib.Path, host_cache: bool = True) -> dict:
    affinity = launched_model(SERVERS[0], parallel=2, threads=1, max_tokens=MAX_TOKENS, temperature=0)
    affinity["launch"]["ctx_size"] = 4096 * 2  # 4,096 tokens per slot: the whole conversation fits
    affinity["launch"]["extra_args"] = ["--metrics"]  # prompt tokens each server really processed
    if not host_cache:
        # Only the slots keep prompts, as when a bigger model's KV cache leaves no room for a
        # host-memory copy of every conversation (SmolLM2's ~23 KB per token fits 8 GiB easily).
        affinity["launch"]["extra_args"] += ["--cache-ram", "0"]
    servers = [f"http://127.0.0.1:{port}" for port in SERVERS]
    affinity["backend"]["replicas"] = servers[1:]
    least = {
        "backend": {"url": servers[0], "protocol": "llama_cpp", "replicas": servers[1:], "balance": "least_requests"},
        "defaults": dict(affinity["defaults"]),
        "max_concurrent": 4,
    }
    mesh = mesh_config(directory / "state", BASE, {"affinity": affinity, "least": least}, router=False)
    mesh["edge"]["admin_port"] = BASE + 99
    return mesh


def user_message(rng: random.Random, turn: int) -> str:
    words = [rng.choice(VOCABULARY) for _ in range(WORDS_PER_MESSAGE)]
    sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
    return f"Part {turn} of my notes. " + " ".join(sentences) + " What is the main object in this part?"


async def one_turn(session: aiohttp.ClientSession, mesh, model: str, messages: list[dict]) -> tuple[float, int, str]:
    """(time to first token in s, prompt tokens, answer) of one streamed turn through the edge."""
    body = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    started = time.perf_counter()
    first, prompt_tokens, answer = None, 0, []
    async with session.post(mesh.base_url + "/v1/chat/completions", json=body, ssl=mesh.ssl_context()) as response:
        if response.status != 200:
            raise RuntimeError(f"{model}: HTTP {response.status}: {(await response.text())[:300]}")
        async for line in response.content:
            if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[5:])
            for choice in event.get("choices") or ():
                if text := (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    answer.append(text)
            prompt_tokens = (event.get("usage") or {}).get("prompt_tokens") or prompt_tokens
    if first is None:
        raise RuntimeError(f"{model}: no token")
    return first - started, prompt_tokens, "".join(answer)


class Conversation:
    def __init__(self, model: str, seed: str):
        self.model = model
        self.rng = random.Random(seed)
        self.messages = [{"role": "system", "content": SYSTEM}]
        self.turns: list[tuple[float, int]] = []  # (TTFT s, prompt tokens) of each turn

    async def turn(self, session, mesh) -> None:
        self.messages.append({"role": "user", "content": user_message(self.rng, len(self.turns) + 1)})
        ttft, prompt_tokens, answer = await one_turn(session, mesh, self.model, self.messages)
        self.messages.append({"role": "assistant", "content": answer or "."})
        self.turns.append((ttft, prompt_tokens))


def processed_prompt_tokens() -> float:
    """Prompt tokens the llama-servers processed so far (what their caches did not hold)."""
    total = 0.0
    for port in SERVERS:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith("llamacpp:prompt_tokens_total "):
                    total += float(line.split()[1])
    return total


def replica_choices(mesh) -> dict[str, int]:
    """The inference service's capibara_replica_choices_total by outcome (model `affinity`)."""
    url = f"http://127.0.0.1:{mesh.config['services']['inference']['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    counts: dict[str, int] = {}
    for line in text.splitlines():
        if line.startswith("capibara_replica_choices_total{"):
            labels, value = line.rsplit(" ", 1)
            outcome = labels.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = counts.get(outcome, 0) + int(float(value))
    return counts


async def measure(directory: pathlib.Path, rounds: int = 3, conversations: int = 4, host_cache: bool = True) -> dict:
    """Start the mesh in `directory`, run both modes, stop it; the figures as a dict (ms).
    `host_cache` False: the llama-servers keep prompts in their slots only (--cache-ram 0)."""
    directory.mkdir(parents=True, exist_ok=True)
    mesh = await asyncio.to_thread(start_mesh, directory, config(directory, host_cache))
    modes = {"affinity": "affinity", "least_requests": "least"}
    samples: dict[str, list[Conversation]] = {mode: [] for mode in modes}
    processed = dict.fromkeys(modes, 0.0)  # prompt tokens the servers processed, all turns
    turn6_processed: dict[str, list[int]] = {mode: [] for mode in modes}
    started = time.monotonic()
    try:
        timeout = aiohttp.ClientTimeout(total=300)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            # Warm up both paths (connections, Envoy's health checks see both servers).
            for model in modes.values():
                await one_turn(session, mesh, model, [{"role": "user", "content": "Hello."}])
            for number in range(rounds):
                order = list(modes) if number % 2 == 0 else list(reversed(modes))
                for mode in order:
                    before = await asyncio.to_thread(processed_prompt_tokens)
                    runs = [Conversation(modes[mode], f"{mode}-{number}-{c}") for c in range(conversations)]
                    # Turns 1-5 of every conversation at once: least-request balancing mixes them
                    # over the servers as a busy fleet does.
                    for _ in range(TURNS - 1):
                        await asyncio.gather(*(run.turn(session, mesh) for run in runs))
                    # Turn 6 one conversation at a time: its TTFT is its own prompt's processing,
                    # not a wait behind the others' (and the servers' counters tell its tokens).
                    for run in runs:
                        ahead = await asyncio.to_thread(processed_prompt_tokens)
                        await run.turn(session, mesh)
                        done = await asyncio.to_thread(processed_prompt_tokens)
                        turn6_processed[mode].append(int(done - ahead))
                    samples[mode].extend(runs)
                    processed[mode] += await asyncio.to_thread(processed_prompt_tokens) - before
        choices = await asyncio.to_thread(replica_choices, mesh)
    finally:
        await asyncio.to_thread(stop_mesh, mesh)

    def median_ms(values) -> float:
        return round(statistics.median(values) * 1000, 1)

    by_turn = {
        mode: [median_ms([run.turns[t][0] for run in runs]) for t in range(TURNS)] for mode, runs in samples.items()
    }
    turn6 = {mode: [round(run.turns[-1][0] * 1000, 1) for run in runs] for mode, runs in samples.items()}
    affinity_ms, least_ms = by_turn["affinity"][-1], by_turn["least_requests"][-1]
    speedup = round(least_ms / affinity_ms, 2) if affinity_ms else 0.0
    # Least-request balancing sends turn 6 to turn 5's server about half the time: its turn-6 TTFT
    # is bimodal and its median sits between the modes, so the mean and p90 are shown too.
    mean = {mode: round(statistics.fmean(values), 1) for mode, values in turn6.items()}
    p90 = {mode: sorted(values)[max(0, -(-9 * len(values) // 10) - 1)] for mode, values in turn6.items()}
    return {
        "servers": len(SERVERS),
        "host_prompt_cache": host_cache,
        "rounds": rounds,
        "conversations_per_round": conversations,
        "turns": TURNS,
        "turn6_prompt_tokens": int(statistics.median(run.turns[-1][1] for runs in samples.values() for run in runs)),
        # Of turn 6's prompt, the tokens the server had to process (not in its cache), each sample.
        "turn6_processed_tokens": turn6_processed,
        "turn6_ttft_ms": {"affinity": affinity_ms, "least_requests": least_ms},
        "turn6_ttft_samples_ms": turn6,
        "turn6_ttft_mean_ms": mean,
        "turn6_ttft_p90_ms": p90,
        "ttft_by_turn_ms": by_turn,
        "affinity_replica_choices": choices,
        # Of the prompt tokens sent (every turn's whole history), those the servers processed.
        "prompt_tokens_sent": {m: sum(t[1] for run in runs for t in run.turns) for m, runs in samples.items()},
        "prompt_tokens_processed": {m: int(v) for m, v in processed.items()},
        "speedup": speedup,
        "goal": GOAL,
        "met": speedup >= 2.0,
        "seconds": round(time.monotonic() - started, 1),
    }


def report(result: dict) -> None:
    print(
        f"Cache-aware replicas: {result['servers']} llama-servers (SmolLM2), {result['rounds']} rounds x "
        f"{result['conversations_per_round']} concurrent conversations per mode, {result['turns']} turns each; "
        f"turn 6 prompt ~{result['turn6_prompt_tokens']} tokens"
        f"{'' if result.get('host_prompt_cache', True) else ', no host prompt cache (--cache-ram 0)'}"
        f" ({result['seconds']} s)"
    )
    for mode in ("affinity", "least_requests"):
        turns = " ".join(f"{ms:7.1f}" for ms in result["ttft_by_turn_ms"][mode])
        print(f"  {mode:15} TTFT median per turn (ms): {turns}")
        print(f"  {'':15} turn 6 TTFT samples (ms): {result['turn6_ttft_samples_ms'][mode]}")
        print(f"  {'':15} turn 6 prompt tokens processed: {result['turn6_processed_tokens'][mode]}")
    for mode in ("affinity", "least_requests"):
        sent, done = result["prompt_tokens_sent"][mode], result["prompt_tokens_processed"][mode]
        share = f"{100 * done / sent:.0f}%" if sent else "-"
        print(f"  {mode:15} prompt tokens processed by the servers: {done} of {sent} sent ({share})")
    print(f"  affinity mode's choices: {result['affinity_replica_choices']}")
    ttft, mean, p90 = result["turn6_ttft_ms"], result["turn6_ttft_mean_ms"], result["turn6_ttft_p90_ms"]
    print(
        f"  turn 6 TTFT mean: affinity {mean['affinity']} ms, least_requests {mean['least_requests']} ms; "
        f"p90: {p90['affinity']} ms, {p90['least_requests']} ms"
    )
    verdict = "MET" if result["met"] else "NOT MET"
    print(
        f"  turn 6 TTFT median: affinity {ttft['affinity']} ms, least_requests {ttft['least_requests']} ms "
        f"({result['speedup']}x) -> goal '{result['goal']}': {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conversations", type=int, default=4)
    parser.add_argument(
        "--no-host-cache",
        action="store_true",
        help="llama-servers keep prompts in their slots only (--cache-ram 0), as for a model too big to cache more",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="capibara-affinity-") as directory:
        result = asyncio.run(measure(pathlib.Path(directory), args.rounds, args.conversations, not args.no_host_cache))
    report(result)


if __name__ == "__main__":
    main()
