"""Every command offers exactly the options it reads.

For each command: ``--help`` lists every field of its config (and nothing else), and a few
runs on tiny local assets — one or two with many options set, the others combinations the
command refuses with a clear error — read every one of its options (recorded by
:mod:`tests.helpers.option_reads`). An option that no run reads would be accepted and ignored.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
import threading
import typing
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from bergson import config as C
from bergson.cli import COMMANDS, main, parse
from tests.helpers.legacy_store import legacy_store_of_model
from tests.helpers.option_reads import recording

NESTED = (C.DataConfig, C.FaissConfig, C.TrainingConfig)
Runs = list[tuple[list[str], str | None]]


def config_class(command: str) -> type:
    return importlib.import_module(COMMANDS[command][0]).CONFIG


def option_names(cls: type) -> set[tuple[str, str]]:
    """``(class, field)`` of a config's options and of its nested groups', as recorded."""
    out = set()
    for f in dataclasses.fields(cls):
        out.add((cls.__name__, f.name))
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out |= option_names(inner)
    return out


def flags(cls: type, prefix: str = "") -> set[str]:
    """The command-line flags of a config's fields (nested groups as ``group.field``)."""
    out = set()
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        inner = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if isinstance(inner, type) and dataclasses.is_dataclass(inner):
            out |= flags(inner, f"{prefix}{f.name}.")
        elif not any("Positional" in repr(m) for m in getattr(hints[f.name], "__metadata__", ())):
            out.add(f"{prefix}{f.name}")
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_lists_exactly_the_options(command, capfd):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("│ -")]
    shown = {flag for ln in lines for flag in re.findall(r"--([a-z0-9_.]+)", ln)} - {"help"}
    shown = {s for s in shown if not (s.startswith("no_") or ".no_" in s)}
    aliases = {"unit_norm"}
    assert shown - aliases == flags(config_class(command))


@pytest.mark.parametrize("method", ["ekfac", "trackstar"])
def test_the_cascades_help_lists_exactly_its_options(method, capfd):
    """``bergson score --candidates X --method M`` takes the cascade's config of method M (its
    options are read by tests/methods/test_cascade.py's runs)."""
    from bergson.config.cascade import CASCADE_CONFIGS

    with pytest.raises(SystemExit) as exit_:
        main(["score", "--candidates", "x", "--method", method, "--help"])
    assert exit_.value.code == 0
    lines = [ln for ln in capfd.readouterr().out.splitlines() if ln.startswith("│ -")]
    shown = {flag for ln in lines for flag in re.findall(r"--([a-z0-9_.]+)", ln)} - {"help"}
    shown = {s for s in shown if not (s.startswith("no_") or ".no_" in s)}
    assert shown == flags(CASCADE_CONFIGS[method]) and "candidates" in shown


@pytest.fixture(scope="module")
def assets(tmp_path_factory, model_dir, corpus_file, report_stores, query_hits) -> dict[str, str]:
    """A small corpus with group, prompt/completion and reward columns, and the stores the
    commands that read earlier results start from (built here, outside the recording)."""
    from bergson import IndexConfig, build
    from bergson.querying import write_hits

    tmp = tmp_path_factory.mktemp("options")
    texts = [json.loads(line)["text"] for line in Path(corpus_file).read_text().splitlines()[:8]]
    rows = [
        {"text": t, "prompt": t[:40], "completion": t[40:120], "group": "ab"[i % 2], "reward": float(i)}
        for i, t in enumerate(texts)
    ]
    corpus = tmp / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = C.DataConfig(dataset=str(corpus), truncation=True, max_length=24)
    common: dict[str, Any] = dict(model=str(model_dir), device="cpu", precision="fp32", projection_dim=4)
    index = build(IndexConfig(run_path=str(tmp / "index"), per_token=True, data=data, **common))
    query = build(IndexConfig(run_path=str(tmp / "query"), data=data, **common))
    text, hits = query_hits
    write_hits(str(tmp / "hits.jsonl"), hits)
    (tmp / "queries.jsonl").write_text(json.dumps({"text": text}) + "\n")
    store = report_stores["store"]
    return {
        "tmp": str(tmp), "model": str(model_dir), "corpus": str(corpus), "index": str(index.root),
        "query": str(query.root), "store": str(store.root), "module": store.manifest.modules[0].name,
        "scores": str(report_stores["scores"].root), "hits": str(tmp / "hits.jsonl"),
        "hits_queries": str(tmp / "queries.jsonl"), "legacy": str(legacy_store_of_model(tmp / "legacy", model_dir)[0]),
    }  # fmt: skip


@pytest.fixture(scope="module")
def magic_run(assets) -> str:
    """A tiny MAGIC run (three SGD steps) whose recipe and scores ``bergson validate`` checks."""
    from bergson import MagicConfig, magic

    data = C.DataConfig(dataset=assets["corpus"], split="train[:6]", truncation=True, max_length=16)
    query = C.DataConfig(dataset=assets["corpus"], split="train[6:7]", truncation=True, max_length=16)
    cfg = MagicConfig(
        run_path=str(Path(assets["tmp"]) / "magic"), model=assets["model"], device="cpu", precision="fp32",
        data=data, query=query, training=C.TrainingConfig(optimizer="sgd", lr=0.01, batch_size=2),
    )  # fmt: skip
    magic(cfg)
    return cfg.run_path


@pytest.fixture(scope="module")
def adam_run(assets) -> str:
    """A tiny AdamW MAGIC run whose trained model (with optimizer.pt) ``bergson unroll`` reads."""
    from bergson import MagicConfig, magic

    data = C.DataConfig(dataset=assets["corpus"], split="train[:6]", truncation=True, max_length=24)
    query = C.DataConfig(dataset=assets["corpus"], split="train[6:7]", truncation=True, max_length=24)
    training = C.TrainingConfig(optimizer="adamw", lr=0.01, batch_size=3, epochs=1, seed=1)
    cfg = MagicConfig(run_path=str(Path(assets["tmp"]) / "adam"), model=assets["model"], device="cpu",
                      precision="fp32", data=data, query=query, training=training)  # fmt: skip
    magic(cfg)
    return cfg.run_path


def runs(a: dict[str, str], tmp: Path) -> dict[str, Runs]:
    """Per command: (arguments, None for a run that must succeed or a text its error must
    contain). Refused runs read the options they refuse; each run has a run path of its own."""
    m = ["--model", a["model"], "--device", "cpu", "--precision", "fp32"]
    loading = ["--revision", "main", "--force_math_sdp", "--use_tf32_matmuls", "--no_trust_remote_code"]
    d = ["--dataset", a["corpus"], "--split", "train[:6]", "--truncation", "--max_length", "24"]
    qd = ["--query.dataset", a["corpus"], "--query.split", "train[6:8]", "--query.truncation",
          "--query.max_length", "24"]  # fmt: skip
    heads = "gpt_neox.layers.0.attention.query_key_value=2:48:out"
    grads = [
        "--projection_dim",
        "4",
        "--projection_seed",
        "0",
        "--include_bias",
        "--modules",
        "gpt_neox.layers.*",
    ]
    extra = [*loading, "--token_batch_size", "64", "--fsdp", "--nproc_per_node", "1", "--overwrite"]
    collect = [*grads, *extra, "--loss_reduction", "mean", "--shard_size", "4"]
    count = iter(range(1000))
    new = lambda: str(tmp / f"run{next(count)}")  # noqa: E731
    missing = str(tmp / "missing")

    def refused(*options: str, base: tuple[str, ...] = ()) -> Runs:
        """Refusals of the option groups a command shares (each group checks its own), with the
        options ``base`` the command needs besides."""
        cases = {
            "workers": (["--dist_timeout", "5"], "--dist_timeout 5.0: it is how long"),
            "data": (["--data.subset", "en"], "--subset en: it names a configuration"),
            "completion": (["--completion_column", "nope"], "nope"),
            "chat": (["--conversation_column", "nope"], "nope"),
            "reward": (["--reward_column", "nope"], "--reward_column"),
            "chunk": (["--chunk_length", "4"], "--chunk_length 4 with --max_length, --truncation"),
            "nan": (["--skip_nan_rewards"], "--skip_nan_rewards: it leaves out rows without a reward"),
            "template": (["--chat_template", "never"], "--chat_template never: it says how"),
            "form": (["--normalizer_form", "adam"], "--normalizer_form adam: it says how"),
            "state": (["--optimizer_state", missing + ".pt"], "missing.pt: no such file"),
            "pre": (["--preconditioner_path", missing], "missing"),
            "white": (["--whitening", missing, "--whitening_damping", "0.2"], "no fitted eigenbases there"),
        }
        run = ["--run_path"] if base[:1] == ("--run_path",) else []
        return [([*run, new(), *m, *d, *base[len(run) :], *cases[o][0]], cases[o][1]) for o in options]

    everything = ("workers", "data", "completion", "chat", "reward", "chunk", "nan", "template")
    # the original bergson's data options: packing into chunks, load_dataset arguments, another
    # tokenizer; rewards with NaN rows left out, raw prompt/completion text, the dataset's columns kept
    chunked = ["--dataset", a["corpus"], "--chunk_length", "16", "--data_args", "keep_in_memory=true",
               "--tokenizer", a["model"]]  # fmt: skip
    rewarded = [*d, "--prompt_column", "prompt", "--completion_column", "completion", "--chat_template", "never",
                "--reward_column", "reward", "--skip_nan_rewards", "--drop_columns", "False"]  # fmt: skip
    score_base = ("--query_path", a["query"], "--projection_dim", "4")
    # fmt: off
    return {
        "build": [
            ([new(), *m, *d, *collect, "--attention_heads", heads, "--per_token", "--save_dtype", "float32",
              "--unit_normalize"], None),
            ([new(), *m, *d, "--aggregation", "mean", "--prompt_column", "text"], None),
            ([new(), *m, *chunked], None),
            ([new(), *m, *rewarded], None),
            *refused(*everything, "form", "state", "pre", "white"),
        ],
        "reduce": [
            ([new(), *m, *d, *collect, "--attention_heads", heads, "--aggregation", "sum", "--unit_normalize",
              "--save_dtype", "float32"], None),
            ([new(), "--index", a["index"]], None),
            ([new(), *m, *d, "--per_token"], "--per_token"),
            *refused(*everything, "form", "state", "pre", "white"),
        ],
        "score": [
            ([new(), *m, *d, *score_base, "--token_batch_size", "64", "--score", "max", "--query_group_column",
              "group", "--top_k", "2", "--unit_normalize", "--per_token", "--save_dtype", "float32"], None),
            ([new(), "--index", a["index"], "--query_path", a["query"], "--aggregation", "mean"], None),
            *refused(*everything, "form", "state", "pre", "white", base=score_base),
        ],
        "preconditioner": [
            ([new(), *m, *d, *collect, "--attention_heads", heads, "--max_documents", "4", "--sample_seed", "1",
              "--damping", "0.2", "--damping_mode", "absolute"], None),
            ([new(), "--index", a["index"], "--shard_preconditioners"], None),
            ([new(), "--mix_train", missing, "--mix_query", missing, "--downweight_components", "2"], "missing"),
            ([new(), *m, *d, "--downweight_components", "2"], "--downweight_components 2: it sets how"),
            *refused(*everything, "form", "state", "white"),
        ],
        "trackstar": [
            ([new(), *m, *d, *qd, *collect, "--attention_heads", heads, "--stats_documents", "4",
              "--sample_seed", "1", "--damping", "0.2", "--damping_mode", "absolute", "--downweight_components",
              "1", "--top_k", "2", "--no_unit_normalize", "--aggregation", "none", "--per_token", "--save_dtype",
              "float32"], None),
            *refused(*everything, "form", "state", "white", base=tuple(qd)),
        ],
        "trak": [
            ([new(), *m, *d, *qd, *collect, "--attention_heads", heads, "--damping", "0.2", "--damping_mode",
              "absolute", "--per_token"], None),
            ([new(), "--models", a["model"], a["model"], "--device", "cpu", "--precision", "fp32", "--dataset",
              a["corpus"], "--truncation", "--max_length", "24", *qd, "--projection_dim", "4", "--stores",
              a["query"], a["query"]], None),
            ([new(), *m, *d, *qd, "--models", a["model"]], "--model and --models"),
            *refused(*everything, base=tuple(qd)),
        ],
        "ekfac": [
            ([new(), *m, *d, *qd, *grads, *extra, "--method", "kfac", "--fisher", "empirical", "--fisher_seed", "1",
              "--damping", "0.2", "--damping_mode", "absolute", "--factor_dtype", "float64",
              "--per_module_scores", "--query_rank", "1", "--projected_queries", "--top_k", "2", "--per_token"],
             None),
            ([new(), *m, *d, *qd, "--fisher", "empirical", "--fisher_samples", "2"],
             "--fisher_samples 2 with --fisher empirical"),
            *refused(*everything, base=tuple(qd)),
        ],
        "self_influence": [
            ([new(), *m, *d, *grads, *loading, "--token_batch_size", "64", "--overwrite", "--loss_reduction", "mean",
              "--shard_size", "4", "--attention_heads", heads, "--method", "trackstar", "--stats_documents", "4",
              "--sample_seed", "1", "--damping", "0.2", "--damping_mode", "absolute", "--per_token", "--top_k", "2"],
             None),
            ([new(), *m, *d, "--modules", "gpt_neox.layers.0.attention.*", "--include_bias", "--method", "ekfac",
              "--fisher", "empirical", "--fisher_seed", "1", "--factor_dtype", "float64", "--per_token"], None),
            ([new(), *m, *d, "--method", "cosine"], "--method cosine: a document's cosine with itself is 1"),
            ([new(), *m, *d, "--fisher", "empirical"], "--fisher with --method dot"),
            *refused("data", "completion", "chat", "reward", "chunk", "nan", "template", "form", "state", "white"),
        ],
        "source": [
            ([new(), *m, *d, *qd, "--include_bias", "--modules", "gpt_neox.layers.*", *extra, "--segment_steps", "2",
              "--segment_learning_rates", "0.1", "--query_model", a["model"], "--unroll", "discrete",
              "--curvature_scale", "0.5", "--method", "kfac", "--fisher", "empirical", "--fisher_seed", "1",
              "--damping", "0.2", "--damping_mode", "absolute", "--factor_dtype", "float64", "--per_token",
              "--top_k", "2"], None),
            ([new(), *m, *d, *qd, "--segments", missing], "--segments with --model"),
            ([new(), *d, *qd, "--models", a["model"], "--segment_steps", "1", "--segment_learning_rates", "0.1",
              "--fisher", "empirical", "--fisher_samples", "3"], "--fisher_samples 3 with --fisher empirical"),
            ([new(), *d, *qd, "--models", a["model"], "--segment_steps", "1", "--segment_learning_rates", "0.1",
              "--projection_dim", "4", "--projection_seed", "1"], "--projection_dim / --projection_seed"),
            ([new(), *d, *qd, "--models", a["model"], "--segment_steps", "1", "--segment_learning_rates", "0.1",
              "--stage_rows", ":2"], "--stage_rows: it gives the rows each --segments directory"),
            ([new(), *d, *qd, "--models", a["model"], "--segment_steps", "1", "--segment_learning_rates", "0.1",
              "--step_model", "adam"], "--step_model adam: checkpoint"),
            *refused(*everything, base=(*qd, "--segment_steps", "1", "--segment_learning_rates", "0.1")),
        ],
        "magic": [
            ([*m, *loading, "--run_path", new(), *d, *qd, "--training.optimizer", "sgd", "--training.lr", "0.01",
              "--training.beta1", "0.9", "--training.beta2", "0.99", "--training.eps", "1e-8",
              "--training.momentum", "0.5", "--training.weight_decay", "0.01", "--training.schedule", "linear",
              "--training.warmup_steps", "1", "--training.max_grad_norm", "1.0", "--training.batch_size", "3",
              "--training.grad_accumulation", "1", "--training.epochs", "1", "--training.seed", "1",
              "--training.freeze", "gpt_neox.embed_in.*", "--query_mode", "individual", "--per_token",
              "--checkpoints", "log", "--memory_budget_gb", "0.5", "--no_force_low_precision", "--overwrite",
              "--top_k", "2", "--nproc_per_node", "1", "--save_checkpoints", "1", "--unroll_steps", "3",
              "--query_batch_size", "1"], None),
            *refused("workers", base=("--run_path", *qd)),
            (["--run_path", new(), *m, *d, *qd, "--query_batch_size", "2"], "--query_batch_size 2: it bounds"),
        ],
        "unroll": [
            ([new(), "--model", a.get("adam", "") + "/model", "--device", "cpu", "--precision", "fp32", *loading,
              *d[:3], "train[:6]", *d[4:], *qd, "--training.optimizer", "adamw", "--training.lr", "0.01",
              "--training.beta1", "0.9", "--training.beta2", "0.999", "--training.eps", "1e-8",
              "--training.weight_decay", "0.0", "--training.schedule", "linear", "--training.warmup_steps", "0",
              "--training.max_grad_norm", "0.0", "--training.batch_size", "3", "--training.grad_accumulation", "1",
              "--training.epochs", "1", "--training.seed", "1", "--optimizer_state",
              a.get("adam", "") + "/model/optimizer.pt", "--query_mode", "individual", "--krylov_steps", "2",
              "--curvature_docs", "2", "--curvature_seed", "1", "--overwrite", "--top_k", "2"], None),
            ([new(), "--model", a.get("adam", "") + "/model", *d, *qd, "--training.optimizer", "sgd"],
             "--training.optimizer sgd"),
            ([new(), "--model", a["model"], *d, *qd], "optimizer.pt"),
            ([new(), "--model", a.get("adam", "") + "/model", *d, *qd, "--krylov_steps", "0"], "--krylov_steps 0"),
        ],
        "query": [
            (["--index", a["store"], *m, *loading, "--query", "The river flows", "--top_k", "2", "--unit_norm",
              "--reverse", "--modules", a["module"], "--output", str(tmp / "hits.jsonl"), "--search", "exact",
              "--snippet_chars", "20", "--per_token", "--record", str(tmp / "record.csv"), "--int8_rerank", "3"],
             None),
            (["--index", a["store"], *m, "--query_dataset", a["corpus"], "--query_split", "train[:2]",
              "--query_column", "prompt", "--query_completion_column", "completion", "--search", "faiss",
              "--faiss.index_factory", "IVF1,Flat", "--faiss.mmap_index", "--faiss.nprobe", "1",
              "--faiss.num_shards", "1", "--faiss.max_train_examples", "16"], None),
            (["--index", a["store"], *m, "--query", "x", "--preconditioner_path", missing], "missing"),
            (["--index", a["store"], *m, "--query", "x", "--search", "faiss", "--int8_rerank", "2"],
             "speeds up the exact search only"),
            (["--index", a["store"], *m, "--query", "The river flows", "--top_k", "2", "--int8_prefilter"], None),
            (["--index", a["store"], *m, "--query", "x", "--int8_prefilter", "--int8_rerank", "2"],
             "exclude each other"),
        ],
        "convert": [
            ([a["legacy"], new(), "--model", a["model"], "--overwrite"], None),
            ([missing, new()], "no info.json and gradients.bin"),
        ],
        "verify": [
            ([a["store"]], None),
            ([missing], "not a bergson store"),
        ],
        "test_model_configuration": [
            ([*m, *loading, *d, "--num_documents", "2", "--projection_dim", "4", "--tolerance", "0.01",
              "--modules", "gpt_neox.layers.0.*", "--output", str(tmp / "tmc.json")], None),
        ],
        "validate": [
            ([new(), "--recipe", a.get("magic", ""), "--scores", a.get("magic", "") + "/scores", "--protocol",
              "lds", "--num_subsets", "2", "--seed", "1", "--cache_dir", str(tmp / "cache"), "--device", "cpu"],
             None),
            ([new(), "--recipe", a.get("magic", ""), "--scores", a.get("magic", "") + "/scores", "--fraction",
              "0.0"], "--fraction"),
            ([new(), "--recipe", a.get("magic", ""), "--scores", a.get("magic", "") + "/scores", "--protocol",
              "top_k", "--top_k", "1", "2", "--num_subsets", "2", "--cache_dir", str(tmp / "cache")], None),
            ([new(), "--recipe", a.get("magic", ""), "--scores", a.get("magic", "") + "/scores", "--protocol",
              "lds", "--top_k", "2"], "--protocol top_k"),
        ],
        "report": [
            ([a["scores"], "--output", str(tmp / "r.html"), "--top_k", "2", "--max_queries", "1",
              "--collapse_chars", "50", "--bins", "5", "--title", "t"], None),
            ([a["hits"], "--output", str(tmp / "q.html"), "--index", a["store"], "--queries", a["hits_queries"],
              "--query_column", "text"], None),
        ],
        "serve": [
            (["--index", a["store"], *m, *loading, "--host", "127.0.0.1", "--port", "0", "--top_k", "2",
              "--unit_norm", "--per_token", "--max_query_chars", "100", "--max_waiting", "2",
              "--collapse_chars", "50"], None),
            (["--index", a["store"], *m, "--preconditioner_path", missing], "missing"),
        ],
    }
    # fmt: on


def serve_once(args: list[str]) -> None:
    """``bergson serve`` answering one query and the page, then stopping."""
    from bergson.reports.serve import make_server

    server = make_server(parse("serve", args))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        body = json.dumps({"text": "The river flows"}).encode()
        headers = {"Content-Type": "application/json"}
        request = urllib.request.Request(server.url + "api/query", data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=120) as r:
            assert r.status == 200
        with urllib.request.urlopen(server.url, timeout=60) as r:
            assert r.status == 200
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_is_read(command, assets, request, tmp_path, capfd):
    if command == "validate":
        assets = {**assets, "magic": request.getfixturevalue("magic_run")}
    if command == "unroll":
        assets = {**assets, "adam": request.getfixturevalue("adam_run")}
    cls = config_class(command)
    read: set[tuple[str, str]] = set()
    failures = []
    for args, refusal in runs(assets, tmp_path)[command]:
        with recording([cls, *NESTED]) as reads:
            try:
                if command == "serve" and refusal is None:
                    serve_once(args)
                else:
                    main([command, *args])
                code = 0
            except SystemExit as e:
                code = e.code
        err = capfd.readouterr().err
        if refusal is None and code != 0:
            failures.append(f"{args[-4:]} failed: {err[-300:]}")
        elif refusal is not None and (code == 0 or refusal not in err or "Traceback" in err):
            failures.append(f"{args[-4:]} was not refused with {refusal!r} (exit {code}): {err[-300:]}")
        read |= reads
    assert not failures, "\n".join(failures)
    unread = sorted(option_names(cls) - read)
    assert not unread, f"bergson {command} accepts options it never reads: {unread}"


def test_options_an_index_run_does_not_use_are_announced_and_recorded(assets, tmp_path, caplog):
    """With --index, reduce and score work on the store's vectors: the gradient options given
    anyway are named in a warning and in the written store's manifest."""
    from bergson import load_gradients

    given = ["--model", assets["model"], "--projection_dim", "4", "--data.truncation"]
    for command, extra in [("reduce", []), ("score", ["--query_path", assets["query"]])]:
        out = tmp_path / command
        caplog.clear()
        main([command, str(out), "--index", assets["index"], *extra, *given])
        warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert any("--model, --data.truncation, --projection_dim with --index" in w for w in warned), warned
        unused = load_gradients(out).manifest.producer["unused_options"]
        assert unused == ["--model", "--data.truncation", "--projection_dim"]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_original_spellings_set_the_options_they_name(command):
    """Each plain rename of the alias table (and the original's index_cfg. prefix) parses to the
    same config as our own flag, for every command that has the option."""
    from bergson.config.io import ALIASES, leaf_options

    cls = config_class(command)
    ours = leaf_options(cls)
    hints = {f: typing.get_type_hints(cls).get(f) for f in ours}
    values = {bool: [], int: ["2"], float: ["2.5"]}
    cases = [(key, alias.to) for key, alias in ALIASES.items() if alias.to in ours and alias.values is None]
    cases += [(f"index_cfg.{f}", f) for f in sorted(ours) if hints.get(f) is bool][:2]
    assert cases or command in ("report", "validate", "verify")  # verify has only a positional
    for theirs, mine in cases:
        if hints.get(mine) not in values:
            continue
        value = values[hints[mine]]  # type: ignore[index]
        assert parse(command, [f"--{theirs}", *value]) == parse(command, [f"--{mine}", *value]), theirs
