"""Run by ``tests/integrations/test_callback_ddp.py`` under torchrun (2 CPU processes, gloo): the callback
test's Trainer, data parallel, with the gradient callback. Rank 0 saves the weights and the
optimizer state at the start of every step; every rank saves the rows it was fed.

    PYTHONPATH=. python -m torch.distributed.run --standalone --nproc_per_node 2 tests/helpers/ddp_trainer.py OUT ROWS
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from bergson import GradientCollectorCallback, prepare_for_gradient_collection
from tests.helpers.trainer import _Capture, _token_ids, _trainer


class SaveSteps(TrainerCallback):
    def __init__(self, out: Path):
        self.out = out

    def on_step_begin(self, args, state, control, model: Any = None, optimizer: Any = None, **kwargs):
        if state.is_world_process_zero:
            torch.save(model.state_dict(), self.out / f"weights-{state.global_step}.pt")
            torch.save(optimizer.state_dict(), self.out / f"optimizer-{state.global_step}.pt")


def main(out: Path, rows: int) -> None:
    capture = _Capture(set(), _token_ids(rows))
    callback = GradientCollectorCallback(out / "grads", save_dtype="float32")
    trainer = _trainer(
        out,
        [callback, capture.callback, SaveSteps(out)],
        num_rows=rows,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        num_train_epochs=2,
    )
    prepare_for_gradient_collection(trainer)
    trainer.train()
    (out / f"fed-{trainer.args.process_index}.json").write_text(json.dumps(capture.fed))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
    # as bergson's own workers do: skip the interpreter's finalization, where torch's process-group
    # threads can abort a process whose work is done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
