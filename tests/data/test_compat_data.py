"""Data options of the original bergson package (issue 18, items 5 to 8), against hand computations:
rewards on plain text, NaN rewards, chat-template rendering of prompt/completion pairs, packing
into fixed-length chunks, load_dataset arguments, another tokenizer, the dataset's own columns,
and the defaults that differ from the original's."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import datasets
import numpy as np
import pytest

from bergson import collect_gradients
from bergson.cli import main
from bergson.config import DataConfig, IndexConfig
from bergson.config.original import ORIGINAL_DEFAULTS, differing_defaults
from bergson.data import load_data, tokenize_documents
from bergson.errors import BergsonError
from tests.helpers.assets import ASSETS, CHAT_TEMPLATE, shipped_tokenizer, target_tokens


def run(*args: str, check: bool = True) -> int:
    """A command line in this process (a subprocess per run would take seconds to import)."""
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    assert code == 0 or not check, f"bergson {' '.join(args)} exited {code}"
    return code


TEMPLATE = CHAT_TEMPLATE


@pytest.fixture(scope="module")
def plain():
    return shipped_tokenizer()


@pytest.fixture(scope="module")
def chat():
    return shipped_tokenizer(TEMPLATE)


# ---------------------------------------------------------------- item 6: rewards on plain text
def test_reward_on_plain_text_weights_the_whole_text_by_its_advantage(plain, caplog):
    """Rows with the same text form a group (as the original groups by the prompt column): the
    weight is the reward minus the group's mean, and the loss covers every token."""
    from tests.helpers.assets import tiny_neox

    ds = datasets.Dataset.from_dict(
        {"text": ["the cat sat", "the cat sat", "a dog ran far", "the cat sat"], "r": [1.0, 4.0, 5.0, 7.0]}
    )
    with caplog.at_level(logging.WARNING):
        docs = tokenize_documents(ds, plain, DataConfig(reward_column="r"), 64)
    # by hand: group "the cat sat" has mean (1 + 4 + 7) / 3 = 4; "a dog ran far" is alone
    np.testing.assert_allclose(docs.weights, [-3.0, 0.0, 0.0, 3.0])
    assert (
        "1 of 4 rows share their prompt (or, without --completion_column, their text) with no other"
        in caplog.text
    )
    for i, text in enumerate(ds["text"]):
        ids = plain(text)["input_ids"]
        assert docs.input_ids[i].tolist() == ids and target_tokens(docs, i).tolist() == ids[1:]
    model = tiny_neox(vocab=len(plain), hidden=16)
    plain_docs = tokenize_documents(ds, plain, DataConfig(), 64)
    weighted = collect_gradients(model, docs, projection_dim=0, progress=False).vectors
    unweighted = collect_gradients(model, plain_docs, projection_dim=0, progress=False).vectors
    np.testing.assert_allclose(weighted, docs.weights[:, None] * unweighted, rtol=1e-5, atol=1e-7)
    assert np.abs(weighted[0]).max() > 0


def test_grpo_line_of_the_readme_builds_on_a_plain_text_column(tmp_path, model_dir):
    data = tmp_path / "rl.jsonl"
    rows = [
        {"text": "Q: one yes", "reward": 1.0},
        {"text": "Q: one yes", "reward": 3.0},
        {"text": "Q: two", "reward": 2.0},
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "grpo"
    run("build", str(out), "--model", str(model_dir), "--dataset", str(data), "--reward_column", "reward",
        "--precision", "fp32", "--device", "cpu", "--projection_dim", "4")  # fmt: skip
    from bergson import load_gradients

    store = load_gradients(out)
    assert store.manifest.loss["kind"] == "grpo"
    vectors = np.asarray(store.all, np.float64)[np.argsort(store.rows["row_id"])]
    # rows 0 and 1 share their text (advantages -1 and +1: opposite gradients); row 2 is alone (0)
    np.testing.assert_allclose(vectors[0], -vectors[1], rtol=1e-3, atol=1e-6)
    assert np.abs(vectors[0]).max() > 0 and np.abs(vectors[2]).max() == 0


# ---------------------------------------------------------------- item 8: --skip_nan_rewards
def test_skip_nan_rewards_leaves_the_rows_out_and_says_so(tmp_path, plain, caplog):
    data = tmp_path / "r.jsonl"
    rows = [
        ("p", " a", 1.0),
        ("p", " b", None),
        ("p", " c", 3.0),
        ("q", " d", float("nan")),
        ("q", " e", 2.0),
    ]
    data.write_text(
        "".join(json.dumps({"text": p, "c": c, "r": r}).replace("NaN", "NaN") + "\n" for p, c, r in rows)
    )
    cfg = DataConfig(dataset=str(data), completion_column="c", reward_column="r", chat_template="never")
    kept = DataConfig(**{**vars(cfg), "skip_nan_rewards": True})
    report: dict = {}
    with caplog.at_level(logging.WARNING):
        ds = load_data(kept, report=report)
    assert ds["c"] == [" a", " c", " e"] and report == {"rows_without_reward_left_out": 2}
    assert "leaving out 2 of 5 rows without a reward" in caplog.text
    docs = tokenize_documents(ds, plain, kept, 64)
    np.testing.assert_allclose(docs.weights, [-1.0, 1.0, 0.0])  # p: mean 2; q: alone
    # without the option the rows stay, as zero rows
    full = tokenize_documents(load_data(cfg), plain, cfg, 64)
    assert len(full) == 5 and full.num_loss_tokens()[[1, 3]].tolist() == [0, 0]
    # straight from Python, tokenize_documents leaves them out too and counts them
    again = tokenize_documents(load_data(cfg), plain, kept, 64)
    assert len(again) == 3 and again.info["rows_without_reward_left_out"] == 2
    with pytest.raises(BergsonError, match="--skip_nan_rewards: it leaves out rows without a reward"):
        DataConfig(skip_nan_rewards=True)._check()


# ---------------------------------------------------------------- item 7: chat templates
def test_pairs_are_rendered_with_the_chat_template_when_the_tokenizer_has_one(chat, plain, caplog):
    ds = datasets.Dataset.from_dict(
        {"text": ["The capital of France is", "Two plus two"], "c": [" Paris.", " is four."]}
    )
    with caplog.at_level(logging.INFO):
        docs = tokenize_documents(ds, chat, DataConfig(completion_column="c"), 64)
    assert docs.info["pair_format"] == "chat_template"
    assert "rendered with the tokenizer's chat template as a user and an assistant turn" in caplog.text
    eos = chat.eos_token
    for i, (p, c) in enumerate(zip(ds["text"], ds["c"])):
        text = f"{eos}<|user|>\n{p}{eos}\n<|assistant|>\n{c}{eos}\n"  # the template, by hand
        assert docs.input_ids[i].tolist() == chat(text, add_special_tokens=False)["input_ids"]
        # the loss covers the assistant turn (its text and end-of-turn marker) and nothing else
        assert chat.decode(target_tokens(docs, i)) == f"{c}{eos}\n"
    never = tokenize_documents(ds, chat, DataConfig(completion_column="c", chat_template="never"), 64)
    assert never.info["pair_format"] == "plain"
    assert [chat.decode(target_tokens(never, i)) for i in range(2)] == ds["c"]
    assert (
        never.input_ids[0].tolist()
        == chat("The capital of France is")["input_ids"] + chat(" Paris.")["input_ids"]
    )
    # a tokenizer without a template: auto joins the raw texts, always refuses
    auto = tokenize_documents(ds, plain, DataConfig(completion_column="c"), 64)
    assert auto.info["pair_format"] == "plain" and auto.input_ids[0].tolist() == never.input_ids[0].tolist()
    with pytest.raises(BergsonError, match="--chat_template always: the tokenizer has no chat template"):
        tokenize_documents(ds, plain, DataConfig(completion_column="c", chat_template="always"), 64)
    with pytest.raises(BergsonError, match="--chat_template never: it says how a prompt and its completion"):
        DataConfig(chat_template="never")._check()


# ---------------------------------------------------------------- item 8: --chunk_length
def test_chunks_are_the_concatenated_token_stream_cut_into_equal_rows(plain, caplog):
    texts = ["The river flows to the sea.", "", "Mountains rise above the clouds today.", "A cat."]
    ds = datasets.Dataset.from_dict({"text": texts})
    with caplog.at_level(logging.INFO):
        docs = tokenize_documents(ds, plain, DataConfig(chunk_length=5), 64)
    stream = [
        t for x in texts if x for t in plain(x, add_special_tokens=False)["input_ids"] + [plain.eos_token_id]
    ]
    n = len(stream) // 5
    assert [d.tolist() for d in docs.input_ids] == [stream[5 * i : 5 * i + 5] for i in range(n)]
    assert docs.num_loss_tokens().tolist() == [4] * n
    assert docs.info == {
        "chunk_length": 5, "chunks": n, "source_documents": 3, "empty_documents_left_out": 1,
        "tokens_left_out": len(stream) - 5 * n,
    }  # fmt: skip
    assert "1 empty documents left out" in caplog.text and f"packed into {n} chunks" in caplog.text
    assert len(tokenize_documents(ds, plain, DataConfig(chunk_length=0), 64)) == 4  # 0: off
    for bad, message in [
        (DataConfig(chunk_length=5, completion_column="c"), "--chunk_length 5 with --completion_column"),
        (DataConfig(chunk_length=5, truncation=True), "--chunk_length 5 with --truncation"),
        (DataConfig(chunk_length=1), "--chunk_length 1: must be 0"),
        (DataConfig(chunk_length=100), "--chunk_length 100: longer than the limit of 64"),
    ]:
        with pytest.raises(BergsonError, match=message):
            tokenize_documents(ds, plain, bad, 64)


# ---------------------------------------------------------------- item 8: --data_args, --tokenizer
def test_data_args_reach_load_dataset(tmp_path):
    path = tmp_path / "semi.csv"
    path.write_text("text;reward\nhello there;1.5\ngood day;2\n")
    assert load_data(DataConfig(dataset=str(path))).column_names == ["text;reward"]
    ds = load_data(DataConfig(dataset=str(path), data_args="delimiter=;"))
    assert ds.column_names == ["text", "reward"] and ds["reward"] == [1.5, 2.0]
    with pytest.raises(BergsonError, match="--data_args 'delimiter': 'delimiter' is not key=value"):
        load_data(DataConfig(dataset=str(path), data_args="delimiter"))
    saved = tmp_path / "saved"
    ds.save_to_disk(str(saved))
    with pytest.raises(BergsonError, match="is a save_to_disk directory"):
        load_data(DataConfig(dataset=str(saved), data_args="delimiter=;"))


def test_tokenizer_option_replaces_the_models_tokenizer(tmp_path, plain, model_dir):
    from transformers import AutoTokenizer

    other = tmp_path / "tok-bos"
    AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia", add_bos_token=True).save_pretrained(other)
    ds = datasets.Dataset.from_dict({"text": ["hello world"]})
    docs = tokenize_documents(ds, plain, DataConfig(tokenizer=str(other)), 64)
    assert docs.input_ids[0].tolist() == [plain.bos_token_id, *plain("hello world")["input_ids"]]
    with pytest.raises(BergsonError, match=r"--tokenizer .*missing: cannot load a tokenizer"):
        tokenize_documents(ds, plain, DataConfig(tokenizer=str(tmp_path / "missing")), 64)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "hello world again"}) + "\n")
    out = tmp_path / "store"
    run("build", str(out), "--model", str(model_dir), "--dataset", str(data), "--tokenizer", str(other),
        "--precision", "fp32", "--device", "cpu", "--projection_dim", "4")  # fmt: skip
    from bergson import load_gradients

    store = load_gradients(out)
    assert store.manifest.data["tokenizer"] == str(other)
    assert int(store.rows["num_tokens"][0]) == len(plain("hello world again")["input_ids"]) + 1
    # a query of the store is tokenized with the store's --tokenizer: the document's own text gives
    # its stored vector back
    from bergson.config import QueryConfig
    from bergson.querying import QueryEngine

    engine = QueryEngine(QueryConfig(index=str(out), precision="fp32", device="cpu"))
    vecs, _, qdocs, _ = engine.vectors(
        datasets.Dataset.from_dict({"text": ["hello world again"]}), "text", None
    )
    assert qdocs.input_ids[0].tolist() == [plain.bos_token_id, *plain("hello world again")["input_ids"]]
    np.testing.assert_allclose(vecs[0], np.asarray(store.all[0], np.float64), rtol=1e-3, atol=1e-6)
    # a checkpoint directory without tokenizer files builds with --tokenizer
    import shutil

    bare = tmp_path / "bare-model"
    shutil.copytree(model_dir, bare)
    for f in bare.glob("*token*"):
        f.unlink()
    run("build", str(tmp_path / "bare"), "--model", str(bare), "--dataset", str(data), "--tokenizer", str(other),
        "--precision", "fp32", "--device", "cpu", "--projection_dim", "4")  # fmt: skip
    np.testing.assert_array_equal(np.asarray(load_gradients(tmp_path / "bare").all), np.asarray(store.all))


# ---------------------------------------------------------------- item 8: --drop_columns
def test_drop_columns_false_keeps_the_datasets_columns_with_the_rows(tmp_path, model_dir):
    from bergson.runs.documents import store_rows

    data = tmp_path / "d.jsonl"
    rows = [{"text": f"document number {i} is here", "source": f"s{i}", "score": i * 0.5} for i in range(3)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--model", str(model_dir), "--dataset", str(data), "--precision", "fp32", "--device", "cpu",
              "--projection_dim", "4"]  # fmt: skip
    run("build", str(tmp_path / "kept"), *common, "--drop_columns", "False")
    run("build", str(tmp_path / "dropped"), *common, "--drop_columns")
    kept, dropped = store_rows(tmp_path / "kept"), store_rows(tmp_path / "dropped")
    assert dropped.column_names == ["row_id", "num_tokens", "loss"]
    assert kept.column_names == ["row_id", "num_tokens", "loss", "text", "source", "score"]
    order = kept["row_id"]
    assert kept["source"] == [rows[r]["source"] for r in order] and kept["score"] == [
        rows[r]["score"] for r in order
    ]
    assert run("build", str(tmp_path / "bad"), *common, "--drop_columns", "maybe", check=False) == 2


# ---------------------------------------------------------------- item 5: defaults and --dataset
def test_differing_defaults_are_announced_and_recorded(tmp_path, model_dir, caplog):
    cfg = IndexConfig(run_path="x", model="m")
    found = differing_defaults(cfg, "build")
    assert set(found) == {"precision", "projection_dim", "nproc_per_node"}
    assert found["projection_dim"]["fix"] == "--projection_dim 0"
    assert "projection_dim" not in differing_defaults(IndexConfig(projection_dim=0), "build")
    assert "projection_dim" not in differing_defaults(
        cfg, "trackstar"
    )  # the original's trackstar uses 16 too
    assert ORIGINAL_DEFAULTS["dataset"].original == "NeelNanda/pile-10k"
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"text": "one two three four"}) + "\n")
    out = tmp_path / "store"
    with caplog.at_level(logging.INFO):
        run("build", str(out), "--model", str(model_dir), "--dataset", str(data), "--device", "cpu")
    line = next(r.getMessage() for r in caplog.records if "differ from the original" in r.getMessage())
    assert line.startswith("defaults that differ from the original bergson: precision auto")
    assert (
        "projection_dim 16 (random projection to 16x16 per module) (original: 0 (full gradients); "
        "pass --projection_dim 0)" in line
    )
    producer = json.loads((out / "manifest.json").read_text())["producer"]
    assert set(producer["defaults_differing_from_original"]) == {
        "precision",
        "projection_dim",
        "nproc_per_node",
    }


def test_a_build_without_dataset_names_the_flag_before_loading_the_model(tmp_path, capsys):
    # the model does not exist: the dataset error must come first (the README's diagnostic line)
    code = run(
        "build", str(tmp_path / "out"), "--model", str(tmp_path / "no-model"), "--force_math_sdp", check=False
    )
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "--dataset is required" in err and "--dataset NeelNanda/pile-10k" in err
    assert "no-model" not in err and not (tmp_path / "out").exists()


def test_the_docs_table_of_differing_defaults_is_the_code_table():
    page = (Path(__file__).resolve().parents[2] / "docs" / "data.md").read_text()
    rows = [ln for ln in page.splitlines() if ln.startswith("| `")]
    for name, d in ORIGINAL_DEFAULTS.items():
        row = next((r for r in rows if r.startswith(f"| `{name}`")), None)
        assert row is not None, f"docs/data.md has no row for {name}"
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1:] == [d.ours, d.original, f"`{d.fix}`"], row


def test_the_query_set_is_tokenized_with_the_training_tokenizer():
    from bergson.config import TrackstarConfig
    from bergson.config.options import validate_options

    cfg = TrackstarConfig(
        run_path="x", data=DataConfig(dataset="d", tokenizer="tok"), query=DataConfig(dataset="q")
    )
    validate_options(cfg)
    assert cfg.query.tokenizer == "tok"
    cfg = TrackstarConfig(
        run_path="x",
        data=DataConfig(dataset="d", tokenizer="tok"),
        query=DataConfig(dataset="q", tokenizer="other"),
    )
    with pytest.raises(BergsonError, match="must be tokenized alike"):
        validate_options(cfg)
    with pytest.raises(BergsonError, match=r"--query\.dataset is required"):
        validate_options(TrackstarConfig(run_path="x", data=DataConfig(dataset="d")))
    with pytest.raises(BergsonError, match=r"--query\.chunk_length 3 with --query\.completion_column"):
        validate_options(
            TrackstarConfig(
                data=DataConfig(dataset="d"),
                query=DataConfig(dataset="q", chunk_length=3, completion_column="c"),
            )
        )
