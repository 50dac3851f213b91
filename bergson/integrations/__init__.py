"""Per-example gradients of every training step of a Hugging Face ``Trainer``.

::

    from bergson import GradientCollectorCallback, prepare_for_gradient_collection

    trainer = Trainer(model=model, args=args, train_dataset=ds, data_collator=collator,
                      callbacks=[GradientCollectorCallback("runs/grads")])
    trainer = prepare_for_gradient_collection(trainer)
    trainer.train()

While the trainer trains, :class:`~bergson.collect.hooks.GradientCollector` hooks on the
trainer's own forward and backward passes project every row's gradient; there is no extra
forward or backward pass. Each epoch ``k`` becomes an ordinary gradient store
``path/epoch_{k}`` (what ``bergson build`` writes), whose row ``i`` is row ``i`` of the
trainer's ``train_dataset``, plus ``path/epoch_{k}/order.parquet`` with the columns ``row``,
``step``, ``epoch``, ``micro_batch`` and ``normalized``: when each row was trained on.

What a row's vector is: the gradient of the row's summed next-token cross-entropy (over its
label tokens, the ``loss_reduction="sum"`` of ``bergson build``) at the weights of the step
that trained on it, before that step's update (the weights of ``checkpoint-{step}``),
normalized by the optimizer state the update used, then projected. The trainer's loss is
some multiple c of that sum (a mean over the tokens of the accumulated batch, divided by the
accumulation steps, scaled by a loss scaler, ... depending on versions and options). c is
not assumed but measured for every row of every micro-batch, from the gradient that reaches
the output layer's logits: for the summed cross-entropy S it is softmax(z) - onehot(y) at
label positions, so the actual gradient G = c dS/dz gives c = <G, dS/dz> / |dS/dz|^2, taken
at a few label positions per row; the same positions check that G really is a multiple of
dS/dz (a loss with other terms is refused). The hooked vectors are divided by c.

Normalization (``normalize=True``): before each optimizer step, normalizers are built from
the live ``trainer.optimizer`` by :func:`~bergson.transforms.optimizer_state.normalizers_from_optimizer`,
the conversion ``bergson build --optimizer_state`` uses (AdamW: ``exp_avg_sq`` with bias
correction; Adafactor: its factors). The default ``normalizer_form="rank_one"`` fits Adam's
second moments with a rank-one (Adafactor) estimate, which keeps the cheap projected path;
``"adam"`` divides elementwise, which forms every row's full gradient per module (much
slower). Before the optimizer has state (the first step) vectors are stored unnormalized:
``normalized`` is False for those rows in the order file and the steps are listed in the
manifest's ``plan.unnormalized_steps``. Each store's ``normalizers.safetensors`` (and its
manifest's ``normalizer``) is the optimizer state at the end of the epoch, after its last
update: ``bergson query`` applies it to query gradients, and a query store for
``bergson score --index`` must be built with the same normalizers.

Rows the epoch never trained on (``dataloader_drop_last``, a run stopped early) keep a zero
vector with ``num_tokens`` 0 and loss 0 and are missing from the order file; a row trained on
twice in one epoch is an error. ``num_tokens`` is the row's attention-mask length (its padded
length when the batch has no mask); ``loss`` its summed cross-entropy.

Data parallel training (DDP: ``torchrun`` or ``accelerate launch`` of the training script,
one process per device) is supported: every rank collects the rows its own batches hold, and at
the end of each epoch sends them to rank 0, which writes the epoch store (its ``order.parquet``
lists every rank's micro-batches, step by step). accelerate's ``even_batches`` (on by default)
fills the last step's batches with rows from the start of the epoch, so those rows are trained on
twice; they keep the vector of their first step, both steps are in ``order.parquet`` and the
manifest's ``plan.repeated_rows`` counts them (``accelerator_config={"even_batches": False}``
avoids the repeats). Only rank 0 needs to see the output directory.

Gradient checkpointing (either form of ``torch.utils.checkpoint``) is supported: see
:mod:`bergson.collect.hooks`. So is TRL's ``SFTTrainer``, whose fused LM head returns the
labels' log-probabilities instead of logits and never calls the output layer: c is then
measured from the gradient of those log-probabilities, and tracking the output layer is an
error (its hook never fires).

Not supported (a :class:`~bergson.errors.BergsonError` says so): DeepSpeed, FSDP and
DataParallel (several GPUs in one process), packed or padding-free batches, label smoothing,
a custom ``compute_loss_func``, losses with terms other than the labels' cross-entropy, labels
that are not per position, encoder-decoder models, ``torch_compile``,
iterable datasets, and resuming from a checkpoint. The
vectors equal ``bergson build``'s only when the model has no active dropout (the trainer's
forward pass drops units; a warning says so).

The pieces: :mod:`~bergson.integrations.callback` (the callback and
:func:`prepare_for_gradient_collection`), :mod:`~bergson.integrations.checks` (the supported
set-ups and the errors for the rest), :mod:`~bergson.integrations.recording` (which rows each
micro-batch holds), :mod:`~bergson.integrations.loss_scale` (the loss scale c) and
:mod:`~bergson.integrations.epoch_store` (one epoch's store).
"""

from .callback import GradientCollectorCallback, prepare_for_gradient_collection

__all__ = ["GradientCollectorCallback", "prepare_for_gradient_collection"]
