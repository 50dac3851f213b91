"""Fact-tracing benchmark: which training documents taught a small model a synthetic fact?

A seeded generator (``corpus``) writes facts about fictional entities, each stated in a few
training documents among distractors; ``train`` fits a tiny GPT-NeoX on them with
``transformers.Trainer``; ``run`` ranks the training documents behind each fact's query with
several attribution methods and reports MRR and recall@10 (``metrics``).

    python -m benchmarks.fact_tracing.run --out_dir runs/fact_tracing
"""
