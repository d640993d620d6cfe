"""A real 2-process FSDP fit on CPU (gloo) with sharded checkpoints; Lightning launches rank 1 from this script.

Lightning refuses ``strategy="fsdp"`` without a GPU in its accelerator connector (``The strategy `fsdp`
requires a GPU accelerator``), a check that applies to the ``FSDPStrategy`` class exactly. torch's FSDP itself
runs on CPU with gloo, and Lightning's FSDPStrategy handles a CPU root device (``device_id=None``), so the
script passes a subclass that changes nothing: the save and load paths are Lightning's own.

Each rank prints one line prefixed with RESULT: when fit returns.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from models import flavour, loaders
from train import print_result
from train import weights_digest as plain_digest

from lightning_genesis_ckpt import GenesisCheckpoint


def weights_digest(model: torch.nn.Module) -> str:
    """The digest of the full (gathered) weights: a collective call, made by every rank in the same order."""
    full = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
    holder = torch.nn.Module()
    holder.state_dict = lambda: full  # type: ignore[method-assign]
    return plain_digest(holder)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("dirpath")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--storage-options", default="{}")
    p.add_argument("--strategy", choices=["fsdp", "model_parallel"], default="model_parallel")
    args = p.parse_args()

    f = flavour("pytorch_lightning")
    from pytorch_lightning.strategies import FSDPStrategy, ModelParallelStrategy

    class CPUFSDPStrategy(FSDPStrategy):
        """FSDPStrategy unchanged; a subclass only so the accelerator connector's GPU check lets it through."""

    class ShardedModel(f.TinyModel):
        """TinyModel with its parameters sharded over the data-parallel mesh (FSDP2's ``fully_shard``)."""

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in self.net:
                if isinstance(layer, torch.nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(self.net, mesh=mesh)

    if args.strategy == "fsdp":
        strategy = CPUFSDPStrategy(state_dict_type="sharded")
        f.pl.seed_everything(0)
        model = f.TinyModel()
    else:
        strategy = ModelParallelStrategy()  # saves a distributed (sharded) checkpoint directory by default
        f.pl.seed_everything(0)
        model = ShardedModel()
    train, val = loaders()
    callback = GenesisCheckpoint(
        args.dirpath, monitor="val_loss", storage_options=json.loads(args.storage_options)
    )
    trainer = f.pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        callbacks=[callback],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
    )
    trainer.fit(model, train, val)
    print_result(trainer, callback, weights_digest(model), rank=trainer.global_rank)


if __name__ == "__main__":
    main()
