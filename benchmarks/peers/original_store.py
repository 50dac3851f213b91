"""Stores written by the published ``bergson`` 2.5.1, read by ours (issue 18, item 12).

The published package (its venv made by :func:`published_bergson.ensure_peer_venv`) builds two
tiny stores from the local stand-ins (``tests/helpers/standins.py``: ``EleutherAI/pythia-14m`` and
``NeelNanda/pile-10k``): one of full gradients (its default) and one projected to 16. For each,
the published ``load_gradient_dataset`` dumps its ``gradients`` and ``loss`` columns; ours must
read the same values in place (``load_gradients``, ``to_dataset``) and after ``bergson convert``.
For the full-gradient store, our own per-document gradients of the same rows are compared with
the published ones, and a query traced on the model searches the converted store (its source
document must be the top hit). Prints one JSON object.

    python -m benchmarks.peers.original_store [--workdir DIR] [--num_docs 12]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .published_bergson import PEER_VENV, child_env, ensure_peer_venv

DUMP = """
import sys, numpy as np
from pathlib import Path
from bergson import load_gradient_dataset
ds = load_gradient_dataset(Path(sys.argv[1]))
np.save(sys.argv[2], np.asarray(ds.with_format("numpy")["gradients"]))
np.save(sys.argv[3], np.asarray(ds["loss"], np.float32))
"""


def peer(args: list[str], cwd: Path, log: Path) -> None:
    env = child_env(cwd / ".hf")
    with log.open("a") as f:
        subprocess.run(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--num_docs", type=int, default=12)
    a = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bergson import Attributor, DataConfig, collect_gradients, load_gradients
    from bergson.data import load_data, tokenize_documents
    from bergson.methods.compat import convert_store
    from tests.helpers.standins import PILE, PYTHIA, make_standins

    work = Path(a.workdir or tempfile.mkdtemp(prefix="original-store-"))
    make_standins(work)
    log = work / "peer.log"
    venv = ensure_peer_venv(PEER_VENV, False, log)
    bin_ = Path(venv["path"]) / "bin"
    split = f"train[:{a.num_docs}]"
    out: dict[str, Any] = {"peer": venv["versions"], "num_docs": a.num_docs, "stores": {}}
    for name, extra in (("full", []), ("p16", ["--projection_dim", "16"])):
        run = f"runs/orig_{name}"
        peer([str(bin_ / "bergson"), "build", run, "--model", PYTHIA, "--dataset", PILE, "--split", split,
              "--truncation", "--token_batch_size", "512", "--overwrite", *extra], work, log)  # fmt: skip
        dump = [str(work / f"{name}_{k}.npy") for k in ("grads", "loss")]
        peer([str(bin_ / "python"), "-c", DUMP, run, *dump], work, log)
        theirs, loss = np.load(dump[0]), np.load(dump[1])
        store = load_gradients(work / run)
        view = np.asarray(store.to_dataset().with_format("numpy")["gradients"])
        conv = convert_store(work / run, work / f"runs/conv_{name}", model=str(work / PYTHIA), overwrite=True)
        out["stores"][name] = {
            "rows": len(store),
            "dim": store.manifest.total_dim,
            "dtype": store.manifest.dtype,
            "projection": store.manifest.projection,
            "in_place_equal": bool(np.array_equal(np.asarray(store.all), theirs)),
            "view_equal": bool(np.array_equal(view, theirs)),
            "converted_equal": bool(np.array_equal(np.asarray(conv.all), theirs)),
            "loss_equal": bool(np.array_equal(store.rows["loss"], loss)),
        }
    # our gradients of the same rows, and a traced query against the converted full store
    model = AutoModelForCausalLM.from_pretrained(str(work / PYTHIA), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(work / PYTHIA))
    dcfg = DataConfig(dataset=str(work / PILE), split=split, truncation=True)
    docs = tokenize_documents(load_data(dcfg), tok, dcfg, 512)
    conv = load_gradients(work / "runs/conv_full")
    modules = {m.name: model.get_submodule(m.name) for m in conv.manifest.modules}
    ours = collect_gradients(
        model, docs, modules=modules, projection_dim=0, token_batch_size=512, progress=False
    )
    theirs = np.asarray(conv.all, np.float64)
    hits = []
    for i in range(min(4, len(docs))):
        ids = torch.as_tensor(docs.input_ids[i])[None]
        with Attributor(conv.root).trace(model.base_model, 1) as result:
            model(ids, labels=ids).loss.backward()
            model.zero_grad()
        hits.append(int(result.indices[0, 0]))
    out["full_gradients_ours_vs_published"] = {
        "max_abs_diff_over_max_abs": float(np.abs(ours.vectors - theirs).max() / np.abs(theirs).max()),
        "loss_max_abs_diff": float(np.abs(ours.loss - conv.rows["loss"]).max()),
        "num_tokens_equal": bool(np.array_equal(conv.rows["num_tokens"], docs.lengths)),
        "traced_query_top_hit_is_source": hits == list(range(len(hits))),
    }
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
