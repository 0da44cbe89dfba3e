"""Worker for test_train_ddp.py: ``torchrun --nproc_per_node N train_ddp_worker.py OUT BATCH``.

Trains the tiny MLP with the loop; rank 0 saves the final state dict to OUT/final.pt.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from train_helpers import ce_objective, run_config, tiny_data, tiny_mlp  # noqa: E402

from trimtune.train import fit  # noqa: E402

if __name__ == "__main__":
    out, batch = Path(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(1)
    model = tiny_mlp()
    res = fit(model, tiny_data(), ce_objective, run_config(out, batch))
    if res.checkpoint is not None and torch.distributed.get_rank() == 0:
        torch.save({"state": model.state_dict(), "world": torch.distributed.get_world_size()},
                   out / "final.pt")
    # a clean teardown: without it gloo can abort at interpreter exit ("terminate called...")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
