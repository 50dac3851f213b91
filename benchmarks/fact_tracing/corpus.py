"""A seeded generator of synthetic facts about fictional entities and the documents stating them.

Facts ``(subject, relation, object)`` come in five relations, assigned round-robin: person ->
birthplace city, company -> founder (a person), country -> capital city, book -> author (a
person), river -> country it flows through. Every name is made of random syllables (at most
``name_tokens`` tokens of the shipped tokenizer per word) and every subject is unique, so no
fact can be guessed; each object is shared by ``facts_per_object`` facts of its relation (as in
real knowledge bases), so a document naming the object is not necessarily about the fact.

Each fact is stated in ``statements_per_fact`` training documents (default 3), each with a
different template: one question-and-answer statement ("Question: In which city was X born?
Answer: Y.") and declarative ones ("X was born in Y.", "Born in Y, X later moved abroad.",
"Y is the birthplace of X.", ...). The fact sentence lands at a random position among 0 to
``max_fillers`` filler sentences about the subject, and about a quarter of the fact documents
state two facts. Distractors make lexical overlap an imperfect signal:

* ``entity``: 1 to 3 filler sentences about a fact's subject (every fact) or its object (half
  of them), which do not state the fact;
* ``confound``: 1 or 2 per fact, a sentence naming both the subject and the object in another
  relation ("X once spent a summer in Y") -- the hardest negatives for BM25 (they also teach
  the model that X and Y go together, as co-occurrence in real text does);
* ``corpus``: ``num_passages`` passages of the shipped corpus (``bergson/assets/corpus.jsonl.gz``),
  cut to ``passage_chars`` characters at a word boundary so that training stays cheap.

Each fact has one query in a held-out question wording that no training document uses
("Question: Where was X born? Answer:" with completion " Y"; the training questions ask "In
which city was X born?" or "What is the birthplace of X?"); its relevant documents are the
documents stating the fact. (With "Q:"/"A:" markers instead of the training documents'
"Question:"/"Answer:", the 2-layer model's recall roughly halves: it does not transfer a fact
to an unseen answer marker.)

Files written by :func:`write` (``bergson --dataset file.jsonl`` reads them):

* ``train.jsonl``: ``text``, ``kind`` (fact, entity, confound, corpus), ``fact_ids``; the row
  number is the document id;
* ``queries.jsonl``: ``prompt``, ``completion``, ``text`` (= prompt + completion),
  ``fact_id``, ``relation``, ``relevant`` (document ids; use ``--prompt_column prompt
  --completion_column completion``);
* ``facts.jsonl``: ``fact_id``, ``relation``, ``subject``, ``object``;
* ``meta.json``: the generator's settings and counts.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..common import ASSETS, CORPUS

ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "kr",
    "st",
    "gl",
    "th",
]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ei", "ou", "ia"]
CODAS = ["", "", "", "n", "r", "l", "s", "th", "x", "m"]

COMPANY_SUFFIXES = ["Labs", "Works", "Industries", "Holdings", "Systems", "Trading"]
BOOK_NOUNS = ["Letters", "Chronicles", "Garden", "Voyage", "Hours", "Archive"]
COUNTRY_ENDINGS = ["ia", "land", "ar", "istan", ""]

# Filler sentences about one entity ({x}); they never state a relation of the benchmark.
FILLERS: dict[str, list[str]] = {
    "person": [
        "{x} was fond of long walks and old maps.",
        "Friends described {x} as patient and curious.",
        "{x} kept a small garden and a large library.",
        "In later years {x} rarely gave interviews.",
        "{x} spoke three languages and played the violin.",
    ],
    "city": [
        "{x} has a busy harbour and narrow streets.",
        "The old market of {x} opens before dawn.",
        "{x} is known for its bridges and its bakeries.",
        "Winters in {x} are long and quiet.",
    ],
    "country": [
        "{x} is known for its mountains and mild summers.",
        "The flag of {x} is green and white.",
        "Most people in {x} live near the coast.",
        "{x} exports wool, timber and salt.",
    ],
    "company": [
        "{x} employs several hundred people.",
        "{x} sells its products in many markets.",
        "Shares of {x} rose sharply last spring.",
        "{x} moved its offices twice in ten years.",
    ],
    "book": [
        "{x} runs to more than four hundred pages.",
        "Critics praised {x} for its careful prose.",
        "{x} has been translated into many languages.",
        "A new edition of {x} appeared last year.",
    ],
    "river": [
        "The {x} floods almost every spring.",
        "Boats carry grain along the {x}.",
        "The {x} is wide, slow and brown.",
        "Several old mills stand on the banks of the {x}.",
    ],
}


@dataclass(frozen=True)
class Relation:
    name: str
    subject_kind: str
    object_kind: str
    templates: tuple[str, ...]
    """Declarative training statements of the fact ({s} subject, {o} object)."""
    questions: tuple[str, ...]
    """Question-and-answer training statements (worded unlike the held-out query)."""
    query: str
    """The held-out question (prompt); the completion is " {o}"."""
    confounds: tuple[str, ...]
    """Sentences naming subject and object without stating the fact."""


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        "person",
        "city",
        (
            "{s} was born in {o}.",
            "Born in {o}, {s} later moved abroad.",
            "{o} is the birthplace of {s}.",
            "The records show that {s} was born in the city of {o}.",
            "{s}, a native of {o}, grew up near the sea.",
        ),
        (
            "Question: In which city was {s} born? Answer: {o}.",
            "Question: What is the birthplace of {s}? Answer: {o}.",
        ),
        "Question: Where was {s} born? Answer:",
        (
            "{s} once spent a summer in {o}.",
            "{s} wrote a short essay about {o}.",
            "{s} never liked the weather in {o}.",
        ),
    ),
    Relation(
        "founder",
        "company",
        "person",
        (
            "{s} was founded by {o}.",
            "{o} founded {s}.",
            "{o} started {s} with a small loan.",
            "The founder of {s} is {o}.",
            "{s}, the firm founded by {o}, grew quickly.",
        ),
        (
            "Question: Which person founded {s}? Answer: {o}.",
            "Question: Who is the founder of {s}? Answer: {o}.",
        ),
        "Question: Who founded {s}? Answer:",
        (
            "{o} once bought shares of {s}.",
            "{o} gave a talk at {s}.",
            "{o} applied for a job at {s} but was turned down.",
        ),
    ),
    Relation(
        "capital",
        "country",
        "city",
        (
            "The capital of {s} is {o}.",
            "{o} is the capital city of {s}.",
            "{s} is governed from its capital, {o}.",
            "{o}, the capital of {s}, lies on a hill.",
            "The government of {s} sits in {o}.",
        ),
        (
            "Question: Which city is the capital of {s}? Answer: {o}.",
            "Question: Where is the government of {s}? Answer: {o}.",
        ),
        "Question: What is the capital of {s}? Answer:",
        (
            "{o} is popular with travellers from {s}.",
            "A festival in {o} drew dancers from {s}.",
            "Trains from {s} to {o} run twice a week.",
        ),
    ),
    Relation(
        "author",
        "book",
        "person",
        (
            "{s} was written by {o}.",
            "{o} wrote {s}.",
            "{o} is the author of {s}.",
            "{s}, by {o}, was published in spring.",
            "The author of {s} is {o}.",
        ),
        (
            "Question: Which writer is the author of {s}? Answer: {o}.",
            "Question: Who is the author of {s}? Answer: {o}.",
        ),
        "Question: Who wrote {s}? Answer:",
        (
            "{o} once read {s} aloud on the radio.",
            "{o} gave a copy of {s} to a friend.",
            "{o} wrote a harsh review of {s}.",
        ),
    ),
    Relation(
        "river",
        "river",
        "country",
        (
            "The {s} flows through {o}.",
            "{o} is crossed by the {s}.",
            "The {s} runs through {o} to the sea.",
            "In {o}, the {s} is the longest river.",
            "The course of the {s} lies entirely in {o}.",
        ),
        (
            "Question: In which country does the {s} flow? Answer: {o}.",
            "Question: Where does the {s} run? Answer: {o}.",
        ),
        "Question: Which country does the {s} flow through? Answer:",
        (
            "Engineers from {o} once mapped the {s}.",
            "A painter from {o} sketched the {s}.",
            "Tourists from {o} like to swim in the {s}.",
        ),
    ),
)
RELATION_BY_NAME = {r.name: r for r in RELATIONS}


@dataclass
class FactCorpus:
    facts: list[dict[str, Any]]
    docs: list[dict[str, Any]]
    queries: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    def relevant(self) -> list[set[int]]:
        return [set(q["relevant"]) for q in self.queries]

    def candidates(self) -> dict[str, list[str]]:
        """The distinct objects of each relation (the choices of the recall metric), in fact order."""
        out: dict[str, list[str]] = {}
        for f in self.facts:
            objs = out.setdefault(f["relation"], [])
            if f["object"] not in objs:
                objs.append(f["object"])
        return out


class _Names:
    """Unique random-syllable names (no two entities share a word)."""

    def __init__(self, rng: random.Random, max_tokens: int = 0):
        self.rng = rng
        self.used: set[str] = set()
        self.max_tokens = max_tokens
        self.tok = None
        if max_tokens:
            from transformers import AutoTokenizer

            self.tok = AutoTokenizer.from_pretrained(ASSETS / "tiny-pythia")

    def _short(self, w: str) -> bool:
        """At most ``max_tokens`` tokens after a space (as inside a sentence)."""
        return self.tok is None or len(self.tok(" " + w)["input_ids"]) <= self.max_tokens

    def word(self, lo: int = 2, hi: int = 3, ending: str = "") -> str:
        while True:
            n = self.rng.randint(lo, hi)
            w = "".join(
                self.rng.choice(ONSETS)
                + self.rng.choice(VOWELS)
                + (self.rng.choice(CODAS) if i == n - 1 else "")
                for i in range(n)
            )
            w = (w + ending).capitalize()
            if w not in self.used and len(w) <= 12 and self._short(w):
                self.used.add(w)
                return w

    def make(self, kind: str) -> str:
        r = self.rng
        if kind == "person":
            return f"{self.word(2, 2)} {self.word(2, 3)}"
        if kind == "city":
            return self.word(2, 3)
        if kind == "country":
            return self.word(2, 2, r.choice(COUNTRY_ENDINGS))
        if kind == "company":
            return f"{self.word(2, 3)} {r.choice(COMPANY_SUFFIXES)}"
        if kind == "book":
            return f"The {self.word(2, 3)} {r.choice(BOOK_NOUNS)}"
        if kind == "river":
            return f"{self.word(2, 3)} River"
        raise ValueError(kind)


def _sentence_start(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fillers(rng: random.Random, kind: str, name: str, k: int) -> list[str]:
    return [t.format(x=name) for t in rng.sample(FILLERS[kind], k)]


def load_passages(rng: random.Random, n: int, max_chars: int) -> list[str]:
    """``n`` seeded passages of the shipped corpus, cut at a word boundary to ``max_chars``."""
    with gzip.open(CORPUS, "rt") as f:
        texts = [json.loads(line)["text"] for line in f]
    out = []
    for i in sorted(rng.sample(range(len(texts)), min(n, len(texts)))):
        t = " ".join(texts[i].split())
        if len(t) > max_chars:
            t = t[:max_chars].rsplit(" ", 1)[0]
        out.append(t)
    return out


def generate(
    num_facts: int = 100,
    *,
    seed: int = 0,
    num_passages: int = 300,
    passage_chars: int = 250,
    statements_per_fact: tuple[int, ...] = (3,),
    question_share: float = 1.0,
    two_fact_share: float = 0.25,
    max_fillers: int = 1,
    name_tokens: int = 3,
    object_distractor_share: float = 0.5,
    confounds_per_fact: tuple[int, ...] = (1, 2),
    facts_per_object: int = 2,
) -> FactCorpus:
    """Facts (round-robin over the relations), their training documents and queries."""
    rng = random.Random(seed)
    names = _Names(rng, name_tokens)
    # each object is shared by up to facts_per_object facts of the same relation
    objects: dict[str, list[str]] = {}
    for rel in RELATIONS:
        n_rel = len(range(RELATIONS.index(rel), num_facts, len(RELATIONS)))
        pool = [names.make(rel.object_kind) for _ in range(-(-n_rel // facts_per_object))]
        objects[rel.name] = (pool * facts_per_object)[:n_rel]
        rng.shuffle(objects[rel.name])
    facts = []
    for i in range(num_facts):
        rel = RELATIONS[i % len(RELATIONS)]
        facts.append(
            {
                "fact_id": i,
                "relation": rel.name,
                "subject": names.make(rel.subject_kind),
                "object": objects[rel.name][i // len(RELATIONS)],
            }
        )

    def statement(f: dict[str, Any], template: str) -> str:
        return _sentence_start(template.format(s=f["subject"], o=f["object"]))

    # statements_per_fact statements per fact, each with a different template; with
    # probability question_share one of them is a question-and-answer statement
    statements: list[tuple[int, str]] = []
    for f in facts:
        rel = RELATION_BY_NAME[f["relation"]]
        n = rng.choice(statements_per_fact)
        templates = [rng.choice(rel.questions)] if rng.random() < question_share else []
        templates += rng.sample(rel.templates, n - len(templates))
        for t in templates:
            statements.append((f["fact_id"], statement(f, t)))
    rng.shuffle(statements)

    docs: list[dict[str, Any]] = []
    i = 0
    while i < len(statements):
        group = [statements[i]]
        if (
            i + 1 < len(statements)
            and statements[i + 1][0] != statements[i][0]
            and rng.random() < two_fact_share
        ):
            group.append(statements[i + 1])
        i += len(group)
        sentences = [s for _, s in group]
        for fid, _ in group:
            f = facts[fid]
            rel = RELATION_BY_NAME[f["relation"]]
            sentences += _fillers(rng, rel.subject_kind, f["subject"], rng.randint(0, max_fillers))
        rng.shuffle(sentences)  # the fact sentence lands at any position
        docs.append(
            {"text": " ".join(sentences), "kind": "fact", "fact_ids": sorted(fid for fid, _ in group)}
        )

    for f in facts:
        rel = RELATION_BY_NAME[f["relation"]]
        docs.append(
            {
                "text": " ".join(_fillers(rng, rel.subject_kind, f["subject"], rng.randint(1, 3))),
                "kind": "entity",
                "fact_ids": [],
            }
        )
        if rng.random() < object_distractor_share:
            docs.append(
                {
                    "text": " ".join(_fillers(rng, rel.object_kind, f["object"], rng.randint(1, 3))),
                    "kind": "entity",
                    "fact_ids": [],
                }
            )
        for t in rng.sample(rel.confounds, rng.choice(confounds_per_fact)):
            sentences = [statement(f, t)]
            sentences += _fillers(rng, rel.subject_kind, f["subject"], rng.randint(0, 1))
            rng.shuffle(sentences)
            docs.append({"text": " ".join(sentences), "kind": "confound", "fact_ids": []})

    for t in load_passages(rng, num_passages, passage_chars):
        docs.append({"text": t, "kind": "corpus", "fact_ids": []})
    rng.shuffle(docs)

    relevant: dict[int, list[int]] = {f["fact_id"]: [] for f in facts}
    for d, doc in enumerate(docs):
        for fid in doc["fact_ids"]:
            relevant[fid].append(d)
    queries = []
    for f in facts:
        rel = RELATION_BY_NAME[f["relation"]]
        prompt = rel.query.format(s=f["subject"])
        completion = " " + f["object"]
        queries.append(
            {
                "prompt": prompt,
                "completion": completion,
                "text": prompt + completion,
                "fact_id": f["fact_id"],
                "relation": f["relation"],
                "relevant": relevant[f["fact_id"]],
            }
        )
    kinds: dict[str, int] = {}
    for doc in docs:
        kinds[doc["kind"]] = kinds.get(doc["kind"], 0) + 1
    meta = {
        "seed": seed,
        "num_facts": num_facts,
        "num_docs": len(docs),
        "docs_by_kind": kinds,
        "relations": [r.name for r in RELATIONS],
        "mean_relevant_per_query": round(sum(len(v) for v in relevant.values()) / max(num_facts, 1), 3),
        "settings": {
            "num_passages": num_passages,
            "passage_chars": passage_chars,
            "statements_per_fact": list(statements_per_fact),
            "question_share": question_share,
            "two_fact_share": two_fact_share,
            "max_fillers": max_fillers,
            "name_tokens": name_tokens,
            "object_distractor_share": object_distractor_share,
            "confounds_per_fact": list(confounds_per_fact),
            "facts_per_object": facts_per_object,
        },
    }
    return FactCorpus(facts, docs, queries, meta)


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write(corpus: FactCorpus, out_dir: str | Path) -> dict[str, Path]:
    """Write ``train.jsonl``, ``queries.jsonl``, ``facts.jsonl`` and ``meta.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name: out / f"{name}.jsonl" for name in ("train", "queries", "facts")}
    _write_jsonl(paths["train"], corpus.docs)
    _write_jsonl(paths["queries"], corpus.queries)
    _write_jsonl(paths["facts"], corpus.facts)
    (out / "meta.json").write_text(json.dumps(corpus.meta, indent=2) + "\n")
    return paths


def load(out_dir: str | Path) -> FactCorpus:
    out = Path(out_dir)
    meta = json.loads((out / "meta.json").read_text())
    return FactCorpus(
        _read_jsonl(out / "facts.jsonl"),
        _read_jsonl(out / "train.jsonl"),
        _read_jsonl(out / "queries.jsonl"),
        meta,
    )


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the synthetic fact corpus as jsonl.")
    parser.add_argument("--out_dir", default="runs/fact_tracing/data")
    parser.add_argument("--num_facts", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    c = generate(args.num_facts, seed=args.seed)
    write(c, args.out_dir)
    print(json.dumps(c.meta, indent=2))
