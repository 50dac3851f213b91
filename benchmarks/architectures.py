"""Every decoder family at its real width: tracked share, build speed next to a training step,
memory and row size.

Each family is built from its transformers config class with the hidden width, heads, key/value
heads, head size and intermediate (and expert) sizes of a small real checkpoint (named in the
output), random weights, float32, on the CPU; only the number of layers (and by default the
vocabulary) is cut so that every family fits a small machine, and each entry says what was cut
(``cut``). The documents are random token ids of the kept vocabulary. Per family, in a
process of its own (forked from a server that has the libraries imported) so that peak memory
does not mix between families:

- ``tracked_share``: the share of the model's matrix weights (embeddings and the output head not
  counted) that the default tracked modules cover, from ``bergson.models.tracking_record``;
- ``plain_tokens_per_s``: a training step without optimizer (forward, next-token loss, backward
  with weight gradients) over the batches;
- ``build_tokens_per_s``: ``collect_gradients`` (projected per-document gradients, p = 16 by
  default, vectors kept in memory) over the same batches;
- ``build_over_plain``: build tokens/s ÷ plain tokens/s (> 1: the build is the faster), from the
  best of ``--repeats`` alternating rounds (build, plain, build, plain, ...) in one process, and
  the same ratio per round (``build_over_plain_rounds``: a loaded machine slows both legs of a
  round alike);
- ``peak_rss_build_mib`` (the model and the first build) and ``peak_rss_mib`` (after the plain
  steps too, whose weight gradients usually set it);
- ``store_bytes_per_row``: the row's columns × 2 bytes (float16, the default store dtype of
  projected gradients).

Each MoE family also runs a dense reference of the same active parameter count (the attention of
the MoE, an MLP of width top-k × expert width, plus the shared expert's width where there is one;
``active_params`` of both are printed), and the summary gives the MoE build's tokens/s ÷ the dense
reference's. MoE families report the default tracking; ``--track_experts`` tracks their experts
and routers too (``find_tracked_modules(track_experts=True)``; the dense references are unchanged).

Prints one JSON object per line: one per family as it finishes, then the summary (the goals of
issue 19: every family 100% tracked, build ÷ plain ≥ 1 on the dense families, MoE build no
slower than its dense reference).

    python -m benchmarks.architectures [--families all|pythia-160m,gpt2,...] [--tokens 256]
        [--seq_len 128] [--repeats 2] [--threads N] [--layers N] [--vocab 8192 (0: the real one)]
        [--projection_dim 16] [--track_experts] [--no_dense_refs] [--list]

The default run (every family but the three of 7B width, Falcon-7B, Mistral-7B and
Mixtral-8x7B, which ``--families all`` adds; Mixtral peaks at about 12 GiB) takes about six minutes
on 2 CPU cores. A family that fails is reported with its error and the others still run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

MIB = 1024 * 1024
LLAMA_MLP = dict(hidden_act="silu")
# name: (checkpoint whose shape is used, config class, model class, layers kept, real layers,
#        real vocabulary, config keywords); the MoE families also carry "moe"
FAMILIES: dict[str, dict[str, Any]] = {
    "pythia-160m": dict(
        checkpoint="EleutherAI/pythia-160m", config="GPTNeoXConfig", model="GPTNeoXForCausalLM",
        layers=2, real_layers=12, real_vocab=50304,
        kw=dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}),
    ),
    "gpt2": dict(
        checkpoint="openai-community/gpt2", config="GPT2Config", model="GPT2LMHeadModel",
        layers=2, real_layers=12, real_vocab=50257,
        kw=dict(n_embd=768, n_head=12, n_positions=1024),
    ),
    "smollm-135m": dict(
        checkpoint="HuggingFaceTB/SmolLM-135M", config="LlamaConfig", model="LlamaForCausalLM",
        layers=2, real_layers=30, real_vocab=49152,
        kw=dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
                tie_word_embeddings=True),
    ),
    "qwen2.5-0.5b": dict(
        checkpoint="Qwen/Qwen2.5-0.5B", config="Qwen2Config", model="Qwen2ForCausalLM",
        layers=2, real_layers=24, real_vocab=151936,
        kw=dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2,
                tie_word_embeddings=True),
    ),
    "llama-3.2-1b": dict(
        checkpoint="meta-llama/Llama-3.2-1B", config="LlamaConfig", model="LlamaForCausalLM",
        layers=2, real_layers=16, real_vocab=128256,
        kw=dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                head_dim=64, tie_word_embeddings=True),
    ),
    "gemma-3-270m": dict(
        checkpoint="google/gemma-3-270m", config="Gemma3TextConfig", model="Gemma3ForCausalLM",
        layers=2, real_layers=18, real_vocab=262144,
        kw=dict(hidden_size=640, intermediate_size=2048, num_attention_heads=4, num_key_value_heads=1,
                head_dim=256, query_pre_attn_scalar=256, sliding_window=512, tie_word_embeddings=True,
                layer_types=["sliding_attention", "full_attention"]),
    ),
    "olmo-2-1b": dict(
        checkpoint="allenai/OLMo-2-0425-1B", config="Olmo2Config", model="Olmo2ForCausalLM",
        layers=2, real_layers=16, real_vocab=100352,
        kw=dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=16, num_key_value_heads=16),
    ),
    "phi-3-mini": dict(
        checkpoint="microsoft/Phi-3-mini-4k-instruct", config="Phi3Config", model="Phi3ForCausalLM",
        layers=1, real_layers=32, real_vocab=32064,
        kw=dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32),
    ),
    "falcon-7b": dict(
        checkpoint="tiiuae/falcon-7b", config="FalconConfig", model="FalconForCausalLM",
        layers=1, real_layers=32, real_vocab=65024, large=True,
        kw=dict(hidden_size=4544, num_attention_heads=71, multi_query=True, parallel_attn=True, bias=False,
                new_decoder_architecture=False, hidden_dropout=0.0, attention_dropout=0.0),
    ),
    "mistral-7b": dict(
        checkpoint="mistralai/Mistral-7B-v0.1", config="MistralConfig", model="MistralForCausalLM",
        layers=1, real_layers=32, real_vocab=32000, large=True,
        kw=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
    ),
    "olmoe-1b-7b": dict(
        checkpoint="allenai/OLMoE-1B-7B-0924", config="OlmoeConfig", model="OlmoeForCausalLM",
        layers=1, real_layers=16, real_vocab=50304,
        kw=dict(hidden_size=2048, intermediate_size=1024, num_attention_heads=16, num_key_value_heads=16,
                num_experts=64, num_experts_per_tok=8),
        moe=dict(experts=64, top_k=8, expert_width=1024, shared_width=0, dense="LlamaConfig"),
    ),
    "mixtral-8x7b": dict(
        checkpoint="mistralai/Mixtral-8x7B-v0.1", config="MixtralConfig", model="MixtralForCausalLM",
        layers=1, real_layers=32, real_vocab=32000, large=True,
        kw=dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                num_local_experts=8, num_experts_per_tok=2),
        moe=dict(experts=8, top_k=2, expert_width=14336, shared_width=0, dense="MistralConfig"),
    ),
    "qwen1.5-moe-a2.7b": dict(
        checkpoint="Qwen/Qwen1.5-MoE-A2.7B", config="Qwen2MoeConfig", model="Qwen2MoeForCausalLM",
        layers=1, real_layers=24, real_vocab=151936,
        kw=dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=16, num_key_value_heads=16,
                moe_intermediate_size=1408, shared_expert_intermediate_size=5632, num_experts=60,
                num_experts_per_tok=4, qkv_bias=True),
        moe=dict(experts=60, top_k=4, expert_width=1408, shared_width=5632, dense="Qwen2Config"),
    ),
    "qwen3-30b-a3b": dict(
        checkpoint="Qwen/Qwen3-30B-A3B", config="Qwen3MoeConfig", model="Qwen3MoeForCausalLM",
        layers=1, real_layers=48, real_vocab=151936,
        kw=dict(hidden_size=2048, intermediate_size=6144, num_attention_heads=32, num_key_value_heads=4,
                head_dim=128, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8),
        moe=dict(experts=128, top_k=8, expert_width=768, shared_width=0, dense="Qwen3Config"),
    ),
}  # fmt: skip
DENSE_SUFFIX = ":dense-ref"
_DENSE_KEEP = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim")


def family_spec(name: str) -> dict[str, Any]:
    """The table entry of ``name``; ``MOE:dense-ref`` is the dense model of the same active
    parameter count as the MoE family (its attention, an MLP of width top-k × expert width plus
    the shared expert's)."""
    if not name.endswith(DENSE_SUFFIX):
        return FAMILIES[name]
    moe = FAMILIES[name.removesuffix(DENSE_SUFFIX)]
    m = moe["moe"]
    kw = {k: v for k, v in moe["kw"].items() if k in _DENSE_KEEP}
    kw["intermediate_size"] = m["top_k"] * m["expert_width"] + m["shared_width"]
    cls = m["dense"]
    return dict(
        checkpoint=f"dense {cls.removesuffix('Config')} of {moe['checkpoint']}'s active parameter count",
        config=cls, model=cls.replace("Config", "ForCausalLM"), layers=moe["layers"],
        real_layers=moe["real_layers"], real_vocab=moe["real_vocab"], kw=kw,
    )  # fmt: skip


def make_model(name: str, layers: int | None, vocab: int, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """The family's model (float32, eval mode, random weights) and what was cut from the real one."""
    import transformers

    spec = family_spec(name)
    kept_layers = layers or spec["layers"]
    kept_vocab = vocab or spec["real_vocab"]
    kw = dict(spec["kw"])
    if "layer_types" in kw:  # repeat the family's pattern over the kept layers
        pattern = kw["layer_types"]
        kw["layer_types"] = [pattern[i % len(pattern)] for i in range(kept_layers)]
    layer_key = "n_layer" if spec["config"] == "GPT2Config" else "num_hidden_layers"
    cfg = getattr(transformers, spec["config"])(
        **kw,
        **{layer_key: kept_layers},
        vocab_size=kept_vocab,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
    )
    from transformers.initialization import no_init_weights

    with no_init_weights():  # transformers' own init costs seconds per billion weights; fill once instead
        model = getattr(transformers, spec["model"])(cfg).float().eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim >= 2:
                p.uniform_(-0.03, 0.03, generator=gen)
            else:  # biases zero, norm scales one
                p.zero_() if pname.endswith("bias") else p.fill_(1.0)
    cut = {
        "layers": {"kept": kept_layers, "real": spec["real_layers"]},
        "vocab": {"kept": kept_vocab, "real": spec["real_vocab"]},
    }
    weights = "random: matrices uniform(-0.03, 0.03), biases 0, norm scales 1"
    return model, {"checkpoint": spec["checkpoint"], "config": spec["config"], "cut": cut, "weights": weights}


def active_params(model: torch.nn.Module, moe: dict | None) -> int:
    """Matrix parameters one token uses (embeddings and the output head left out): every 2-D
    weight of the body, and top-k of each fused 3-D expert tensor's experts."""
    from bergson.models import output_head_modules

    head = {id(p) for n in output_head_modules(model) for p in model.get_submodule(n).parameters()}
    embed = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    total = 0
    for p in model.parameters():
        if id(p) in head or id(p) in embed or p.ndim < 2:
            continue
        total += p.numel() * moe["top_k"] // p.shape[0] if (p.ndim == 3 and moe) else p.numel()
    return total


def tracked_modules(model: torch.nn.Module, track_experts: bool) -> dict[str, torch.nn.Module]:
    """The default tracked set, with every expert and router of an MoE model when ``track_experts``
    (a dense model has none to add)."""
    from bergson.core.experts import expert_views
    from bergson.models import find_tracked_modules

    moe = any(True for _ in expert_views(model))
    return find_tracked_modules(model, track_experts=track_experts and moe)


def _peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def run_family(
    name: str,
    *,
    tokens: int = 256,
    seq_len: int = 128,
    repeats: int = 2,
    layers: int | None = None,
    vocab: int = 8192,
    projection_dim: int = 16,
    track_experts: bool = False,
) -> dict[str, Any]:
    """Measure one family in this process (see the module docstring); returns its JSON object."""
    from bergson.collect.loop import collect_gradients
    from bergson.data import TokenizedDocs, plan_batches
    from bergson.models import tracking_record

    from .build import train_step_time

    started = time.perf_counter()
    model, info = make_model(name, layers, vocab)
    spec = family_spec(name)
    rss_model = _peak_rss_mib()
    modules = tracked_modules(model, track_experts)
    record = tracking_record(model, modules)
    n_docs = max(1, tokens // seq_len)
    rng = np.random.default_rng(0)
    kept_vocab = info["cut"]["vocab"]["kept"]
    docs = TokenizedDocs(
        [rng.integers(1, kept_vocab, seq_len, dtype=np.int64) for _ in range(n_docs)],
        np.zeros(n_docs, np.int64),
    )
    budget = n_docs * seq_len  # one batch holding every document: the same batches for both legs
    batches = plan_batches(docs.lengths, budget)
    n_tokens = n_docs * seq_len
    with torch.no_grad():  # untimed warm-up (allocator, lazily built kernels) on one short document
        model(input_ids=torch.as_tensor(docs.input_ids[0][:16])[None], use_cache=False)
    plain_times, build_times, dim, rss_build = [], [], 0, 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        sink = collect_gradients(
            model,
            docs,
            modules=modules,
            projection_dim=projection_dim,
            token_batch_size=budget,
            progress=False,
        )
        build_times.append(time.perf_counter() - t0)
        dim = int(sink.vectors.shape[1])  # type: ignore[attr-defined]
        rss_build = rss_build or _peak_rss_mib()
        del sink
        plain_times.append(train_step_time(model, docs, batches, pad_id=0))
        model.requires_grad_(False)
    best_plain, best_build = min(plain_times), min(build_times)
    cov = record["coverage"]
    moe = spec.get("moe")
    return {
        "family": name,
        **info,
        "moe": moe,
        "track_experts": track_experts,
        "matrix_params": cov["matrix_params"],
        "active_params": active_params(model, moe),
        "tracked_modules": len(modules),
        "tracked_share": cov["share"],
        "skipped": [{k: s[k] for k in ("class", "reason", "modules", "params")} for s in cov["skipped"]],
        "tokens": n_tokens,
        "documents": n_docs,
        "seq_len": seq_len,
        "projection_dim": projection_dim,
        "threads": torch.get_num_threads(),
        "plain_tokens_per_s": round(n_tokens / best_plain, 1),
        "build_tokens_per_s": round(n_tokens / best_build, 1),
        "build_over_plain": round(best_plain / best_build, 3),
        "build_over_plain_rounds": [round(p / b, 3) for p, b in zip(plain_times, build_times)],
        "plain_times_s": [round(t, 3) for t in plain_times],
        "build_times_s": [round(t, 3) for t in build_times],
        "rss_after_model_mib": rss_model,
        "peak_rss_build_mib": rss_build,
        "peak_rss_mib": _peak_rss_mib(),
        "row_dim": dim,
        "store_bytes_per_row": dim * 2,
        "wall_s": round(time.perf_counter() - started, 1),
    }


def default_families() -> list[str]:
    return [n for n, s in FAMILIES.items() if not s.get("large")]


def expand(families: list[str], dense_refs: bool) -> list[str]:
    """The families to run, each MoE family followed by its dense reference."""
    out = []
    for name in families:
        if name not in FAMILIES:
            raise SystemExit(f"--families: unknown family {name!r}; known: {', '.join(FAMILIES)}")
        out.append(name)
        if dense_refs and "moe" in FAMILIES[name]:
            out.append(name + DENSE_SUFFIX)
    return out


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    ok = {r["family"]: r for r in results if "error" not in r}
    moe_vs_dense = {}
    for name, r in ok.items():
        ref = ok.get(name + DENSE_SUFFIX)
        if r["moe"] and ref:
            moe_vs_dense[name] = {
                "moe_build_over_dense_build": round(r["build_tokens_per_s"] / ref["build_tokens_per_s"], 3),
                "moe_plain_over_dense_plain": round(r["plain_tokens_per_s"] / ref["plain_tokens_per_s"], 3),
                "active_params": [r["active_params"], ref["active_params"]],
            }
    dense = [n for n, r in ok.items() if not r["moe"]]
    return {
        "benchmark": "architectures",
        "families": len(results),
        "failed": {r["family"]: r["error"] for r in results if "error" in r},
        "tracked_share": {n: r["tracked_share"] for n, r in ok.items() if not n.endswith(DENSE_SUFFIX)},
        "build_over_plain": {n: r["build_over_plain"] for n, r in ok.items()},
        "track_experts": any(r.get("track_experts") for r in ok.values()),
        "moe_vs_dense_reference": moe_vs_dense,
        "goals": {
            "all_fully_tracked": [n for n, r in ok.items() if r["tracked_share"] < 1.0] == [],
            "not_fully_tracked": [n for n, r in ok.items() if r["tracked_share"] < 1.0],
            "dense_build_slower_than_plain": [n for n in dense if ok[n]["build_over_plain"] < 1.0],
            "moe_build_slower_than_dense_reference": [
                n for n, v in moe_vs_dense.items() if v["moe_build_over_dense_build"] < 1.0
            ],
        },
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "note": "timings on a shared machine: best of the repeats, ratios taken within one process",
    }


PRELOAD = ["torch", "transformers", "bergson.collect.loop", "bergson.models", "benchmarks.build"]


def _child(name: str, kw: dict[str, Any], threads: int, result: str) -> None:
    """One family in a fresh process (forked from a server that has the libraries imported):
    its object, or the error that stopped it, written to ``result``."""
    torch.set_num_threads(threads)
    try:
        entry = run_family(name, **kw)
    except Exception as exc:  # reported in the family's object, the other families still run
        entry = {"family": name, "error": f"{type(exc).__name__}: {exc}"}
    Path(result).write_text(json.dumps(entry))


def run_isolated(names: list[str], kw: dict[str, Any], threads: int) -> list[dict[str, Any]]:
    """Run each family in a process of its own (so peak RSS is the family's), printing its object."""
    import multiprocessing as mp

    from benchmarks import architectures as this  # importable by name in the children, also under -m

    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = []
    with tempfile.TemporaryDirectory(prefix="bergson-arch-") as tmp:
        for name in names:
            out = Path(tmp) / f"{name.replace(':', '_')}.json"
            proc = ctx.Process(target=this._child, args=(name, kw, threads, str(out)))
            proc.start()
            proc.join()
            if out.is_file():
                entry = json.loads(out.read_text())
            else:  # killed (out of memory: -9) or crashed before writing
                entry = {"family": name, "error": f"the family's process exited with status {proc.exitcode}"}
            results.append(entry)
            print(json.dumps(entry), flush=True)
    return results


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument(
        "--families", default="", help="comma-separated names, or 'all' (default: all but the largest)"
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens per pass (documents of --seq_len)")
    p.add_argument("--seq_len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="alternating build/plain rounds; the best counts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--layers", type=int, default=0, help="layers kept (0: the table's 1 or 2 per family)")
    p.add_argument("--vocab", type=int, default=8192, help="vocabulary kept (0: the family's real one)")
    p.add_argument("--projection_dim", type=int, default=16)
    p.add_argument("--track_experts", action="store_true", help="find_tracked_modules(track_experts=True)")
    p.add_argument("--no_dense_refs", action="store_true", help="skip the MoE families' dense references")
    p.add_argument("--list", action="store_true", help="print the family table and exit")
    args = p.parse_args(argv)
    if args.seq_len < 2 or args.tokens < args.seq_len or args.tokens % args.seq_len:
        p.error(f"--tokens {args.tokens} must be a multiple of --seq_len {args.seq_len} (>= 2)")
    if args.repeats < 1 or args.threads < 1 or args.layers < 0 or args.projection_dim < 1:
        p.error("--repeats, --threads and --projection_dim must be >= 1, --layers >= 0")
    if args.vocab == 1 or args.vocab < 0:
        p.error(f"--vocab {args.vocab}: give 0 (the family's real vocabulary) or at least 2")
    return args


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = parse(argv)
    if args.list:
        for name, s in FAMILIES.items():
            print(json.dumps({"family": name, "checkpoint": s["checkpoint"], "default": not s.get("large")}))
        return []
    kw = dict(tokens=args.tokens, seq_len=args.seq_len, repeats=args.repeats, layers=args.layers or None,
              vocab=args.vocab, projection_dim=args.projection_dim, track_experts=args.track_experts)  # fmt: skip
    chosen = list(FAMILIES) if args.families == "all" else [f for f in args.families.split(",") if f]
    results = run_isolated(expand(chosen or default_families(), not args.no_dense_refs), kw, args.threads)
    print(json.dumps(summarize(results)), flush=True)
    return results


if __name__ == "__main__":
    main()
